#!/usr/bin/env bash
# Large single transactions: pgmm vs PostgreSQL's own logical replication, side by side.
#
# Same setup as run.sh (two pairs of throwaway clusters, native n1 -> n2 and pgmm a on p1 ->
# b on p2, writes directly to the sending Postgres), one table bench_big. Per round and system
# (alternated): one INSERT of ROWS rows in one transaction, then one UPDATE of UPDATE_ROWS rows
# in one transaction; each timed from the COMMIT returning on the sender until the receiver has
# the transaction, with the peak memory of the replication processes. See README.md.
#
# Environment: ROWS (default 5000000), UPDATE_ROWS (default 1000000), ROUNDS (default 1),
# QUICK=1 (ROWS=200000, UPDATE_ROWS=50000), CATCHUP_TIMEOUT (s per phase, default 600),
# POLL_MS (default 100), SYSTEMS (default "native pgmm"), PG_BINDIR, NO_BUILD=1, PGMM_BIN
# (a pgmm binary to use, no build), KEEP=1, CSV (one row per phase).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

if [[ "${QUICK:-0}" == 1 ]]; then
    ROWS=${ROWS:-200000}
    UPDATE_ROWS=${UPDATE_ROWS:-50000}
fi
ROWS=${ROWS:-5000000}
UPDATE_ROWS=${UPDATE_ROWS:-1000000}
ROUNDS=${ROUNDS:-1}
CATCHUP_TIMEOUT=${CATCHUP_TIMEOUT:-600}
POLL_MS=${POLL_MS:-100}
SYSTEMS=${SYSTEMS:-native pgmm}

log() { printf '[bigtx] %s\n' "$*" >&2; }
die() { printf 'bench/replication/bigtx: %s\n' "$*" >&2; exit 2; }

for s in $SYSTEMS; do [[ $s == native || $s == pgmm ]] || die "unknown system '$s' (SYSTEMS may hold native, pgmm)"; done
has() { [[ " $SYSTEMS " == *" $1 "* ]]; }
((UPDATE_ROWS >= 1 && UPDATE_ROWS <= ROWS)) || die "UPDATE_ROWS ($UPDATE_ROWS) must be in 1..ROWS ($ROWS)"

# ---------------------------------------------------------------------------------------------
# Prerequisites (as run.sh): say everything that is missing at once, install nothing.
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
for tool in initdb pg_ctl postgres psql; do
    if [[ -z "$PG_BINDIR" || ! -x "$PG_BINDIR/$tool" ]]; then
        missing+=("$tool (PostgreSQL server binaries; looked in ${PG_BINDIR:-/usr/lib/postgresql/*/bin and pg_config --bindir})")
    fi
done
command -v python3 >/dev/null 2>&1 || missing+=("python3")
if has pgmm && [[ -z "${PGMM_BIN:-}" && "${NO_BUILD:-0}" != 1 ]]; then
    command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust toolchain)")
fi
if ((${#missing[@]})); then
    printf 'bench/replication/bigtx: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'On Debian/Ubuntu: apt-get install -y postgresql python3\n' >&2
    exit 2
fi

if [[ $(id -u) == 0 ]]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' system user to run Postgres as"
    as_db() { runuser -u postgres -- "$@"; }
else
    as_db() { "$@"; }
fi

PGMM=${PGMM_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/pgmm}
if has pgmm; then
    if [[ -z "${PGMM_BIN:-}" && "${NO_BUILD:-0}" != 1 ]]; then
        log "building pgmm (cargo build --release -p pgmm)"
        (cd "$repo" && cargo build --release -p pgmm >&2) || die "cargo build --release -p pgmm failed"
    fi
    [[ -x "$PGMM" ]] || die "$PGMM not found (build failed, or NO_BUILD=1 / PGMM_BIN without a binary)"
fi

# ---------------------------------------------------------------------------------------------
# Scratch space and cleanup (as run.sh).
# ---------------------------------------------------------------------------------------------
CLUSTERS=()
has native && CLUSTERS+=(n1 n2)
has pgmm && CLUSTERS+=(p1 p2)

work=$(mktemp -d "${TMPDIR:-/tmp}/pgmm-bigtx.XXXXXX")
chmod 755 "$work"
mkdir "$work/logs" "$work/run"
for c in "${CLUSTERS[@]}"; do mkdir "$work/data-$c" "$work/run/$c"; done
[[ $(id -u) == 0 ]] && chown -R postgres: "$work/logs" "$work/run" "$work"/data-*

declare -A pgmm_pid=()
declare -A pg_started=()
poll_pid=""
rss_pid=""
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
# shellcheck disable=SC2317  # called through trap
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    local p
    for p in "$poll_pid" "$rss_pid"; do
        if [[ -n "$p" ]]; then kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; fi
    done
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

read -r -a free_ports < <(python3 - <<'PY'
import socket
socks = []
for _ in range(10):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
PY
)
declare -A port=([n1]=${free_ports[0]} [n2]=${free_ports[1]} [p1]=${free_ports[2]} [p2]=${free_ports[3]})
declare -A client_port=([a]=${free_ports[4]} [b]=${free_ports[5]})
declare -A metrics_port=([a]=${free_ports[6]} [b]=${free_ports[7]})
declare -A peer_port=([a]=${free_ports[8]} [b]=${free_ports[9]})

PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres -h 127.0.0.1)
sql() { local c=$1; shift; "${PSQL[@]}" -p "${port[$c]}" "$@"; }
val() { sql "$1" -tAc "$2"; }

# ---------------------------------------------------------------------------------------------
# Postgres (as run.sh).
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
    cat >>"$work/data-$c/postgresql.conf" <<CONF
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
wal_sender_timeout = 0
wal_receiver_timeout = 0
log_line_prefix = '%m [%p] %a '
CONF
    pg_started[$c]=1
    as_db "$PG_BINDIR/pg_ctl" -D "$work/data-$c" -l "$work/logs/postgres-$c.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$work/logs/postgres-$c.log" >&2; die "Postgres $c did not start"; }
done
log "Postgres started: $(for c in "${CLUSTERS[@]}"; do printf '%s=127.0.0.1:%s ' "$c" "${port[$c]}"; done)"

# The same empty table on all four, made before either system starts; pgmm needs updated_at.
for c in "${CLUSTERS[@]}"; do
    sql "$c" -c "CREATE TABLE bench_big (id bigint PRIMARY KEY, v text,
        updated_at timestamptz NOT NULL DEFAULT now())" >/dev/null
done

declare -A sender=([native]=n1 [pgmm]=p1)
declare -A receiver=([native]=n2 [pgmm]=p2)

if has native; then
    log "native: CREATE PUBLICATION on n1, CREATE SUBSCRIPTION (copy_data = false) on n2"
    val n1 'CREATE PUBLICATION bench_pub FOR TABLE bench_big' >/dev/null
    val n2 "CREATE SUBSCRIPTION bench_sub
        CONNECTION 'host=127.0.0.1 port=${port[n1]} user=postgres dbname=postgres'
        PUBLICATION bench_pub WITH (copy_data = false)" >/dev/null
fi

# ---------------------------------------------------------------------------------------------
# pgmm (as run.sh, table public.bench_big).
# ---------------------------------------------------------------------------------------------
backend_url() {
    local dir="$work/run/$1"
    echo "postgresql://postgres@${dir//\//%2F}:${port[$1]}/postgres"
}
write_pgmm_config() { # node cluster other
    local node=$1 c=$2 other=$3
    cat >"$work/pgmm-$node.toml" <<CONF
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
tables = ["public.bench_big"]
CONF
}
start_pgmm() {
    local node=$1
    printf '===== bigtx: starting pgmm %s at %s\n' "$node" "$(date '+%F %T.%N')" >>"$work/logs/pgmm-$node.log"
    "$PGMM" serve --config "$work/pgmm-$node.toml" >>"$work/logs/pgmm-$node.log" 2>&1 &
    pgmm_pid[$node]=$!
}
wait_pgmm_ready() {
    local node=$1 deadline=$((SECONDS + 60))
    until "${PSQL[@]}" -p "${client_port[$node]}" -tAc 'SELECT 1' >/dev/null 2>&1; do
        if ! kill -0 "${pgmm_pid[$node]}" 2>/dev/null || ((SECONDS >= deadline)); then
            tail -n 30 "$work/logs/pgmm-$node.log" >&2
            die "pgmm $node did not accept clients within 60 s"
        fi
        sleep 0.2
    done
}
if has pgmm; then
    head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/peer.secret"
    chmod 600 "$work/peer.secret"
    write_pgmm_config a p1 b
    write_pgmm_config b p2 a
    log "pgmm: node a (p1) -> node b (p2), $("$PGMM" --version 2>/dev/null || echo pgmm)"
    start_pgmm a
    start_pgmm b
    wait_pgmm_ready a
    wait_pgmm_ready b
fi

# ---------------------------------------------------------------------------------------------
# Polling and memory sampling.
# ---------------------------------------------------------------------------------------------
interval=$(awk -v m="$POLL_MS" 'BEGIN { print m / 1000 }')
# Start bigpoll.py on a receiver with a condition; returns once it is connected.
start_poller() { # system sql timeout
    local c=${receiver[$1]}
    rm -f "$work/poll.out"
    python3 "$here/bigpoll.py" 127.0.0.1 "${port[$c]}" --sql "$2" --interval "$interval" --timeout "$3" \
        >"$work/poll.out" 2>>"$work/logs/poll.err" &
    poll_pid=$!
    local deadline=$((SECONDS + 30))
    until grep -q '^ready$' "$work/poll.out" 2>/dev/null; do
        if ! kill -0 "$poll_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            cat "$work/logs/poll.err" >&2
            die "bigpoll.py could not connect to $c"
        fi
        sleep 0.02
    done
}
# Wait for the poller; on the pgmm pair, give up early if a node exits. 0 = condition seen.
finish_poller() { # system
    local rc=0 node
    while kill -0 "$poll_pid" 2>/dev/null; do
        if [[ $1 == pgmm ]]; then
            for node in a b; do
                if ! kill -0 "${pgmm_pid[$node]}" 2>/dev/null; then
                    log "pgmm node $node exited while the receiver was catching up; tail of its log:"
                    tail -n 30 "$work/logs/pgmm-$node.log" >&2
                    kill "$poll_pid" 2>/dev/null || true
                    break 2
                fi
            done
        fi
        sleep 0.1
    done
    wait "$poll_pid" 2>/dev/null || rc=$?
    poll_pid=""
    grep -q '^done ' "$work/poll.out" || rc=1
    return "$rc"
}
wait_cond() { start_poller "$@"; finish_poller "$1"; }

# The processes that replicate: native walsender on n1 and apply worker on n2; pgmm a and b.
repl_pids() { # system -> "snd=PID rcv=PID"
    if [[ $1 == native ]]; then
        local w a
        w=$(val n1 "SELECT pid FROM pg_stat_replication WHERE application_name = 'bench_sub'" | head -n 1)
        a=$(val n2 "SELECT pid FROM pg_stat_subscription WHERE subname = 'bench_sub' AND relid IS NULL AND pid IS NOT NULL" | head -n 1)
        [[ -n "$w" && -n "$a" ]] || die "native: no walsender ('$w') or apply worker ('$a') pid"
        echo "snd=$w rcv=$a"
    else
        echo "snd=${pgmm_pid[a]} rcv=${pgmm_pid[b]}"
    fi
}
start_rss() { # system
    rm -f "$work/rss.out" "$work/rss.out.tmp"
    # shellcheck disable=SC2046  # word splitting of NAME=PID pairs is intended
    python3 "$here/rsssample.py" "$work/rss.out" --interval 0.1 $(repl_pids "$1") &
    rss_pid=$!
    local deadline=$((SECONDS + 10))
    until [[ -f "$work/rss.out.tmp" ]]; do
        ((SECONDS < deadline)) || die "rsssample.py did not start"
        sleep 0.02
    done
}
stop_rss() {
    kill -TERM "$rss_pid" 2>/dev/null || true
    wait "$rss_pid" 2>/dev/null || true
    rss_pid=""
}
mib() { awk -v k="$1" 'BEGIN { printf "%.0f", k / 1024 }'; }

# A first transaction through each system proves the pipeline; it is deleted again (and the
# delete waited for) so that every receiver starts the measurements with an empty table.
for s in $SYSTEMS; do
    val "${sender[$s]}" "INSERT INTO bench_big (id, v) VALUES (0, 'warm-up')" >/dev/null
    wait_cond "$s" "SELECT exists (SELECT 1 FROM bench_big WHERE id = 0)" 60 ||
        die "$s: a first transaction did not reach the receiver within 60 s"
    val "${sender[$s]}" "DELETE FROM bench_big WHERE id = 0" >/dev/null
    wait_cond "$s" "SELECT NOT exists (SELECT 1 FROM bench_big)" 60 ||
        die "$s: the warm-up delete did not reach the receiver within 60 s"
    log "$s: replication works (warm-up insert and delete applied, receiver empty)"
done

# ---------------------------------------------------------------------------------------------
# Measurements.
# ---------------------------------------------------------------------------------------------
declare -A r_commit r_secs r_rps r_snd_rss r_snd_anon r_rcv_rss r_rcv_anon r_snd_hwm r_rcv_hwm broken
[[ -n "${CSV:-}" ]] && echo "round,system,phase,rows,commit_s,seconds,rows_per_s,snd_rss_mib,snd_anon_mib,rcv_rss_mib,rcv_anon_mib,snd_hwm_mib,rcv_hwm_mib,check" >"$CSV"

# Round r uses ids (r-1)*ROWS+1 .. r*ROWS, so a later round's receiver holds the earlier rounds' rows.
phase() { # system round kind(insert|update)
    local s=$1 r=$2 kind=$3 off=$((($2 - 1) * ROWS)) n stmt cond check_sql
    if [[ $kind == insert ]]; then
        n=$ROWS
        stmt="INSERT INTO bench_big (id, v) SELECT g, md5(g::text) || md5((g + 1)::text)
              FROM generate_series($((off + 1)), $((off + ROWS))) g"
        cond="SELECT exists (SELECT 1 FROM bench_big WHERE id = $((off + ROWS)))"
        check_sql="SELECT count(*) FROM bench_big WHERE id BETWEEN $((off + 1)) AND $((off + ROWS))"
    else
        n=$UPDATE_ROWS
        stmt="UPDATE bench_big SET v = v || 'x' WHERE id BETWEEN $((off + 1)) AND $((off + UPDATE_ROWS))"
        cond="SELECT exists (SELECT 1 FROM bench_big WHERE id = $((off + UPDATE_ROWS)) AND v LIKE '%x')"
        check_sql="SELECT count(*) FROM bench_big WHERE id BETWEEN $((off + 1)) AND $((off + UPDATE_ROWS)) AND v LIKE '%x'"
    fi
    local key="$s/$kind" c
    for c in "${sender[$s]}" "${receiver[$s]}"; do val "$c" CHECKPOINT >/dev/null; done
    start_rss "$s"
    start_poller "$s" "$cond" "$CATCHUP_TIMEOUT"
    local t0 t1 done_t
    t0=$EPOCHREALTIME
    # One statement in autocommit: one transaction; psql returns after its COMMIT.
    val "${sender[$s]}" "$stmt" >/dev/null
    t1=$EPOCHREALTIME
    if ! finish_poller "$s"; then
        stop_rss
        log "$kind $s (round $r): the receiver did not have the transaction within CATCHUP_TIMEOUT=$CATCHUP_TIMEOUT s" \
            "(receiver rows: $(val "${receiver[$s]}" 'SELECT count(*) FROM bench_big'))"
        if [[ $s == pgmm ]]; then
            tail -n 20 "$work/logs/pgmm-a.log" | sed 's/^/  a| /' >&2
            tail -n 20 "$work/logs/pgmm-b.log" | sed 's/^/  b| /' >&2
        fi
        r_commit[$key]+="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }') "
        local arr
        for arr in r_secs r_rps r_snd_rss r_snd_anon r_rcv_rss r_rcv_anon r_snd_hwm r_rcv_hwm; do
            declare -n ref=$arr; ref[$key]+="ERR "; unset -n ref
        done
        broken[$s]=1
        return 0
    fi
    stop_rss
    done_t=$(awk '/^done / { print $2 }' "$work/poll.out")
    local commit secs rps got check
    commit=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", b - a }')
    secs=$(awk -v a="$t1" -v b="$done_t" 'BEGIN { d = b - a; printf "%.3f", (d > 0 ? d : 0) }')
    rps=$(awk -v n="$n" -v d="$secs" 'BEGIN { printf "%.0f", (d > 0 ? n / d : 0) }')
    got=$(val "${receiver[$s]}" "$check_sql")
    if [[ "$got" == "$n" ]]; then check=ok; else check="MISMATCH($got/$n)"; broken[$s]=1; fi
    local sr sa rr ra sh rh
    read -r _ _ sr sa sh < <(grep '^snd ' "$work/rss.out")
    read -r _ _ rr ra rh < <(grep '^rcv ' "$work/rss.out")
    sr=$(mib "$sr") sa=$(mib "$sa") rr=$(mib "$rr") ra=$(mib "$ra") sh=$(mib "$sh") rh=$(mib "$rh")
    if [[ $s == native ]]; then sh=- rh=-; fi
    r_commit[$key]+="$commit "; r_secs[$key]+="$secs "; r_rps[$key]+="$rps "
    r_snd_rss[$key]+="$sr "; r_snd_anon[$key]+="$sa "; r_rcv_rss[$key]+="$rr "; r_rcv_anon[$key]+="$ra "
    r_snd_hwm[$key]+="$sh "; r_rcv_hwm[$key]+="$rh "
    log "round $r  $(printf '%-6s %-6s' "$kind" "$s") $n rows: commit ${commit} s, then ${secs} s to the receiver" \
        "(${rps} rows/s); peak RSS MiB sender $sr (anon $sa), receiver $rr (anon $ra); data $check"
    [[ -n "${CSV:-}" ]] && echo "$r,$s,$kind,$n,$commit,$secs,$rps,$sr,$sa,$rr,$ra,$sh,$rh,$check" >>"$CSV"
    return 0
}

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "$ROUNDS round(s) x [$SYSTEMS]: INSERT of $ROWS rows, UPDATE of $UPDATE_ROWS rows, one transaction each"
for round in $(seq "$ROUNDS"); do
    for kind in insert update; do
        for s in $SYSTEMS; do [[ -n "${broken[$s]:-}" ]] || phase "$s" "$round" "$kind"; done
    done
done

# ---------------------------------------------------------------------------------------------
# Report.
# ---------------------------------------------------------------------------------------------
median() {
    python3 -c '
import statistics, sys
d = int(sys.argv[1])
v = [float(x) for x in sys.argv[2:] if x not in ("ERR", "-")]
print(f"{statistics.median(v):.{d}f}" if v else ("-" if "-" in sys.argv[2:] else "ERR"))' "$@"
}
ratio() {
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "ERR" || b == "ERR" || a == "-" || b == "-" || a == "" || b == "" || b == 0) print "-"; else printf "%.3f", a / b }'
}
both() { has native && has pgmm; }
row() { # title decimals array kind
    local title=$1 d=$2 kind=$4 s n="" p="" m
    local -n ref=$3
    printf '  %-38s' "$title"
    for s in $SYSTEMS; do
        # shellcheck disable=SC2086
        m=$(median "$d" ${ref[$s/$kind]:-ERR})
        printf ' %11s' "$m"
        [[ $s == native ]] && n=$m
        [[ $s == pgmm ]] && p=$m
    done
    both && printf ' %12s' "$(ratio "$p" "$n")"
    printf '\n'
}
header() {
    printf '  %-38s' "$1"
    for s in $SYSTEMS; do printf ' %11s' "$s"; done
    both && printf ' %12s' "pgmm/native"
    printf '\n'
}

echo
echo "large single transactions, pgmm vs PostgreSQL logical replication: $ROUNDS round(s), systems alternated"
echo "Postgres $("$PG_BINDIR/postgres" --version | awk '{ print $3 }'), $(nproc) CPUs, load average at start $load_start," \
    "at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo "time from the COMMIT returning on the sender until the receiver has the transaction (median over rounds);"
echo "peak memory in MiB, sampled every 100 ms during the phase: sender = native walsender / pgmm a,"
echo "receiver = native apply worker / pgmm b (a backend's VmRSS includes the shared buffers it touched;"
echo "RssAnon excludes shared memory; VmHWM is pgmm's peak over its whole life so far, cumulative over phases)"
for kind in insert update; do
    echo
    if [[ $kind == insert ]]; then
        echo "INSERT of $ROWS rows (md5||md5, about 120 bytes per row) in one transaction"
    else
        echo "UPDATE of $UPDATE_ROWS rows (v = v || 'x') in one transaction"
    fi
    header ""
    row "sender statement + COMMIT (s)" 3 r_commit "$kind"
    row "seconds after COMMIT to the receiver" 3 r_secs "$kind"
    row "rows/s" 0 r_rps "$kind"
    row "sender peak VmRSS (MiB)" 0 r_snd_rss "$kind"
    row "sender peak RssAnon (MiB)" 0 r_snd_anon "$kind"
    row "receiver peak VmRSS (MiB)" 0 r_rcv_rss "$kind"
    row "receiver peak RssAnon (MiB)" 0 r_rcv_anon "$kind"
    if has pgmm; then
        row "pgmm a VmHWM, lifetime (MiB)" 0 r_snd_hwm "$kind"
        row "pgmm b VmHWM, lifetime (MiB)" 0 r_rcv_hwm "$kind"
    fi
done
echo
echo "all runs (in round order):"
for kind in insert update; do
    for s in $SYSTEMS; do
        printf '  %-6s %-6s seconds %s  rows/s %s\n' "$kind" "$s" "${r_secs[$s/$kind]:-skipped}" "${r_rps[$s/$kind]:-skipped}"
    done
done
status=0
for s in $SYSTEMS; do
    if [[ -n "${broken[$s]:-}" ]]; then
        echo "  $s: FAILED (timeout, a node exiting or a data mismatch; see the [bigtx] lines above)"
        status=1
    fi
done
if has pgmm; then
    echo "pgmm.conflicts rows on node b: $(val p2 'SELECT count(*) FROM pgmm.conflicts' 2>/dev/null || echo '?')"
fi
exit "$status"
