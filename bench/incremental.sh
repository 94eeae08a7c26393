#!/usr/bin/env bash
# PostgreSQL 17+ incremental backups, on one pgbench database, in one run:
#   full   walvault backup | pg_basebackup -Ft client-lz4
#   incr   after 1 % of pgbench_accounts' rows are updated (one contiguous
#          range, through the index): walvault backup (the server sends only
#          changed blocks; stored complete) | pg_basebackup --incremental
# with summarize_wal = on. Each round starts from a new walvault repository
# and a new pg_basebackup full, so every incremental follows its own full.
# Reports medians of wall time, CPU, peak RSS, bytes stored and, for
# walvault, the bytes the server sent; and each tool's incr/full ratio.
#
# usage: bench/incremental.sh [SCALE]    (pgbench scale, default 100 ≈ 1.5 GB)
# env:   ROUNDS (default 3), PG_BIN (default: PostgreSQL 17 installed by
#        scripts/install-pg-versions.sh 17), WALVAULT_BIN (default: cargo
#        build --release), KEEP=1 keeps the work dir
set -euo pipefail
SCALE=${1:-100}
ROUNDS=${ROUNDS:-3}
root=$(cd "$(dirname "$0")/.." && pwd)
if [ "$(id -u)" = 0 ]; then cache=${WALVAULT_CACHE:-/var/cache/walvault}; else cache=${WALVAULT_CACHE:-$HOME/.cache/walvault}; fi
PG_BIN=${PG_BIN:-$cache/pg/17/bin}
[ -x "$PG_BIN/postgres" ] || "$root/scripts/install-pg-versions.sh" 17
[ -x /usr/bin/time ] || DEBIAN_FRONTEND=noninteractive apt-get install -y -q time >/dev/null
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup incremental initdb pg_ctl pgbench psql pg_basebackup
run() { (cd "$tmp" && "${as[@]}" "$@"); }
wv=$tmp/walvault
data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
  run "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

run mkdir -p "$sock" "$tmp/out"
echo "# cluster: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench scale $SCALE" >&2
run "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync >/dev/null
cat >>"$data/postgresql.conf" <<EOF
port = $port
unix_socket_directories = '$sock'
listen_addresses = ''
wal_level = replica
max_wal_senders = 10
summarize_wal = on
shared_buffers = 256MB
max_wal_size = 4GB
EOF
run "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
conn=(-h "$sock" -p "$port" -U postgres)
q() { run "$PG_BIN/psql" "${conn[@]}" -X -At -c "$1" postgres; }
run "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
# the first read of every page after the load sets hint bits, which with
# checksums is WAL-logged: do it now, not in the first measured interval
q "VACUUM (ANALYZE)" >/dev/null
q "CHECKPOINT" >/dev/null
db_bytes=$(q "SELECT sum(pg_database_size(datname)) FROM pg_database")
echo "# database: $((db_bytes / 1000000)) MB" >&2
pgconn="host=$sock port=$port user=postgres dbname=postgres"
rows=$((SCALE * 100000))
chunk=$((rows / 100))

results=$tmp/results.txt
: >"$results"
# measure (bench/lib.sh) adds, for walvault, the bytes the server sent
measure_extra() {
  if [[ "$1" == *:walvault ]]; then
    run "$wv" --repo "$tmp/wv-repo" info latest --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["received_bytes"] or 0)'
  else
    echo 0
  fi
}

for r in $(seq "$ROUNDS"); do
  echo "# round $r" >&2
  run rm -rf "$tmp/wv-repo" "$tmp/out/full" "$tmp/out/incr"
  run "$wv" --repo "$tmp/wv-repo" init >/dev/null
  measure "full:walvault" "$tmp/wv-repo" "$wv" -q --repo "$tmp/wv-repo" backup --pg "$pgconn" --fast
  measure "full:pg_basebackup-lz4" "$tmp/out/full" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/out/full" \
    -Ft -X none -c fast --no-sync --compress=client-lz4
  # 1 % of the rows, a different range each round
  first=$(( (r - 1) * chunk * 7 % (rows - chunk) + 1 ))
  q "UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid BETWEEN $first AND $((first + chunk - 1))" >/dev/null
  measure "incr:walvault" "$tmp/wv-repo" "$wv" -q --repo "$tmp/wv-repo" backup --pg "$pgconn" --fast
  # (-Ft writes backup_manifest beside the tar files)
  measure "incr:pg_basebackup-lz4" "$tmp/out/incr" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/out/incr" \
    -Ft -X none -c fast --no-sync --compress=client-lz4 --incremental="$tmp/out/full/backup_manifest"
done

python3 - "$results" "$db_bytes" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, wall, cpu, rss, stored, recv = line.split()
    rows[name].append((float(wall), float(cpu), int(rss), int(stored), int(recv)))
db = int(sys.argv[2])
med = lambda n, i: statistics.median(r[i] for r in rows[n])
print(f"database: {db/1e6:.0f} MB; median of {len(rows['full:walvault'])} rounds\n")
print("| backup | tool | wall s | CPU s | peak RSS MiB | stored MiB | sent by the server MiB | wall vs the tool's full |")
print("|---|---|---|---|---|---|---|---|")
for tool in ("walvault", "pg_basebackup-lz4"):
    full = med(f"full:{tool}", 0)
    for phase in ("full", "incr"):
        n = f"{phase}:{tool}"
        w, c, m, s, recv = (med(n, i) for i in range(5))
        sent = f"{recv/2**20:.1f}" if recv else "-"
        print(f"| {phase} | {tool} | {w:.2f} | {c:.2f} | {m/1024:.0f} | {s/2**20:.1f} | {sent} | {w/full:.2f}x |")
PY
