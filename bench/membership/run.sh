#!/usr/bin/env bash
# Join benchmark: how fast does a node joining with `[node] join_from` get the donor's data,
# compared with `pg_dump -Fc | pg_restore` of the same tables between the same two servers?
#
# Two throwaway clusters: "src" (pgmm node a, the donor, holding the data) and "dst" (pgmm node
# b's Postgres, also the target of pg_restore). Every round runs, alternately:
#   - dump: pg_dump -Fc -t <the tables> from src | pg_restore -d <fresh database> on dst;
#   - dump-z0: the same without compression (-Z0), the cheapest pg_dump form;
#   - join: a fresh database on dst, pgmm b started on it with join_from = "a"; timed until
#     b's /readyz answers 200 (the copy, its keys and indexes, and b's start), with the join's
#     own duration from its log line and b's peak RSS (VmHWM).
# Prints per-round times, medians and the ratio join / dump (below 1: the join is faster).
#
# Environment: ROUNDS (default 3), ACCOUNTS (rows, default 1000000), ORDERS (rows, default
# 1000000), DOCS (rows of ~96 kB, default 2000), PG_BINDIR, NO_BUILD=1 (use target/release/pgmm),
# KEEP=1 (keep the temp dir), QUICK=1 (1 round, a tenth of the rows).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

if [[ "${QUICK:-0}" == 1 ]]; then
    ROUNDS=${ROUNDS:-1}
    ACCOUNTS=${ACCOUNTS:-100000}
    ORDERS=${ORDERS:-100000}
    DOCS=${DOCS:-200}
fi
ROUNDS=${ROUNDS:-3}
ACCOUNTS=${ACCOUNTS:-1000000}
ORDERS=${ORDERS:-1000000}
DOCS=${DOCS:-2000}

log() { printf '[bench] %s\n' "$*" >&2; }
die() { printf 'bench/membership: %s\n' "$*" >&2; exit 2; }

find_pg_bindir() {
    if [[ -n "${PG_BINDIR:-}" ]]; then echo "$PG_BINDIR"; return; fi
    local newest
    newest=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -n "$newest" ]]; then echo "$newest"; return; fi
    if command -v pg_config >/dev/null 2>&1; then pg_config --bindir; return; fi
}
missing=()
PG_BINDIR=$(find_pg_bindir || true)
for tool in initdb pg_ctl postgres psql pg_dump pg_restore; do
    [[ -n "$PG_BINDIR" && -x "$PG_BINDIR/$tool" ]] || missing+=("$tool (PostgreSQL server binaries)")
done
command -v python3 >/dev/null 2>&1 || missing+=("python3")
command -v curl >/dev/null 2>&1 || missing+=("curl")
[[ "${NO_BUILD:-0}" == 1 ]] || command -v cargo >/dev/null 2>&1 || missing+=("cargo (Rust toolchain)")
if ((${#missing[@]})); then
    printf 'bench/membership: missing prerequisites:\n' >&2
    printf '  - %s\n' "${missing[@]}" >&2
    exit 2
fi
if [[ $(id -u) == 0 ]]; then
    id -u postgres >/dev/null 2>&1 || die "running as root but there is no 'postgres' system user"
    as_db() { runuser -u postgres -- "$@"; }
else
    as_db() { "$@"; }
fi

PGMM="$repo/target/release/pgmm"
if [[ "${NO_BUILD:-0}" != 1 ]]; then
    log "building pgmm (cargo build --release -p pgmm)"
    (cd "$repo" && cargo build --release -p pgmm >&2) || die "cargo build --release -p pgmm failed"
fi
[[ -x "$PGMM" ]] || die "$PGMM not found"

work=$(mktemp -d "${TMPDIR:-/tmp}/pgmm-join.XXXXXX")
chmod 755 "$work"
mkdir "$work/logs" "$work/run" "$work/data-src" "$work/data-dst" "$work/run/src" "$work/run/dst"
[[ $(id -u) == 0 ]] && chown -R postgres: "$work/logs" "$work/run" "$work"/data-*

declare -A pgmm_pid=()
declare -A pg_started=()
stop_pgmm() {
    local node=$1 pid=${pgmm_pid[$1]:-}
    [[ -n "$pid" ]] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    pgmm_pid[$node]=""
}
cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    for node in a b; do stop_pgmm "$node" >/dev/null 2>&1 || true; done
    for c in "${!pg_started[@]}"; do
        as_db "$PG_BINDIR/pg_ctl" -D "$work/data-$c" -m immediate -w stop >/dev/null 2>&1 || true
    done
    if [[ "${KEEP:-0}" == 1 ]]; then log "KEEP=1: logs left in $work"; else rm -rf "$work"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

read -r -a free_ports < <(python3 - <<'EOF'
import socket
socks = []
for _ in range(8):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(*(s.getsockname()[1] for s in socks))
EOF
)
declare -A port=([src]=${free_ports[0]} [dst]=${free_ports[1]})
declare -A client_port=([a]=${free_ports[2]} [b]=${free_ports[3]})
declare -A metrics_port=([a]=${free_ports[4]} [b]=${free_ports[5]})
declare -A peer_port=([a]=${free_ports[6]} [b]=${free_ports[7]})
PSQL=("$PG_BINDIR/psql" -X -q -v ON_ERROR_STOP=1 -U postgres -h 127.0.0.1)
sql() { local c=$1 db=$2; shift 2; "${PSQL[@]}" -p "${port[$c]}" -d "$db" "$@"; }

log "initdb ($PG_BINDIR) x 2 into $work"
for c in src dst; do
    as_db "$PG_BINDIR/initdb" -D "$work/data-$c" -U postgres -A trust -E UTF8 --no-sync \
        >"$work/logs/initdb-$c.log" 2>&1 || { cat "$work/logs/initdb-$c.log" >&2; die "initdb $c failed"; }
    cat >>"$work/data-$c/postgresql.conf" <<EOF
listen_addresses = '127.0.0.1'
port = ${port[$c]}
unix_socket_directories = '$work/run/$c'
wal_level = logical
track_commit_timestamp = on
shared_buffers = 128MB
max_wal_size = 8GB
checkpoint_timeout = 1h
max_replication_slots = 10
max_wal_senders = 10
EOF
    pg_started[$c]=1
    as_db "$PG_BINDIR/pg_ctl" -D "$work/data-$c" -l "$work/logs/postgres-$c.log" -w -t 60 start >/dev/null \
        || { tail -n 20 "$work/logs/postgres-$c.log" >&2; die "Postgres $c did not start"; }
done

log "loading src: $ACCOUNTS accounts, $ORDERS orders, $DOCS docs"
sql src postgres -c "
CREATE TABLE accounts (id int PRIMARY KEY, home_node text NOT NULL, balance numeric(12,2),
                       updated_at timestamptz NOT NULL DEFAULT now());
CREATE TABLE orders (id bigserial PRIMARY KEY, item text NOT NULL, qty int CHECK (qty > 0),
                     updated_at timestamptz NOT NULL DEFAULT now());
CREATE INDEX orders_item_idx ON orders (item);
CREATE TABLE docs (id int PRIMARY KEY, body text, blob bytea, updated_at timestamptz NOT NULL DEFAULT now());
INSERT INTO accounts SELECT g, 'a', g * 1.5 FROM generate_series(1, $ACCOUNTS) g;
INSERT INTO orders (item, qty) SELECT 'item ' || g, 1 + g % 9 FROM generate_series(1, $ORDERS) g;
INSERT INTO docs SELECT g, repeat(md5(g::text), 2000), decode(repeat(md5(g::text), 500), 'hex')
    FROM generate_series(1, $DOCS) g;
" -c "VACUUM ANALYZE" >/dev/null
size=$(sql src postgres -tAc "SELECT pg_size_pretty(sum(pg_total_relation_size(c))::bigint) FROM unnest(array['accounts','orders','docs']::regclass[]) c")
log "src tables: $size (with indexes and TOAST)"

head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/peer.secret"
chmod 600 "$work/peer.secret"
write_config() { # node cluster database other [extra node lines]
    local node=$1 c=$2 db=$3 other=$4 extra=${5:-}
    local dir="$work/run/$c"
    cat >"$work/pgmm-$node.toml" <<EOF
[node]
name = "$node"
$extra
[cluster]
name = "bench"
nodes = ["a", "b"]
[client]
listen = "127.0.0.1:${client_port[$node]}"
shutdown_grace_seconds = 1
[postgres]
url = "postgresql://postgres@${dir//\//%2F}:${port[$c]}/$db"
[metrics]
listen = "127.0.0.1:${metrics_port[$node]}"
[peer]
listen = "127.0.0.1:${peer_port[$node]}"
secret_file = "$work/peer.secret"
[[peers]]
name = "$other"
address = "127.0.0.1:${peer_port[$other]}"
[replication]
tables = ["public.*"]
EOF
}
start_pgmm() { # node
    local node=$1
    printf '===== bench: starting pgmm %s at %s\n' "$node" "$(date '+%F %T.%N')" >>"$work/logs/pgmm-$node.log"
    "$PGMM" serve --config "$work/pgmm-$node.toml" >>"$work/logs/pgmm-$node.log" 2>&1 &
    pgmm_pid[$node]=$!
}
wait_ready() { # node timeout_s
    local node=$1 deadline=$((SECONDS + $2))
    until [[ $(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${metrics_port[$node]}/readyz") == 200 ]]; do
        if ! kill -0 "${pgmm_pid[$node]}" 2>/dev/null || ((SECONDS >= deadline)); then
            tail -n 30 "$work/logs/pgmm-$node.log" >&2
            die "pgmm $node not ready"
        fi
        sleep 0.05
    done
}
now() { date +%s.%N; }

write_config a src postgres b
start_pgmm a

declare -a t_dump=() t_z0=() t_join=() t_copy=() rss_join=()
for round in $(seq "$ROUNDS"); do
    for system in dump dump-z0 join; do
        # The previous join's slot (b's for a) lives in the database: it goes first.
        sql dst postgres -c "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE database = 'target'" \
            -c "DROP DATABASE IF EXISTS target WITH (FORCE)" -c "CREATE DATABASE target" >/dev/null
        as_db "$PG_BINDIR/psql" -X -q -h "$work/run/dst" -p "${port[dst]}" -U postgres -d postgres -c CHECKPOINT >/dev/null
        case $system in
            dump | dump-z0)
                z=(); [[ $system == dump-z0 ]] && z=(-Z0)
                t0=$(now)
                # The tables carry node a's pgmm triggers, whose functions live in schema pgmm,
                # which the dump of three tables does not hold: pg_restore reports those (and
                # only those) as errors, and they are checked to be that.
                "$PG_BINDIR/pg_dump" -h 127.0.0.1 -p "${port[src]}" -U postgres -d postgres -Fc "${z[@]}" \
                    -t accounts -t orders -t docs \
                    | "$PG_BINDIR/pg_restore" -h 127.0.0.1 -p "${port[dst]}" -U postgres -d target \
                        2>"$work/logs/restore.err" || true
                t1=$(now)
                if grep 'ERROR' "$work/logs/restore.err" | grep -vq 'schema "pgmm" does not exist'; then
                    cat "$work/logs/restore.err" >&2
                    die "pg_restore failed"
                fi
                elapsed=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
                if [[ $system == dump ]]; then t_dump+=("$elapsed"); else t_z0+=("$elapsed"); fi
                ;;
            join)
                stop_pgmm b
                write_config b dst target a 'join_from = "a"'
                t0=$(now)
                start_pgmm b
                wait_ready b 900
                t1=$(now)
                elapsed=$(python3 -c "print(f'{$t1 - $t0:.2f}')")
                t_join+=("$elapsed")
                copy=$(grep 'joined the cluster' "$work/logs/pgmm-b.log" | tail -n 1 | sed -E 's/.* seconds=([0-9.]+).*/\1/')
                t_copy+=("$(python3 -c "print(f'{$copy:.2f}')")")
                rss=$(awk '/VmHWM/ {print int($2 / 1024)}' "/proc/${pgmm_pid[b]}/status")
                rss_join+=("$rss")
                stop_pgmm b
                ;;
        esac
        rows=$(sql dst target -tAc "SELECT (SELECT count(*) FROM accounts) + (SELECT count(*) FROM orders) + (SELECT count(*) FROM docs)")
        expected=$((ACCOUNTS + ORDERS + DOCS))
        [[ $rows == "$expected" ]] || die "$system round $round: $rows rows on dst, expected $expected"
        log "round $round: $system ${elapsed} s ($rows rows)"
    done
done

median() { printf '%s\n' "$@" | sort -n | awk '{a[NR]=$1} END {print (NR % 2) ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2}'; }
m_dump=$(median "${t_dump[@]}")
m_z0=$(median "${t_z0[@]}")
m_join=$(median "${t_join[@]}")
m_copy=$(median "${t_copy[@]}")
m_rss=$(median "${rss_join[@]}")
echo
echo "tables: accounts $ACCOUNTS rows, orders $ORDERS rows (+ index), docs $DOCS rows of ~96 kB; $size on src"
echo "rounds: $ROUNDS (alternating), PostgreSQL $("$PG_BINDIR/postgres" --version | awk '{print $3}')"
printf '%-44s %s\n' "pg_dump -Fc | pg_restore (s, per round)" "${t_dump[*]}"
printf '%-44s %s\n' "pg_dump -Fc -Z0 | pg_restore (s, per round)" "${t_z0[*]}"
printf '%-44s %s\n' "pgmm join, start to ready (s, per round)" "${t_join[*]}"
printf '%-44s %s\n' "pgmm join, copy as logged (s, per round)" "${t_copy[*]}"
printf '%-44s %s MB\n' "pgmm b peak RSS during the join (median)" "$m_rss"
python3 - "$m_dump" "$m_z0" "$m_join" "$m_copy" <<'EOF'
import sys
dump, z0, join, copy = map(float, sys.argv[1:])
print(f"median: dump {dump:.2f} s, dump -Z0 {z0:.2f} s, join {join:.2f} s (copy {copy:.2f} s)")
print(f"ratio join / (pg_dump -Fc | pg_restore): {join / dump:.2f}   (below 1: the join is faster)")
print(f"ratio join / (pg_dump -Fc -Z0 | pg_restore): {join / z0:.2f}")
EOF
