#!/usr/bin/env bash
# Peak memory (and wall, CPU) of walvault's own work on one pgbench cluster:
# the first full backup, a second backup after 20 s of pgbench, a restore of
# it, and a point-in-time recovery to a moment after it (restore-pitr
# --start, the RTO path). Several builds can be compared in one run: BINS
# lists them, and each round runs them one after the other on the same
# cluster (issue 14: peak RSS ≤ 256 MiB at scale 100 and at scale 1000).
# Each round also times `pg_basebackup -Ft --compress=client-lz4` on the
# same cluster, for the backup's wall-time ratio at this size.
#
# usage: bench/memory.sh [SCALE]        (pgbench scale, default 100 ≈ 1.5 GB)
# env:   ROUNDS (default 1), PG_BIN (default /usr/lib/postgresql/15/bin),
#        BINS (walvault binaries to compare; default a release build),
#        CLUSTER (a directory that keeps the pgbench cluster between runs:
#        created there once, reused after; scale 1000 takes ~10 min to load),
#        RESULTS_COPY (a file that gets the raw results, also after a failure)
# Runs as root (PostgreSQL and walvault then run as the postgres user) or
# as the database's OS user. Needs GNU time.
set -euo pipefail
SCALE=${1:-100}
ROUNDS=${ROUNDS:-1}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup memory initdb pg_ctl pgbench psql pg_basebackup
run() { (cd "$tmp" && "${as[@]}" "$@"); }
read -r -a bins <<<"${BINS:-$WALVAULT_BIN}"
for i in "${!bins[@]}"; do
  cp "${bins[$i]}" "$tmp/wv$i"
  chmod 755 "$tmp/wv$i"
done

cluster=${CLUSTER:-$tmp/cluster}
data=$cluster/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pitr_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
started=()
cleanup() {
  for d in "${started[@]}"; do
    run "$PG_BIN/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1 || true
  done
  pkill -f -- "--slot walvault_memory" 2>/dev/null || true
  [ -s "${results:-}" ] && cp "$results" "${RESULTS_COPY:-/dev/null}"
  rm -rf "$tmp"
}
trap cleanup EXIT
run mkdir -p "$sock"
if [ "$(id -u)" = 0 ]; then mkdir -p "$cluster" && chown postgres: "$cluster"; fi
conn=(-h "$sock" -p "$port" -U postgres)
q() { run "$PG_BIN/psql" "${conn[@]}" -X -At -c "$1" postgres; }
start_cluster() {
  run "$PG_BIN/pg_ctl" -D "$data" -l "$cluster/server.log" -w \
    -o "-p $port -k $sock -c listen_addresses=''" start >/dev/null
  started+=("$data")
}
if [ -f "$data/PG_VERSION" ] && [ -f "$cluster/scale-$SCALE" ]; then
  echo "# reusing the scale-$SCALE cluster in $cluster" >&2
  start_cluster
else
  run rm -rf "$data"
  run "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync >/dev/null
  cat >>"$data/postgresql.conf" <<EOF
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
shared_buffers = 256MB
max_wal_size = 4GB
EOF
  start_cluster
  echo "# loading pgbench scale $SCALE" >&2
  run "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
  run touch "$cluster/scale-$SCALE"
fi
q "CHECKPOINT" >/dev/null
echo "# cluster: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $(($(q "SELECT sum(pg_database_size(datname)) FROM pg_database") / 1000000)) MB" >&2
pgconn="host=$sock port=$port user=postgres dbname=postgres"
results=$tmp/results.txt
: >"$results"

one() { # N: every step with binary N
  local wv=$tmp/wv$1 repo=$tmp/repo$1 n=$1
  run rm -rf "$repo" "$tmp/r" "$tmp/p"
  run "$wv" --repo "$repo" init >/dev/null
  measure "backup:$n" "$repo" "$wv" -q --repo "$repo" backup --pg "$pgconn" --fast
  run "$wv" --repo "$repo" stream --pg "$pgconn" --slot walvault_memory --status-file "$tmp/stream.json" -q \
    >"$tmp/stream.log" 2>&1 &
  sleep 2
  run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 20 postgres >/dev/null
  measure "backup-after-churn:$n" "$repo" "$wv" -q --repo "$repo" backup --pg "$pgconn" --fast
  run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 5 postgres >/dev/null
  q "DROP TABLE IF EXISTS marker; CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before the target')" >/dev/null
  sleep 1.1
  local target
  target=$(q "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')")
  sleep 1.1
  q "INSERT INTO marker VALUES ('after the target')" >/dev/null
  local end
  end=$(q "SELECT pg_current_wal_insert_lsn()")
  q "SELECT pg_switch_wal()" >/dev/null
  wait_durable "$tmp/stream.json" "$end" 120
  pkill -TERM -f -- "--slot walvault_memory" || true
  sleep 1
  measure "restore:$n" "$tmp/r" "$wv" -q --repo "$repo" restore --backup latest --pgdata "$tmp/r"
  run rm -rf "$tmp/r"
  measure "restore-pitr:$n" "$tmp/p" "$wv" -q --repo "$repo" restore-pitr --pgdata "$tmp/p" \
    --target-time "$target" --start --port "$pitr_port" --pg-bin "$PG_BIN" --archive-mode off --json
  # (the recovered server listens on localhost: the cluster's socket
  # directory was given on its command line, not in its configuration)
  got=$(run "$PG_BIN/psql" -h localhost -p "$pitr_port" -U postgres -X -At -c "SELECT string_agg(t, ',') FROM marker" postgres)
  run "$PG_BIN/pg_ctl" -D "$tmp/p" -m immediate -w stop >/dev/null
  run rm -rf "$tmp/p" "$repo"
  [ "$got" = "before the target" ] || { echo "binary $n: PITR recovered marker=$got" >&2; exit 1; }
}
for r in $(seq "$ROUNDS"); do
  run rm -rf "$tmp/bb-lz4"
  measure "pg_basebackup-client-lz4" "$tmp/bb-lz4" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/bb-lz4" \
    -Ft -X none -c fast --no-sync --compress=client-lz4
  run rm -rf "$tmp/bb-lz4"
  for i in "${!bins[@]}"; do
    echo "# round $r, binary $i: ${bins[$i]}" >&2
    one "$i"
  done
done

echo
echo "pgbench scale $SCALE; medians of $ROUNDS; binaries: $(for i in "${!bins[@]}"; do printf '%s=%s ' "$i" "${bins[$i]}"; done)"
python3 - "$results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, wall, cpu, rss, stored = line.split()[:5]
    rows.setdefault(name, []).append((float(wall), float(cpu), int(rss) / 1024))
print("| step:binary | wall s | CPU s | peak RSS MiB |")
print("|---|---|---|---|")
for name, v in rows.items():
    med = lambda i: statistics.median(x[i] for x in v)
    print(f"| {name} | {med(0):.2f} | {med(1):.2f} | {med(2):.0f} |")
PY
