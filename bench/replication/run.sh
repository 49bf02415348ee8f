#!/usr/bin/env bash
# Replication benchmark: pgmm vs PostgreSQL's own logical replication (PUBLICATION/SUBSCRIPTION).
#
# Two pairs of throwaway clusters: pair 1 replicates with a native subscription, pair 2 with two
# pgmm nodes ("a" sends, "b" receives). Both get the same workload (one UPDATE and one INSERT per
# transaction, written directly to the sending Postgres), alternated within every round so that
# drift of a shared machine hits both alike. Measures (a) catch-up after a pause, (b) per-row lag
# at a steady rate and (c) at a sparse rate, and prints medians and ratios. See README.md next to this file.
#
# Environment: ROUNDS (default 3), QUICK=1 (ROUNDS=1, TXNS=8000, LAG_SECONDS=SPARSE_SECONDS=5),
# TXNS (catch-up transactions, default 32000), RATE (tx/s for the lag phase, default 1000),
# LAG_SECONDS (default 20), SPARSE_RATE / SPARSE_SECONDS (a low-rate lag phase, default 10 tx/s
# for 10 s, 0 s = off), PAUSE_MIN (shortest pause of the receiver in s, default 6), CLIENTS
# (pgbench clients, default 8), PREFILL (rows on both sides before replication starts, default
# 10000), POLL_MS (default 20), CATCHUP_TIMEOUT (s, default 300), SYSTEMS (default "native pgmm"),
# BACKEND (unix|tcp: how pgmm reaches its Postgres, default unix), PG_BINDIR, NO_BUILD=1 (use an
# existing target/release/pgmm), KEEP=1 (keep the temp dir), CSV (one row per phase).
# shellcheck disable=SC2317  # cleanup, pause_* and resume_* are called through trap and "pause_$s"
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

if [[ "${QUICK:-0}" == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    TXNS=${TXNS:-8000}
    LAG_SECONDS=${LAG_SECONDS:-5}
    SPARSE_SECONDS=${SPARSE_SECONDS:-5}
fi
ROUNDS=${ROUNDS:-3}
TXNS=${TXNS:-32000}
RATE=${RATE:-1000}
LAG_SECONDS=${LAG_SECONDS:-20}
SPARSE_RATE=${SPARSE_RATE:-10}
SPARSE_SECONDS=${SPARSE_SECONDS:-10}
CLIENTS=${CLIENTS:-8}
THREADS=2
PREFILL=${PREFILL:-10000}
POLL_MS=${POLL_MS:-20}
CATCHUP_TIMEOUT=${CATCHUP_TIMEOUT:-300}
PAUSE_MIN=${PAUSE_MIN:-6}
SYSTEMS=${SYSTEMS:-native pgmm}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf 'bench/replication: %s\n' "$*" >&2; exit 2; }

for s in $SYSTEMS; do [[ $s == native || $s == pgmm ]] || die "unknown system '$s' (SYSTEMS may hold native, pgmm)"; done
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
((TXNS % CLIENTS == 0)) || die "TXNS ($TXNS) must be a multiple of CLIENTS ($CLIENTS): pgbench -t counts per client"

# ---------------------------------------------------------------------------------------------
# Prerequisites: say everything that is missing at once, install nothing.
# ---------------------------------------------------------------------------------------------
find_pg_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$newest" ]]; then echo "$newest"; return; fi
    if command -v pg_config >/dev/null 2>&1; then pg_config --bindir; return; fi
}

missing=()
PG_BINDIR=$(find_pg_bindir || true)
for tool in initdb pg_ctl postgres pgbench psql; do
    if [[ -z "$PG_BINDIR" || ! -x "$PG_BINDIR/$tool" ]]; then
        missing+=("$tool (PostgreSQL server binaries; looked in ${PG_BINDIR:-/usr/lib/postgresql/*/bin and pg_config --bindir})")
    fi
done
command -v python3 >/dev/null 2>&1 || missing+=("python3")
if has pgmm && [[ "${NO_BUILD:-0}" != 1 ]]; then
    command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust toolchain)")
fi
if ((${#missing[@]})); then
    printf 'bench/replication: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'On Debian/Ubuntu: apt-get install -y postgresql python3\n' >&2
    exit 2
fi

# initdb and postgres refuse to run as root: run them as the postgres system user.
if [[ $(id -u) == 0 ]]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' system user to run Postgres as"
    as_db() { runuser -u postgres -- "$@"; }
else
    as_db() { "$@"; }
fi

# ---------------------------------------------------------------------------------------------
# Build pgmm.
# ---------------------------------------------------------------------------------------------
PGMM="$repo/target/release/pgmm"
if has pgmm; then
    if [[ "${NO_BUILD:-0}" != 1 ]]; then
        log "building pgmm (cargo build --release -p pgmm)"
        (cd "$repo" && cargo build --release -p pgmm >&2) || die "cargo build --release -p pgmm failed"
    fi
    [[ -x "$PGMM" ]] || die "$PGMM not found (build failed or NO_BUILD=1 without a build)"
fi

# ---------------------------------------------------------------------------------------------
# Scratch space and cleanup.
# ---------------------------------------------------------------------------------------------
# Clusters: n1 (native publisher) -> n2 (native subscriber); p1 (pgmm node a) -> p2 (pgmm node b).
CLUSTERS=()
has native && CLUSTERS+=(n1 n2)
has pgmm && CLUSTERS+=(p1 p2)

work=$(mktemp -d "${TMPDIR:-/tmp}/pgmm-repl.XXXXXX")
chmod 755 "$work"
mkdir "$work/logs" "$work/run"
for c in "${CLUSTERS[@]}"; do mkdir "$work/data-$c" "$work/run/$c"; done
[[ $(id -u) == 0 ]] && chown -R postgres: "$work/logs" "$work/run" "$work"/data-*

declare -A pgmm_pid=()
declare -A pg_started=()
poll_pid=""
stop_pgmm() {
    local node=$1 pid=${pgmm_pid[$1]:-} rc=0
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$pid" 2>/dev/null; then
        log "pgmm $node (pid $pid) still running 30 s after SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || rc=$?
    pgmm_pid[$node]=""
    return "$rc"
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [[ -n "$poll_pid" ]]; then kill "$poll_pid" 2>/dev/null || true; wait "$poll_pid" 2>/dev/null || true; fi
    for node in a b; do stop_pgmm "$node" >/dev/null 2>&1 || true; done
    for c in "${!pg_started[@]}"; do
        as_db "$PG_BINDIR/pg_ctl" -D "$work/data-$c" -m immediate -w stop >/dev/null 2>&1 || true
    done
    if [[ "${KEEP:-0}" == 1 ]]; then
        log "KEEP=1: logs left in $work"
    else
        rm -rf "$work"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Ten distinct free ports, chosen while all are bound so they cannot collide.
read -r -a free_ports < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(10):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
declare -A port=([n1]=${free_ports[0]} [n2]=${free_ports[1]} [p1]=${free_ports[2]} [p2]=${free_ports[3]})
declare -A client_port=([a]=${free_ports[4]} [b]=${free_ports[5]})
declare -A metrics_port=([a]=${free_ports[6]} [b]=${free_ports[7]})
declare -A peer_port=([a]=${free_ports[8]} [b]=${free_ports[9]})

PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres -h 127.0.0.1)
PGBENCH="$PG_BINDIR/pgbench"
sql() { local c=$1; shift; "${PSQL[@]}" -p "${port[$c]}" "$@"; }
val() { sql "$1" -tAc "$2"; }

# ---------------------------------------------------------------------------------------------
# Postgres: four clusters, initdb in parallel.
# ---------------------------------------------------------------------------------------------
log "initdb ($PG_BINDIR) x ${#CLUSTERS[@]} into $work"
declare -A initdb_pid=()
for c in "${CLUSTERS[@]}"; do
    as_db "$PG_BINDIR/initdb" -D "$work/data-$c" -U postgres -A trust -E UTF8 --no-sync \
        >"$work/logs/initdb-$c.log" 2>&1 &
    initdb_pid[$c]=$!
done
for c in "${CLUSTERS[@]}"; do
    wait "${initdb_pid[$c]}" || { cat "$work/logs/initdb-$c.log" >&2; die "initdb of $c failed"; }
done
for c in "${CLUSTERS[@]}"; do
    # Large max_wal_size / checkpoint_timeout: the only checkpoints are the ones the script asks
    # for between phases, so none lands inside a measurement.
    cat >>"$work/data-$c/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = ${port[$c]}
unix_socket_directories = '$work/run/$c'
wal_level = logical
track_commit_timestamp = on
max_connections = 100
shared_buffers = 128MB
max_wal_size = 8GB
checkpoint_timeout = 1h
max_replication_slots = 10
max_wal_senders = 10
log_line_prefix = '%m [%p] %a '
EOF
    pg_started[$c]=1
    as_db "$PG_BINDIR/pg_ctl" -D "$work/data-$c" -l "$work/logs/postgres-$c.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$work/logs/postgres-$c.log" >&2; die "Postgres $c did not start"; }
done
log "Postgres started: $(for c in "${CLUSTERS[@]}"; do printf '%s=127.0.0.1:%s ' "$c" "${port[$c]}"; done)"

# The same table on both sides, made before either system starts, pre-filled with the same rows.
# created_at is set once at insert on the sender and travels with the row; applied_at is set by a
# trigger on the receiver only, so applied_at - created_at is the per-row lag on one clock.
schema_sql="
CREATE TABLE bench (
    id bigint PRIMARY KEY,
    v int NOT NULL,
    payload text NOT NULL,
    updated_at timestamptz NOT NULL,
    created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    applied_at timestamptz
);
INSERT INTO bench (id, v, payload, updated_at, created_at)
SELECT g, g % 1000, md5(g::text) || md5((g + 1)::text), '2000-01-01 00:00:00+00', '2000-01-01 00:00:00+00'
FROM generate_series(1, $PREFILL) g;
"
sender_sql="CREATE SEQUENCE bench_id_seq START $((PREFILL + 1));"
# Both systems apply with session_replication_role = replica, where only ALWAYS triggers fire.
# An applied UPDATE carries the sender's applied_at (NULL): keep the value set at insert.
receiver_sql="
CREATE FUNCTION bench_applied_at() RETURNS trigger LANGUAGE plpgsql AS \$\$
BEGIN
    IF TG_OP = 'INSERT' THEN
        NEW.applied_at := clock_timestamp();
    ELSE
        NEW.applied_at := OLD.applied_at;
    END IF;
    RETURN NEW;
END \$\$;
CREATE TRIGGER bench_applied_at BEFORE INSERT OR UPDATE ON bench
    FOR EACH ROW EXECUTE FUNCTION bench_applied_at();
ALTER TABLE bench ENABLE ALWAYS TRIGGER bench_applied_at;
"
for c in "${CLUSTERS[@]}"; do
    sql "$c" -c "$schema_sql" >/dev/null
    case $c in
        n1 | p1) sql "$c" -c "$sender_sql" >/dev/null ;;
        n2 | p2) sql "$c" -c "$receiver_sql" >/dev/null ;;
    esac
    sql "$c" -c 'VACUUM ANALYZE bench' >/dev/null
done

declare -A sender=([native]=n1 [pgmm]=p1)
declare -A receiver=([native]=n2 [pgmm]=p2)

# The workload: one UPDATE of a random pre-filled row and one INSERT of a new row (ids from the
# sender's sequence, which exists on the sender only, so they cannot collide).
cat >"$work/txn.sql" <<EOF
\\set r random(1, $PREFILL)
\\set v random(1, 1000000)
BEGIN;
UPDATE bench SET v = :v, updated_at = now() WHERE id = :r;
INSERT INTO bench (id, v, payload, updated_at) VALUES (nextval('bench_id_seq'), :v, md5(:v::text) || md5(:r::text), now());
END;
EOF

# One more transaction after the workload; both systems apply in commit order, so once its row is
# on the receiver every earlier transaction is too. Prints the marker's id.
insert_marker() {
    val "${sender[$1]}" "INSERT INTO bench (id, v, payload, updated_at)
        VALUES (nextval('bench_id_seq'), 0, 'marker', now()) RETURNING id" | head -n 1
}
max_id() { val "$1" 'SELECT coalesce(max(id), 0) FROM bench'; }
# Every replicated column of every row, in id order (applied_at is receiver-only by design).
checksum() {
    val "$1" "SELECT count(*) || ' ' || md5(string_agg(id || ',' || v || ',' || payload || ',' ||
        updated_at || ',' || created_at, ';' ORDER BY id)) FROM bench"
}
checkpoint() { local s; for s in "${sender[$1]}" "${receiver[$1]}"; do val "$s" CHECKPOINT >/dev/null; done; }

# Start pgpoll.py against a receiver; sets poll_pid, returns once it is connected.
start_poller() { # system base marker timeout
    local c=${receiver[$1]}
    rm -f "$work/poll.out"
    python3 "$here/pgpoll.py" 127.0.0.1 "${port[$c]}" --base "$2" --marker "$3" \
        --interval "$(awk -v m="$POLL_MS" 'BEGIN { print m / 1000 }')" --timeout "$4" \
        >"$work/poll.out" 2>"$work/logs/poll.err" &
    poll_pid=$!
    local deadline=$((SECONDS + 30))
    until grep -q '^ready$' "$work/poll.out" 2>/dev/null; do
        if ! kill -0 "$poll_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            cat "$work/logs/poll.err" >&2
            die "pgpoll.py could not connect to ${receiver[$1]}"
        fi
        sleep 0.02
    done
}
# The benchmark stops pgmm b only between phases; a SIGTERM logged during one came from elsewhere.
killed_by_others() { # node
    if tail -n 5 "$work/logs/pgmm-$1.log" | grep -q 'SIGTERM'; then
        echo " (it logged a SIGTERM the benchmark did not send: another process on this machine killed it)"
    fi
}
# Wait for the poller; on the pgmm pair, give up early if node b exits. 0 = marker seen.
finish_poller() { # system
    local rc=0
    while kill -0 "$poll_pid" 2>/dev/null; do
        if [[ $1 == pgmm ]] && ! kill -0 "${pgmm_pid[b]}" 2>/dev/null; then
            log "pgmm node b exited while the receiver was catching up$(killed_by_others b); tail of its log:"
            tail -n 30 "$work/logs/pgmm-b.log" >&2
            kill "$poll_pid" 2>/dev/null || true
            break
        fi
        sleep 0.1
    done
    wait "$poll_pid" 2>/dev/null || rc=$?
    poll_pid=""
    grep -q '^done ' "$work/poll.out" || rc=1
    return "$rc"
}
wait_applied() { # system base marker timeout
    start_poller "$@"
    finish_poller "$1"
}

# ---------------------------------------------------------------------------------------------
# Native: publication on n1, subscription on n2 (no initial copy: both sides are pre-filled).
# ---------------------------------------------------------------------------------------------
native_paused() {
    [[ $(val n2 "SELECT count(*) FROM pg_stat_subscription WHERE subname = 'bench_sub' AND pid IS NOT NULL") == 0 &&
        $(val n1 "SELECT count(*) FROM pg_replication_slots WHERE slot_name = 'bench_sub' AND active") == 0 ]]
}
pause_native() {
    val n2 'ALTER SUBSCRIPTION bench_sub DISABLE' >/dev/null
    local deadline=$((SECONDS + 30))
    until native_paused; do
        ((SECONDS < deadline)) || die "native subscription still has a worker or an active slot 30 s after DISABLE"
        sleep 0.05
    done
}
resume_native() { val n2 'ALTER SUBSCRIPTION bench_sub ENABLE' >/dev/null; }

if has native; then
    log "native: CREATE PUBLICATION on n1, CREATE SUBSCRIPTION (copy_data = false) on n2"
    val n1 'CREATE PUBLICATION bench_pub FOR TABLE bench' >/dev/null
    val n2 "CREATE SUBSCRIPTION bench_sub
        CONNECTION 'host=127.0.0.1 port=${port[n1]} user=postgres dbname=postgres'
        PUBLICATION bench_pub WITH (copy_data = false)" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# pgmm: node a on p1 sends, node b on p2 receives; each lists the other as its peer.
# ---------------------------------------------------------------------------------------------
backend_url() {
    local c=$1
    if [[ "${BACKEND:-unix}" == tcp ]]; then
        echo "postgresql://postgres@127.0.0.1:${port[$c]}/postgres"
    else
        local dir="$work/run/$c"
        echo "postgresql://postgres@${dir//\//%2F}:${port[$c]}/postgres"
    fi
}
write_pgmm_config() { # node cluster other
    local node=$1 c=$2 other=$3
    cat >"$work/pgmm-$node.toml" <<EOF
[node]
name = "$node"
[cluster]
name = "bench"
nodes = ["a", "b"]
[client]
listen = "127.0.0.1:${client_port[$node]}"
shutdown_grace_seconds = 2
[postgres]
url = "$(backend_url "$c")"
[metrics]
listen = "127.0.0.1:${metrics_port[$node]}"
[peer]
listen = "127.0.0.1:${peer_port[$node]}"
secret_file = "$work/peer.secret"
[[peers]]
name = "$other"
address = "127.0.0.1:${peer_port[$other]}"
[replication]
tables = ["public.bench"]
EOF
}
start_pgmm() { # node
    local node=$1
    printf '===== bench: starting pgmm %s at %s\n' "$node" "$(date '+%F %T.%N')" >>"$work/logs/pgmm-$node.log"
    "$PGMM" serve --config "$work/pgmm-$node.toml" >>"$work/logs/pgmm-$node.log" 2>&1 &
    pgmm_pid[$node]=$!
}
# pgmm accepts clients only after migrations, enrolment and its slots: from then on every write
# on its Postgres is captured.
wait_pgmm_ready() { # node
    local node=$1 deadline=$((SECONDS + 60))
    until "${PSQL[@]}" -p "${client_port[$node]}" -tAc 'SELECT 1' >/dev/null 2>&1; do
        if ! kill -0 "${pgmm_pid[$node]}" 2>/dev/null || ((SECONDS >= deadline)); then
            tail -n 30 "$work/logs/pgmm-$node.log" >&2
            die "pgmm $node did not accept clients within 60 s"
        fi
        sleep 0.2
    done
}
pause_pgmm() {
    local rc=0
    stop_pgmm b || rc=$?
    ((rc == 0)) || log "pgmm b exited with status $rc after SIGTERM"
}
resume_pgmm() { start_pgmm b; }

if has pgmm; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/peer.secret"
    chmod 600 "$work/peer.secret"
    write_pgmm_config a p1 b
    write_pgmm_config b p2 a
    log "pgmm: node a (Postgres p1, client :${client_port[a]}, peer :${peer_port[a]}) ->" \
        "node b (Postgres p2, client :${client_port[b]}, peer :${peer_port[b]}), $("$PGMM" --version 2>/dev/null || echo pgmm)"
    start_pgmm a
    start_pgmm b
    wait_pgmm_ready a
    wait_pgmm_ready b
fi

# A first transaction through each system proves the pipeline before anything is timed.
for s in $SYSTEMS; do
    base=$(max_id "${sender[$s]}")
    m=$(insert_marker "$s")
    if ! wait_applied "$s" "$base" "$m" 60; then
        [[ $s == pgmm ]] && tail -n 30 "$work/logs/pgmm-a.log" "$work/logs/pgmm-b.log" >&2
        die "$s: a first transaction did not reach the receiver within 60 s$([[ $s == pgmm ]] && killed_by_others a)"
    fi
    log "$s: replication works (warm-up transaction applied)"
done

# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------
# shellcheck disable=SC2034  # the lag arrays are filled and read through namerefs
declare -A cu_secs cu_first cu_txps cu_chps cu_tail_chps lag_p50 lag_p99 lag_max lag_tps sp_p50 sp_p99 sp_max sp_tps
declare -A checks_ok checks_all broken cu_cpu cu_cpu_snd cu_cpu_rcv cu_cpu_rep

# CPU ms so far of the sending cluster, the receiving cluster and the pgmm processes.
cpu_sample() { # system
    local s=$1 pids=""
    [[ $s == pgmm ]] && pids="${pgmm_pid[a]:-0},${pgmm_pid[b]:-0}"
    python3 "$here/cpusample.py" "$(head -n 1 "$work/data-${sender[$s]}/postmaster.pid")" \
        "$(head -n 1 "$work/data-${receiver[$s]}/postmaster.pid")" "$pids"
}
[[ -n "${CSV:-}" ]] && echo "round,system,phase,seconds,first_s,tx_per_s,changes_per_s,lag_p50_ms,lag_p99_ms,lag_max_ms,rows,check" >"$CSV"

fsub() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", a - b }'; }
fdiv() { awk -v a="$1" -v b="$2" 'BEGIN { if (b <= 0) print "ERR"; else printf "%.0f", a / b }'; }

# Receiver equals sender, row for row; counts the outcome and sets verdict to ok or MISMATCH
# (not printed: a command substitution would run it in a subshell and lose the counts).
verdict=""
verify() { # system phase
    local s=$1 a b
    a=$(checksum "${sender[$s]}")
    b=$(checksum "${receiver[$s]}")
    checks_all[$s]=$((${checks_all[$s]:-0} + 1))
    if [[ "$a" == "$b" ]]; then
        checks_ok[$s]=$((${checks_ok[$s]:-0} + 1))
        verdict=ok
    else
        log "$s $2: receiver differs from sender: sender '$a', receiver '$b'"
        verdict=MISMATCH
    fi
}

run_pgbench() { # system logfile extra-args...
    local s=$1 out=$2
    shift 2
    if ! "$PGBENCH" -h 127.0.0.1 -p "${port[${sender[$s]}]}" -U postgres -n -M prepared -f "$work/txn.sql" \
        -c "$CLIENTS" -j "$THREADS" "$@" postgres >"$out" 2>&1; then
        log "pgbench failed on $s; tail of its output:"
        tail -n 5 "$out" >&2
        return 1
    fi
    local failed
    failed=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
    [[ -z "$failed" || "$failed" == 0 ]] || log "pgbench on $s: $failed failed transactions"
}

catchup() { # system round
    local s=$1 r=$2 out="$work/logs/pgbench-r$2-catchup-$1.log"
    checkpoint "$s"
    "pause_$s"
    local paused=$EPOCHREALTIME base m t0 first done_t
    base=$(max_id "${sender[$s]}")
    run_pgbench "$s" "$out" -t $((TXNS / CLIENTS)) || { broken[$s]=1; return; }
    local n
    n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
    [[ "$n" == "$TXNS" ]] || log "catch-up $s: pgbench processed '$n' transactions, expected $TXNS"
    m=$(insert_marker "$s")
    # A receiver that was down "a while": the native launcher starts a worker at most once per
    # wal_retrieve_retry_interval (5 s) after its previous scan (at DISABLE), and pgmm's sender
    # backs off its reconnects; a short pause would time those throttles, not the catch-up.
    local rest
    rest=$(awk -v p="$paused" -v n="$EPOCHREALTIME" -v m="$PAUSE_MIN" 'BEGIN { r = m - (n - p); print (r > 0 ? r : 0) }')
    [[ "$rest" == 0 ]] || sleep "$rest"
    start_poller "$s" "$base" "$m" "$CATCHUP_TIMEOUT"
    local -a cpu0 cpu1
    read -r -a cpu0 < <(cpu_sample "$s")
    t0=$EPOCHREALTIME
    "resume_$s"
    if ! finish_poller "$s"; then
        log "catch-up $s (round $r): the marker row $m did not arrive within $CATCHUP_TIMEOUT s" \
            "(receiver max(id) $(max_id "${receiver[$s]}"), sender $m); $(tail -n 1 "$work/poll.out")"
        if [[ $s == pgmm ]]; then
            tail -n 40 "$work/logs/pgmm-a.log" | sed 's/^/  a| /' >&2
            tail -n 40 "$work/logs/pgmm-b.log" | sed 's/^/  b| /' >&2
        fi
        cu_secs[$s]+="ERR "; cu_first[$s]+="ERR "; cu_txps[$s]+="ERR "; cu_chps[$s]+="ERR "; cu_tail_chps[$s]+="ERR "
        cu_cpu[$s]+="ERR "; cu_cpu_snd[$s]+="ERR "; cu_cpu_rcv[$s]+="ERR "; cu_cpu_rep[$s]+="ERR "
        broken[$s]=1
        return
    fi
    read -r -a cpu1 < <(cpu_sample "$s")
    first=$(sed -n 's/^first //p' "$work/poll.out")
    done_t=$(awk '/^done / { print $2 }' "$work/poll.out")
    local secs fs txps chps tail_chps check
    secs=$(fsub "$done_t" "$t0")
    fs=$(fsub "$first" "$t0")
    txps=$(fdiv "$TXNS" "$secs")
    chps=$(fdiv $((2 * TXNS)) "$secs")
    tail_chps=$(fdiv $((2 * TXNS)) "$(fsub "$done_t" "$first")")
    # CPU milliseconds per 1000 row changes: sending Postgres, receiving Postgres, pgmm processes.
    local k=$((2 * TXNS)) snd rcv rep
    snd=$(awk -v a="${cpu0[0]}" -v b="${cpu1[0]}" -v k="$k" 'BEGIN { printf "%.1f", (b - a) * 1000 / k }')
    rcv=$(awk -v a="${cpu0[1]}" -v b="${cpu1[1]}" -v k="$k" 'BEGIN { printf "%.1f", (b - a) * 1000 / k }')
    rep=$(awk -v a="${cpu0[2]}" -v b="${cpu1[2]}" -v k="$k" 'BEGIN { printf "%.1f", (b - a) * 1000 / k }')
    verify "$s" "catch-up round $r"
    check=$verdict
    cu_secs[$s]+="$secs "; cu_first[$s]+="$fs "; cu_txps[$s]+="$txps "; cu_chps[$s]+="$chps "; cu_tail_chps[$s]+="$tail_chps "
    cu_cpu[$s]+="$(awk -v a="$snd" -v b="$rcv" -v c="$rep" 'BEGIN { printf "%.1f", a + b + c }') "
    cu_cpu_snd[$s]+="$snd "; cu_cpu_rcv[$s]+="$rcv "; cu_cpu_rep[$s]+="$rep "
    log "round $r  catch-up $(printf '%-6s' "$s") ${secs} s (first change after ${fs} s)  ${txps} tx/s  ${chps} changes/s;" \
        "CPU ms/1000 changes: sender PG $snd, receiver PG $rcv, pgmm $rep; data $check"
    [[ -n "${CSV:-}" ]] && echo "$r,$s,catchup,$secs,$fs,$txps,$chps,,,,$TXNS,$check" >>"$CSV"
    return 0
}

# kind "lag": steady state at RATE for LAG_SECONDS; kind "sparse": SPARSE_RATE for SPARSE_SECONDS,
# where transactions arrive one at a time and each is alone in the stream.
lag() { # system round kind
    local s=$1 r=$2 kind=$3 out="$work/logs/pgbench-r$2-$3-$1.log" rate secs
    if [[ $kind == lag ]]; then
        rate=$RATE secs=$LAG_SECONDS
        local -n a_p50=lag_p50 a_p99=lag_p99 a_max=lag_max a_tps=lag_tps
    else
        rate=$SPARSE_RATE secs=$SPARSE_SECONDS
        local -n a_p50=sp_p50 a_p99=sp_p99 a_max=sp_max a_tps=sp_tps
    fi
    checkpoint "$s"
    local base m
    base=$(max_id "${sender[$s]}")
    run_pgbench "$s" "$out" -R "$rate" -T "$secs" || { broken[$s]=1; return; }
    m=$(insert_marker "$s")
    if ! wait_applied "$s" "$base" "$m" 120; then
        log "$kind $s (round $r): the marker row $m did not arrive within 120 s after the run"
        a_p50[$s]+="ERR "; a_p99[$s]+="ERR "; a_max[$s]+="ERR "; a_tps[$s]+="ERR "
        broken[$s]=1
        return
    fi
    local tps stats n napplied p50 p99 mx check
    tps=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out")
    tps=$(printf '%.0f' "${tps:-0}")
    stats=$(val "${receiver[$s]}" "
        SELECT count(*), count(applied_at),
               round(percentile_cont(0.5) WITHIN GROUP (ORDER BY ms)::numeric, 2),
               round(percentile_cont(0.99) WITHIN GROUP (ORDER BY ms)::numeric, 2),
               round(max(ms)::numeric, 2)
        FROM (SELECT applied_at, extract(epoch FROM applied_at - created_at) * 1000 AS ms
              FROM bench WHERE id > $base AND id < $m) x" | tr '|' ' ')
    read -r n napplied p50 p99 mx <<<"$stats"
    [[ "$n" == "$napplied" ]] || log "$kind $s: $((n - napplied)) of $n rows have no applied_at (trigger did not fire?)"
    verify "$s" "$kind round $r"
    check=$verdict
    a_p50[$s]+="$p50 "; a_p99[$s]+="$p99 "; a_max[$s]+="$mx "; a_tps[$s]+="$tps "
    log "round $r  $(printf '%-8s %-6s' "$kind" "$s") ${tps} tx/s, $n rows: p50 ${p50} ms  p99 ${p99} ms  max ${mx} ms  data $check"
    [[ -n "${CSV:-}" ]] && echo "$r,$s,$kind,$secs,,$tps,$((2 * n)),$p50,$p99,$mx,$n,$check" >>"$CSV"
    return 0
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "$ROUNDS round(s) x [$SYSTEMS]: catch-up of $TXNS transactions, lag at $RATE tx/s for $LAG_SECONDS s," \
    "lag at $SPARSE_RATE tx/s for $SPARSE_SECONDS s;" \
    "pgbench -c $CLIENTS -j $THREADS -M prepared"
for round in $(seq "$ROUNDS"); do
    for s in $SYSTEMS; do [[ -n "${broken[$s]:-}" ]] || catchup "$s" "$round"; done
    for s in $SYSTEMS; do [[ -n "${broken[$s]:-}" ]] || lag "$s" "$round" lag; done
    if ((SPARSE_SECONDS > 0)); then
        for s in $SYSTEMS; do [[ -n "${broken[$s]:-}" ]] || lag "$s" "$round" sparse; done
    fi
done

# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
# median DECIMALS VALUE...: ERR values are ignored; ERR if nothing is left.
median() {
    python3 -c '
import statistics, sys
d = int(sys.argv[1])
v = [float(x) for x in sys.argv[2:] if x not in ("ERR", "-")]
print(f"{statistics.median(v):.{d}f}" if v else "ERR")' "$@"
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "ERR" || b == "ERR" || a == "" || b == "" || b == 0) print "-"; else printf "%.3f", a / b }'
}
per_round_ratios() {
    local -a a b
    read -r -a a <<<"$1"
    read -r -a b <<<"$2"
    local out="" i
    for i in "${!a[@]}"; do out+="$(ratio "${a[$i]}" "${b[$i]:-ERR}") "; done
    echo "${out% }"
}
both() { has native && has pgmm; }

# name decimals array: one row with the median of each system and the ratio pgmm/native.
row() {
    local title=$1 d=$2 arr=$3 s n="" p=""
    local -n ref=$arr
    printf '  %-30s' "$title"
    for s in $SYSTEMS; do
        local m
        # shellcheck disable=SC2086
        m=$(median "$d" ${ref[$s]:-ERR})
        printf ' %11s' "$m"
        [[ $s == native ]] && n=$m
        [[ $s == pgmm ]] && p=$m
    done
    both && printf ' %12s' "$(ratio "$p" "$n")"
    printf '\n'
}
header() {
    printf '  %-30s' "$1"
    for s in $SYSTEMS; do printf ' %11s' "$s"; done
    both && printf ' %12s' "pgmm/native"
    printf '\n'
}

echo
echo "pgmm replication vs PostgreSQL logical replication: $ROUNDS round(s), systems alternated in each round"
echo "Postgres $("$PG_BINDIR/postgres" --version | awk '{ print $3 }'), $(nproc) CPUs, load average at start $load_start," \
    "at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "workload: per transaction 1 UPDATE (random one of $PREFILL pre-filled rows) + 1 INSERT;" \
    "pgbench -c $CLIENTS -j $THREADS -M prepared on the sending Postgres"
echo
echo "(a) catch-up: receiver paused, $TXNS transactions ($((2 * TXNS)) row changes) written, receiver resumed;"
echo "    time from resume until the last transaction is applied (median over rounds)"
header ""
row "seconds to last applied" 3 cu_secs
row "transactions/s" 0 cu_txps
row "row changes/s" 0 cu_chps
row "first change applied after (s)" 3 cu_first
row "row changes/s after the first" 0 cu_tail_chps
row "CPU ms per 1000 row changes" 1 cu_cpu
row "  in the sending Postgres" 1 cu_cpu_snd
row "  in the receiving Postgres" 1 cu_cpu_rcv
row "  in pgmm (a + b)" 1 cu_cpu_rep
echo
echo "(b) steady state at $RATE tx/s for $LAG_SECONDS s: per inserted row, applied_at (receiver) - created_at (sender)"
echo "    (median over rounds; ratio < 1 means pgmm is faster)"
header ""
row "achieved tx/s" 0 lag_tps
row "lag p50 (ms)" 2 lag_p50
row "lag p99 (ms)" 2 lag_p99
row "lag max (ms)" 2 lag_max
if ((SPARSE_SECONDS > 0)); then
    echo
    echo "(c) sparse traffic at $SPARSE_RATE tx/s for $SPARSE_SECONDS s (each transaction alone in the stream), same lag measure"
    header ""
    row "achieved tx/s" 0 sp_tps
    row "lag p50 (ms)" 2 sp_p50
    row "lag p99 (ms)" 2 sp_p99
    row "lag max (ms)" 2 sp_max
fi

echo
echo "all runs (in round order):"
for metric in "catch-up seconds:cu_secs" "catch-up changes/s:cu_chps" "first change after s:cu_first" \
    "CPU ms/1000 changes:cu_cpu" \
    "lag p50 ms:lag_p50" "lag p99 ms:lag_p99" "lag max ms:lag_max" \
    "sparse lag p50 ms:sp_p50" "sparse lag p99 ms:sp_p99" "sparse lag max ms:sp_max"; do
    title=${metric%%:*}
    declare -n arr=${metric#*:}
    for s in $SYSTEMS; do v=${arr[$s]:-}; printf '  %-22s %-7s %s\n' "$title" "$s" "${v% }"; done
    unset -n arr
done

if both; then
    echo
    echo "ratio pgmm/native within each round (median; per round):"
    for metric in "catch-up changes/s:cu_chps" "CPU ms/1000 changes:cu_cpu" "lag p50:lag_p50" "lag p99:lag_p99" \
        "sparse lag p50:sp_p50" "sparse lag p99:sp_p99"; do
        title=${metric%%:*}
        declare -n arr=${metric#*:}
        r=$(per_round_ratios "${arr[pgmm]:-}" "${arr[native]:-}")
        # shellcheck disable=SC2086
        printf '  %-22s %s  (%s)\n' "$title" "$(median 3 $r)" "$r"
        unset -n arr
    done
fi

echo
printf 'data check (receiver = sender, count + md5 of every row, after every phase):'
for s in $SYSTEMS; do printf ' %s %s/%s' "$s" "${checks_ok[$s]:-0}" "${checks_all[$s]:-0}"; done
printf '\n'
for s in $SYSTEMS; do
    [[ -n "${broken[$s]:-}" ]] && echo "  $s: stopped early after a failure (see the [bench] lines above)"
done
if has pgmm; then
    conflicts=$(val p2 'SELECT count(*) FROM pgmm.conflicts' 2>/dev/null || echo '?')
    echo "pgmm.conflicts rows on node b: $conflicts"
    metrics=$(curl -fsS "http://127.0.0.1:${metrics_port[b]}/metrics" 2>/dev/null |
        grep -E '^pgmm_(changes|transactions)_applied_total|^pgmm_apply_batches_total' | tr '\n' ' ' || true)
    [[ -n "$metrics" ]] && echo "node b: $metrics"
    metrics=$(curl -fsS "http://127.0.0.1:${metrics_port[a]}/metrics" 2>/dev/null |
        grep -E '^pgmm_changes_(captured|shipped)_total' | tr '\n' ' ' || true)
    [[ -n "$metrics" ]] && echo "node a: $metrics"
fi
exit 0
