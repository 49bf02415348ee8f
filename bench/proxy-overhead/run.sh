#!/usr/bin/env bash
# Proxy overhead benchmark: direct Postgres vs pgmm vs PgBouncer (session mode).
#
# Starts a throwaway Postgres, pgmm and PgBouncer, runs pgbench against each of the three over
# 127.0.0.1 TCP, alternating targets within every round so that drift of a shared machine hits all
# three alike, and prints the median TPS and the ratios to direct. Then measures the resident
# memory each proxy needs per idle client session. See README.md next to this file.
#
# Environment: DURATION (s per pgbench run, default 20), ROUNDS (default 3), QUICK=1 (DURATION=5,
# ROUNDS=1), TARGETS (default "direct pgmm pgbouncer"), IDLE_CLIENTS (default 200), SCALE (default
# 10), PG_BINDIR (Postgres binaries), PGBOUNCER (pgbouncer binary), CSV (write per-run results there),
# NO_BUILD=1 (use an existing target/release/pgmm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

if [[ "${QUICK:-0}" == 1 ]]; then
    DURATION=${DURATION:-5}
    ROUNDS=${ROUNDS:-1}
fi
DURATION=${DURATION:-20}
ROUNDS=${ROUNDS:-3}
TARGETS=${TARGETS:-direct pgmm pgbouncer}
IDLE_CLIENTS=${IDLE_CLIENTS:-200}
SCALE=${SCALE:-10}
CLIENTS=8
THREADS=2

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf 'bench/proxy-overhead: %s\n' "$*" >&2; exit 2; }

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
for tool in initdb pg_ctl postgres pgbench psql pg_isready; do
    if [[ -z "$PG_BINDIR" || ! -x "$PG_BINDIR/$tool" ]]; then
        missing+=("$tool (PostgreSQL server binaries; looked in ${PG_BINDIR:-/usr/lib/postgresql/*/bin and pg_config --bindir})")
    fi
done
PGBOUNCER=${PGBOUNCER:-$(command -v pgbouncer || { [[ -x /usr/sbin/pgbouncer ]] && echo /usr/sbin/pgbouncer; } || true)}
if [[ " $TARGETS " == *" pgbouncer "* && -z "$PGBOUNCER" ]]; then
    missing+=("pgbouncer")
fi
command -v python3 >/dev/null 2>&1 || missing+=("python3")
command -v cargo >/dev/null 2>&1 || [[ "${NO_BUILD:-0}" == 1 ]] || missing+=("cargo (Rust toolchain)")
if ((${#missing[@]})); then
    printf 'bench/proxy-overhead: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    printf 'On Debian/Ubuntu: apt-get install -y postgresql pgbouncer python3\n' >&2
    exit 2
fi

# initdb, postgres and pgbouncer refuse to run as root: run them as the postgres system user.
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
if [[ " $TARGETS " == *" pgmm "* ]]; then
    if [[ "${NO_BUILD:-0}" != 1 ]]; then
        log "building pgmm (cargo build --release -p pgmm)"
        (cd "$repo" && cargo build --release -p pgmm >&2) || die "cargo build --release -p pgmm failed"
    fi
    [[ -x "$PGMM" ]] || die "$PGMM not found (build failed or NO_BUILD=1 without a build)"
fi

# ---------------------------------------------------------------------------------------------
# Scratch space and cleanup.
# ---------------------------------------------------------------------------------------------
work=$(mktemp -d "${TMPDIR:-/tmp}/pgmm-bench.XXXXXX")
chmod 755 "$work"
mkdir "$work/data" "$work/run" "$work/logs"
[[ $(id -u) == 0 ]] && chown postgres: "$work/data" "$work/run" "$work/logs"

pgmm_pid=""
idle_pid=""
pg_started=0
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    exec 7>&-
    if [[ -n "$idle_pid" ]]; then kill "$idle_pid" 2>/dev/null || true; wait "$idle_pid" 2>/dev/null || true; fi
    if [[ -n "$pgmm_pid" ]]; then
        kill -TERM "$pgmm_pid" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "$pgmm_pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pgmm_pid" 2>/dev/null || true
        wait "$pgmm_pid" 2>/dev/null || true
    fi
    if [[ -f "$work/run/pgbouncer.pid" ]]; then
        local bpid
        bpid=$(cat "$work/run/pgbouncer.pid" 2>/dev/null || true)
        if [[ -n "$bpid" ]]; then
            kill -INT "$bpid" 2>/dev/null || true
            for _ in $(seq 50); do kill -0 "$bpid" 2>/dev/null || break; sleep 0.1; done
            kill -KILL "$bpid" 2>/dev/null || true
        fi
    fi
    if ((pg_started)); then
        as_db "$PG_BINDIR/pg_ctl" -D "$work/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
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

# Four distinct free ports, chosen while all four are bound so they cannot collide.
read -r pg_port pgmm_port metrics_port bouncer_port < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(4):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)

# ---------------------------------------------------------------------------------------------
# Postgres.
# ---------------------------------------------------------------------------------------------
log "initdb ($PG_BINDIR) into $work/data"
as_db "$PG_BINDIR/initdb" -D "$work/data" -U postgres -A trust -E UTF8 --no-sync \
    >"$work/logs/initdb.log" 2>&1 || { cat "$work/logs/initdb.log" >&2; die "initdb failed"; }
cat >>"$work/data/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$work/run'
wal_level = logical
max_connections = 300
shared_buffers = 256MB
EOF
log "starting Postgres on 127.0.0.1:$pg_port"
pg_started=1
as_db "$PG_BINDIR/pg_ctl" -D "$work/data" -l "$work/logs/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$work/logs/postgres.log" >&2; die "Postgres did not start"; }

PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -d postgres)
PGBENCH="$PG_BINDIR/pgbench"

log "pgbench -i -s $SCALE"
"$PGBENCH" -h 127.0.0.1 -p "$pg_port" -U postgres -i -s "$SCALE" -q postgres \
    >"$work/logs/pgbench-init.log" 2>&1 || { cat "$work/logs/pgbench-init.log" >&2; die "pgbench -i failed"; }
"${PSQL[@]}" -h 127.0.0.1 -p "$pg_port" -c 'CHECKPOINT' >/dev/null

# Wait until a query succeeds through host:port (deadline in seconds).
wait_query() {
    local port=$1 deadline=$((SECONDS + $2))
    until "${PSQL[@]}" -h 127.0.0.1 -p "$port" -tAc 'SELECT 1' >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# ---------------------------------------------------------------------------------------------
# pgmm.
# ---------------------------------------------------------------------------------------------
start_pgmm() {
    cat >"$work/pgmm.toml" <<EOF
[node]
name = "a"
[cluster]
name = "bench"
nodes = ["a", "b"]
[client]
listen = "127.0.0.1:$pgmm_port"
shutdown_grace_seconds = 2
[postgres]
url = "$(pgmm_backend_url)"
[metrics]
listen = "127.0.0.1:$metrics_port"
# An ownership rule on a table the workload does not touch, so the front door's ownership path
# (the pre-filter that decides whether a statement must be parsed) is measured as deployed.
[[ownership]]
table = "public.owned_by_b"
owner = "b"
EOF
    log "starting pgmm on 127.0.0.1:$pgmm_port"
    "$PGMM" serve --config "$work/pgmm.toml" >"$work/logs/pgmm.log" 2>&1 &
    pgmm_pid=$!
    if ! wait_query "$pgmm_port" 30; then
        tail -n 30 "$work/logs/pgmm.log" >&2
        die "pgmm does not relay 'SELECT 1' to Postgres within 30 s"
    fi
}

# ---------------------------------------------------------------------------------------------
# PgBouncer, session mode.
# ---------------------------------------------------------------------------------------------
# Both proxies reach Postgres the same way: over its Unix socket (BACKEND=unix, the default,
# the way a proxy beside its Postgres is deployed) or over 127.0.0.1 TCP (BACKEND=tcp).
backend_host() {
    if [ "${BACKEND:-unix}" = tcp ]; then echo 127.0.0.1; else echo "$work/run"; fi
}
pgmm_backend_url() {
    local host
    host=$(backend_host)
    echo "postgresql://postgres@${host//\//%2F}:$pg_port/postgres"
}
bouncer_pid() { cat "$work/run/pgbouncer.pid"; }
start_pgbouncer() {
    echo '"postgres" ""' >"$work/run/userlist.txt"
    cat >"$work/run/pgbouncer.ini" <<EOF
[databases]
postgres = host=$(backend_host) port=$pg_port dbname=postgres

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $bouncer_port
unix_socket_dir =
auth_type = trust
auth_file = $work/run/userlist.txt
pool_mode = session
max_client_conn = 400
default_pool_size = 300
logfile = $work/logs/pgbouncer.log
pidfile = $work/run/pgbouncer.pid
ignore_startup_parameters = extra_float_digits
EOF
    [[ $(id -u) == 0 ]] && chown postgres: "$work/run/userlist.txt" "$work/run/pgbouncer.ini"
    log "starting PgBouncer ($("$PGBOUNCER" --version | head -n 1)) on 127.0.0.1:$bouncer_port"
    as_db "$PGBOUNCER" -d -q "$work/run/pgbouncer.ini" \
        || { tail -n 20 "$work/logs/pgbouncer.log" >&2; die "PgBouncer did not start"; }
    if ! wait_query "$bouncer_port" 30; then
        tail -n 20 "$work/logs/pgbouncer.log" >&2
        die "PgBouncer does not relay 'SELECT 1' within 30 s"
    fi
}

port_of() {
    case $1 in
        direct) echo "$pg_port" ;;
        pgmm) echo "$pgmm_port" ;;
        pgbouncer) echo "$bouncer_port" ;;
        *) die "unknown target '$1' (TARGETS may hold direct, pgmm, pgbouncer)" ;;
    esac
}
pid_of() {
    case $1 in
        pgmm) echo "$pgmm_pid" ;;
        pgbouncer) bouncer_pid ;;
    esac
}

for t in $TARGETS; do port_of "$t" >/dev/null; done
[[ " $TARGETS " == *" pgmm "* ]] && start_pgmm
[[ " $TARGETS " == *" pgbouncer "* ]] && start_pgbouncer

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status"; }

# ---------------------------------------------------------------------------------------------
# Idle memory, measured first on fresh processes (after one warm-up session), so that memory
# the allocator keeps from the throughput runs cannot hide the per-session cost.
# ---------------------------------------------------------------------------------------------
declare -A idle_per_session idle_before idle_with idle_backends
measure_idle() {
    local target=$1 port pid before with
    port=$(port_of "$target")
    pid=$(pid_of "$target")
    "${PSQL[@]}" -h 127.0.0.1 -p "$port" -tAc 'SELECT 1' >/dev/null
    before=$(rss_kib "$pid")
    rm -f "$work/idle.in" "$work/idle.out"
    mkfifo "$work/idle.in"
    python3 "$here/idle_clients.py" 127.0.0.1 "$port" postgres postgres "$IDLE_CLIENTS" \
        <"$work/idle.in" >"$work/idle.out" 2>"$work/logs/idle-$target.log" &
    idle_pid=$!
    exec 7>"$work/idle.in"
    local deadline=$((SECONDS + 90))
    until grep -q '^ready$' "$work/idle.out" 2>/dev/null; do
        if ! kill -0 "$idle_pid" 2>/dev/null || ((SECONDS >= deadline)); then
            cat "$work/logs/idle-$target.log" >&2
            exec 7>&-
            wait "$idle_pid" 2>/dev/null || true
            idle_pid=""
            log "idle measurement for $target failed"
            idle_per_session[$target]="ERR"
            return 0
        fi
        sleep 0.1
    done
    # Let the proxy settle (buffers handed back, last startup messages relayed) before reading.
    sleep 1
    with=$(rss_kib "$pid")
    # How many Postgres backends the proxy holds for those idle clients: pgmm opens one per
    # client; PgBouncer only assigns a server connection on the first query.
    idle_backends[$target]=$("${PSQL[@]}" -h 127.0.0.1 -p "$pg_port" -tAc \
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgmm-bench-idle'")
    exec 7>&-
    wait "$idle_pid" 2>/dev/null || true
    idle_pid=""
    idle_before[$target]=$before
    idle_with[$target]=$with
    idle_per_session[$target]=$(awk -v a="$before" -v b="$with" -v n="$IDLE_CLIENTS" \
        'BEGIN { printf "%.1f", (b - a) / n }')
    log "idle $target: RSS ${before} KiB -> ${with} KiB with $IDLE_CLIENTS idle sessions = ${idle_per_session[$target]} KiB/session"
    # Wait for the sessions to be gone from Postgres before going on.
    deadline=$((SECONDS + 30))
    until (($("${PSQL[@]}" -h 127.0.0.1 -p "$pg_port" -tAc \
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgmm-bench-idle'") == 0)); do
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
}

for t in $TARGETS; do
    [[ $t == direct ]] && continue
    measure_idle "$t"
done

# ---------------------------------------------------------------------------------------------
# Throughput: rounds of (workload x target), targets alternated inside each round.
# ---------------------------------------------------------------------------------------------
WORKLOADS=(select tpcb)
declare -A wl_args=([select]="-S -M prepared" [tpcb]="-M simple")
declare -A wl_title=([select]="select-only -M prepared" [tpcb]="TPC-B -M simple")
declare -A tps failed cpu_us
clk_tck=$(getconf CLK_TCK)
# utime + stime of a process, in clock ticks: the proxy's own CPU cost per transaction is a
# steadier figure than TPS on a machine shared with other work.
cpu_ticks() { awk '{ sub(/^.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }
[[ -n "${CSV:-}" ]] && echo "round,workload,target,tps,failed" >"$CSV"

load_start=$(cut -d' ' -f1-3 /proc/loadavg)
log "throughput: $ROUNDS round(s) x ${#WORKLOADS[@]} workloads x targets [$TARGETS], ${DURATION}s each, -c $CLIENTS -j $THREADS"
for round in $(seq "$ROUNDS"); do
    for wl in "${WORKLOADS[@]}"; do
        for t in $TARGETS; do
            out="$work/logs/pgbench-r$round-$wl-$t.log"
            ppid=$(pid_of "$t")
            [[ -n "$ppid" ]] && cpu0=$(cpu_ticks "$ppid")
            # shellcheck disable=SC2086
            if "$PGBENCH" -h 127.0.0.1 -p "$(port_of "$t")" -U postgres ${wl_args[$wl]} \
                -c "$CLIENTS" -j "$THREADS" -T "$DURATION" postgres >"$out" 2>&1; then :; else
                log "pgbench exited with status $? for $t/$wl (round $round); tail of its output:"
                tail -n 5 "$out" >&2
            fi
            v=$(sed -n 's/^tps = \([0-9.]*\) (without initial connection time).*/\1/p' "$out")
            f=$(sed -n 's/^number of failed transactions: \([0-9]*\).*/\1/p' "$out")
            n=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$out")
            if [[ -n "$ppid" && -n "$n" && "$n" != 0 ]]; then
                cpu1=$(cpu_ticks "$ppid")
                cpu_us[$wl,$t]+="$(awk -v d=$((cpu1 - cpu0)) -v hz="$clk_tck" -v n="$n" \
                    'BEGIN { printf "%.2f", d / hz * 1e6 / n }') "
            fi
            [[ -n "$v" ]] && v=$(printf '%.1f' "$v") || v=ERR
            f=${f:-0}
            tps[$wl,$t]+="$v "
            failed[$wl,$t]=$((${failed[$wl,$t]:-0} + f))
            log "round $round  $(printf '%-24s %-9s' "${wl_title[$wl]}" "$t") tps=$v failed=$f"
            [[ -n "${CSV:-}" ]] && echo "$round,$wl,$t,$v,$f" >>"$CSV"
        done
    done
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
    awk -v a="$1" -v b="$2" 'BEGIN { if (a == "ERR" || b == "ERR" || b == 0) print "-"; else printf "%.3f", a / b }'
}

declare -A med
for wl in "${WORKLOADS[@]}"; do
    for t in $TARGETS; do
        # shellcheck disable=SC2086
        med[$wl,$t]=$(median 1 ${tps[$wl,$t]})
    done
done

has() { [[ " $TARGETS " == *" $1 "* ]]; }
echo
echo "pgmm proxy overhead: pgbench -c $CLIENTS -j $THREADS -T $DURATION, scale $SCALE, $ROUNDS round(s), median TPS"
echo "Postgres $("$PG_BINDIR/postgres" --version | awk '{ print $3 }'), $(nproc) CPUs, all clients over 127.0.0.1 TCP," \
    "load average at start $load_start, at end $(cut -d' ' -f1-3 /proc/loadavg)"
echo
printf '%-24s' "workload"
for t in $TARGETS; do printf ' %11s' "$t"; done
has direct && has pgmm && printf ' %12s' "pgmm/direct"
has direct && has pgbouncer && printf ' %12s' "pgbnc/direct"
has pgmm && has pgbouncer && printf ' %11s' "pgmm/pgbnc"
printf '  failed (%s)\n' "${TARGETS// //}"
for wl in "${WORKLOADS[@]}"; do
    printf '%-24s' "${wl_title[$wl]}"
    for t in $TARGETS; do printf ' %11s' "${med[$wl,$t]}"; done
    has direct && has pgmm && printf ' %12s' "$(ratio "${med[$wl,pgmm]}" "${med[$wl,direct]}")"
    has direct && has pgbouncer && printf ' %12s' "$(ratio "${med[$wl,pgbouncer]}" "${med[$wl,direct]}")"
    has pgmm && has pgbouncer && printf ' %11s' "$(ratio "${med[$wl,pgmm]}" "${med[$wl,pgbouncer]}")"
    printf '  '
    sep=""
    for t in $TARGETS; do printf '%s%s' "$sep" "${failed[$wl,$t]}"; sep="/"; done
    printf '\n'
done
echo
echo "all runs (TPS, in round order):"
for wl in "${WORKLOADS[@]}"; do
    for t in $TARGETS; do
        printf '  %-24s %-10s %s\n' "${wl_title[$wl]}" "$t" "${tps[$wl,$t]% }"
    done
done

# Ratios within each round compare runs made minutes apart only, so they are less exposed to
# slow drift of a shared machine than the ratio of medians.
per_round_ratios() {
    local -a a b
    read -r -a a <<<"$1"
    read -r -a b <<<"$2"
    local out="" i
    for i in "${!a[@]}"; do out+="$(ratio "${a[$i]}" "${b[$i]:-ERR}") "; done
    echo "${out% }"
}
if has direct && { has pgmm || has pgbouncer; }; then
    echo
    echo "ratio to direct within each round (median; per round):"
    for wl in "${WORKLOADS[@]}"; do
        for t in pgmm pgbouncer; do
            has "$t" || continue
            r=$(per_round_ratios "${tps[$wl,$t]}" "${tps[$wl,direct]}")
            # shellcheck disable=SC2086
            printf '  %-24s %-17s %s  (%s)\n' "${wl_title[$wl]}" "$t/direct" "$(median 3 $r)" "$r"
        done
    done
fi

if has pgmm || has pgbouncer; then
    echo
    echo "proxy CPU time (user+system) per transaction, median over rounds:"
    for wl in "${WORKLOADS[@]}"; do
        for t in pgmm pgbouncer; do
            has "$t" || continue
            # shellcheck disable=SC2086
            printf '  %-24s %-10s %8s us\n' "${wl_title[$wl]}" "$t" "$(median 1 ${cpu_us[$wl,$t]:-ERR})"
        done
    done
fi

if has pgmm || has pgbouncer; then
    echo
    echo "idle memory: $IDLE_CLIENTS idle sessions (startup done, waiting at ReadyForQuery)"
    printf '%-10s %14s %14s %16s %18s\n' "proxy" "RSS before" "RSS with" "per session" "Postgres backends"
    for t in $TARGETS; do
        [[ $t == direct ]] && continue
        if [[ ${idle_per_session[$t]} == ERR ]]; then
            printf '%-10s %14s %14s %16s %18s\n' "$t" "-" "-" "ERR" "-"
        else
            printf '%-10s %10s KiB %10s KiB %12s KiB %18s\n' "$t" "${idle_before[$t]}" "${idle_with[$t]}" \
                "${idle_per_session[$t]}" "${idle_backends[$t]}"
        fi
    done
fi
