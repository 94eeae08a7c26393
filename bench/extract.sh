#!/usr/bin/env bash
# One table back as of a moment: `walvault extract` (a sparse recovery of the
# table and its database's catalogs, then pg_dump) against a full
# `restore-pitr --start` to the same target, on a pgbench cluster with a
# ~50 MB table in a second database. Rows of the table are deleted under
# pgbench load; both tools recover to just before the delete. Reports wall
# time, CPU, peak RSS and the bytes each read from the repository
# (files + WAL), medians of ROUNDS, alternating.
#
# usage: bench/extract.sh [SCALE]       (pgbench scale, default 100 ≈ 1.5 GB)
# env:   ROUNDS (default 3), PG_BIN (default /usr/lib/postgresql/15/bin),
#        WALVAULT_BIN (default: a release build), RESULTS_COPY (a file that
#        gets the raw results), SAMPLES (a directory that gets the text
#        output of wal-inspect, the plan and an extract --into)
# Runs as root (PostgreSQL and walvault then run as the postgres user) or
# as the database's OS user. Needs GNU time.
set -euo pipefail
SCALE=${1:-100}
ROUNDS=${ROUNDS:-3}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
root=$(cd "$(dirname "$0")/.." && pwd)
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup extract initdb pg_ctl pgbench psql pg_dump
run() { (cd "$tmp" && "${as[@]}" "$@"); }
wv=$tmp/walvault

data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pitr_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  for d in "$data" "$tmp/p"; do
    [ -f "$d/postmaster.pid" ] && run "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
  pkill -f -- "--slot walvault_extract" 2>/dev/null || true
  [ -s "${results:-}" ] && cp "$results" "${RESULTS_COPY:-/dev/null}"
  rm -rf "$tmp"
}
trap cleanup EXIT
run mkdir -p "$sock" "$tmp/scratch"
conn=(-h "$sock" -p "$port" -U postgres)
q() { run "$PG_BIN/psql" "${conn[@]}" -X -At -c "$2" "$1"; }
run "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync >/dev/null
cat >>"$data/postgresql.conf" <<EOF
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
shared_buffers = 256MB
max_wal_size = 4GB
EOF
run "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w \
  -o "-p $port -k $sock -c listen_addresses=''" start >/dev/null
echo "# loading pgbench scale $SCALE and app.orders" >&2
run "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
q postgres "CREATE DATABASE app" >/dev/null
q app "CREATE TABLE orders (id bigserial PRIMARY KEY, customer int, amount numeric, note text);
       INSERT INTO orders (customer, amount, note)
         SELECT g % 5000, g * 0.01, md5(g::text) || md5((g + 1)::text) FROM generate_series(1, 450000) g;
       CREATE INDEX ON orders (customer)" >/dev/null
q postgres "CHECKPOINT" >/dev/null
cluster_mb=$(($(q postgres "SELECT sum(pg_database_size(datname)) FROM pg_database") / 1000000))
table_mb=$(($(q app "SELECT pg_total_relation_size('orders')") / 1000000))
echo "# cluster: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), $cluster_mb MB; app.orders $table_mb MB with its indexes" >&2
pgconn="host=$sock port=$port user=postgres dbname=postgres"
results=$tmp/results.txt
: >"$results"
repo=$tmp/repo
run "$wv" --repo "$repo" init >/dev/null
run "$wv" --repo "$repo" stream --pg "$pgconn" --slot walvault_extract --status-file "$tmp/stream.json" -q \
  >"$tmp/stream.log" 2>&1 &
sleep 2
run "$wv" -q --repo "$repo" backup --pg "$pgconn" --fast >/dev/null
# the delete happens under load, with WAL before and after it
run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 20 postgres >/dev/null &
bench=$!
sleep 10
expected=$(q app "SELECT count(*) FROM orders")
xid=$(q app "DELETE FROM orders WHERE id % 10 = 0; SELECT txid_current()" | tail -1)
wait "$bench"
end=$(q postgres "SELECT pg_current_wal_insert_lsn()")
q postgres "SELECT pg_switch_wal()" >/dev/null
wait_durable "$tmp/stream.json" "$end" 120
pkill -TERM -f -- "--slot walvault_extract" || true
sleep 1
echo "# target: just before transaction $xid (app.orders had $expected rows)" >&2

# the bytes each read from the repository, from its JSON report
measure_extra() {
  python3 - "$tmp/cmd.log" "$1" <<'PY'
import json, sys
r = next(json.loads(l) for l in reversed(open(sys.argv[1]).read().splitlines()) if l.startswith("{"))
rec = r["recovery"] if sys.argv[2].startswith("extract") else r
print(rec["restore_fetched_bytes"], rec["wal_bytes_fetched"], rec["restore_seconds"], rec["replay_seconds"], rec["total_seconds"])
PY
}
extract_one() {
  run rm -f "$tmp/orders.sql"
  measure "extract" "$tmp/scratch" "$wv" -q --repo "$repo" extract --database app --table public.orders \
    --target-xid "$xid" --exclusive --output "$tmp/orders.sql" --scratch "$tmp/scratch" --pg-bin "$PG_BIN" --json
  local got
  got=$(grep -c "^[0-9]" "$tmp/orders.sql" || true)
  [ "$got" = "$expected" ] || { echo "extract: $got rows in the dump, expected $expected" >&2; exit 1; }
}
pitr_one() {
  run rm -rf "$tmp/p"
  measure "restore-pitr" "$tmp/p" "$wv" -q --repo "$repo" restore-pitr --pgdata "$tmp/p" \
    --target-xid "$xid" --exclusive --start --port "$pitr_port" --pg-bin "$PG_BIN" --archive-mode off --json
  local got
  got=$(run "$PG_BIN/psql" -h localhost -p "$pitr_port" -U postgres -X -At -c "SELECT count(*) FROM orders" app)
  run "$PG_BIN/pg_ctl" -D "$tmp/p" -m immediate -w stop >/dev/null
  run rm -rf "$tmp/p"
  [ "$got" = "$expected" ] || { echo "restore-pitr: $got rows, expected $expected" >&2; exit 1; }
}
for r in $(seq "$ROUNDS"); do
  echo "# round $r" >&2
  if [ $((r % 2)) = 1 ]; then extract_one; pitr_one; else pitr_one; extract_one; fi
done

# what a DBA sees, for the runbook: the delete in wal-inspect, the plan, an
# extract into the live database
if [ -n "${SAMPLES:-}" ]; then
  mkdir -p "$SAMPLES"
  run "$wv" --repo "$repo" wal-inspect --xid "$xid" --timezone UTC >"$SAMPLES/wal-inspect-xid.txt" 2>&1 || true
  run "$wv" --repo "$repo" extract --database app --table public.orders --target-xid "$xid" --exclusive \
    --output "$tmp/plan.sql" --scratch "$tmp/scratch" --pg-bin "$PG_BIN" --dry-run >"$SAMPLES/plan.txt" 2>&1 || true
  run "$wv" --repo "$repo" extract --database app --table public.orders --target-xid "$xid" --exclusive \
    --into "$pgconn dbname=app" --scratch "$tmp/scratch" --pg-bin "$PG_BIN" >"$SAMPLES/extract.txt" 2>&1 || true
  echo "# samples in $SAMPLES" >&2
fi

echo
echo "pgbench scale $SCALE ($cluster_mb MB), app.orders $table_mb MB with its indexes; to just before a DELETE under pgbench; medians of $ROUNDS, alternating"
python3 - "$results" <<'PY'
import sys, statistics
rows = {}
for line in open(sys.argv[1]):
    name, wall, cpu, rss, _, files, wal, restore, replay, recovery = line.split()[:10]
    w = float(wall)
    rows.setdefault(name, []).append((w, float(cpu), int(rss) / 1024, int(files) / 2**20, int(wal) / 2**20,
                                      float(restore), float(replay), w - float(recovery)))
print("| | wall s | CPU s (walvault) | peak RSS MiB | files read MiB | WAL read MiB | restore s | replay s | after recovery s |")
print("|---|---|---|---|---|---|---|---|---|")
for name, v in rows.items():
    med = lambda i: statistics.median(x[i] for x in v)
    print(f"| {name} | {med(0):.2f} | {med(1):.2f} | {med(2):.0f} | {med(3):.1f} | {med(4):.0f} | {med(5):.2f} | {med(6):.2f} | {med(7):.2f} |")
print("\n(after recovery: extract's amcheck, pg_dump and the scratch server's stop; restore-pitr's nothing)")
e, p = statistics.median(x[0] for x in rows["extract"]), statistics.median(x[0] for x in rows["restore-pitr"])
ef, pf = statistics.median(x[3] for x in rows["extract"]), statistics.median(x[3] for x in rows["restore-pitr"])
print(f"\nextract / restore-pitr: time {e / p:.2f}x, file bytes read {ef / pf:.3f}x")
PY
