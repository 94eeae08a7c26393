#!/usr/bin/env bash
# RPO of `walvault stream`: how long after its commit a transaction's WAL is
# durable in the repository (the status file's durable_lsn passes it), while
# pgbench writes beside it. The figure the test
# `wal_archive::stream::rpo_is_seconds_on_64mib_segments` only bounds.
#   commits   one INSERT every 50 ms, each in its own psql call; its LSN is
#             the insert position read right after the commit
#   load      pgbench -c 2 over the whole measurement (LOAD=0: none)
#   sampling  the status file is read every 2 ms (the figures' resolution);
#             a commit's time is when its psql call returned, a few ms after
#             the commit itself
# Prints min, median, p95 and max in ms, and the stream's options.
#
# usage: bench/rpo.sh [COMMITS]          (default 200)
# env:   PG_BIN (default /usr/lib/postgresql/15/bin), WALVAULT_BIN (default:
#        cargo build --release), WAL_SEGSIZE in MiB (default 64, as the test),
#        PARTIAL_INTERVAL (seconds; default: walvault's own), SCALE (pgbench,
#        default 10), LOAD (pgbench clients, default 2), KEEP=1 keeps the work dir
# Runs as root (PostgreSQL and walvault then run as the postgres user) or as
# the database's OS user.
set -euo pipefail
COMMITS=${1:-200}
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
WAL_SEGSIZE=${WAL_SEGSIZE:-64}
SCALE=${SCALE:-10}
LOAD=${LOAD:-2}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup rpo initdb pg_ctl pgbench psql
data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  "${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  if [ "${KEEP:-0}" = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

"${as[@]}" mkdir -p "$sock"
"${as[@]}" "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync --wal-segsize="$WAL_SEGSIZE" >/dev/null
cat >>"$data/postgresql.conf" <<EOF
port = $port
unix_socket_directories = '$sock'
listen_addresses = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
EOF
"${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
conn=(-h "$sock" -p "$port" -U postgres)
"${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
"${as[@]}" "$PG_BIN/psql" "${conn[@]}" -X -q -c "CREATE TABLE rpo(i int)" postgres

stream_opts=()
[ -n "${PARTIAL_INTERVAL:-}" ] && stream_opts+=(--partial-interval "$PARTIAL_INTERVAL")
"${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo" init >/dev/null
"${as[@]}" "$tmp/walvault" --repo "$tmp/repo" stream --pg "host=$sock port=$port user=postgres dbname=postgres" \
  --status-file "$tmp/status.json" "${stream_opts[@]}" 2>"$tmp/stream.log" &
pids+=($!)
if [ "$LOAD" -gt 0 ]; then
  "${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -n -c "$LOAD" -T 86400 postgres >/dev/null 2>&1 &
  pids+=($!)
fi
echo "# PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), ${WAL_SEGSIZE} MiB segments," \
  "pgbench scale $SCALE with $LOAD clients; walvault stream ${stream_opts[*]:-(default options)}" >&2

python3 - "$COMMITS" "$tmp/status.json" "$PG_BIN/psql" "$sock" "$port" <<'PY'
import json, statistics, subprocess, sys, threading, time

commits, status, psql, sock, port = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5]
lsn = lambda s: (int(s.split("/")[0], 16) << 32) + int(s.split("/")[1], 16)

def durable():
    try:
        return lsn(json.load(open(status))["durable_lsn"])
    except (OSError, ValueError, KeyError):
        return None

def sql(*queries):
    args = [psql, "-h", sock, "-p", port, "-U", "postgres", "-X", "-A", "-t", "-q"]
    for q in queries:
        args += ["-c", q]
    return subprocess.run(args + ["postgres"], check=True, capture_output=True, text=True).stdout.strip()

# the stream has caught up with the server (where it stood then) before the first commit
start, target = time.monotonic(), lsn(sql("SELECT pg_current_wal_insert_lsn()"))
while (d := durable()) is None or d < target:
    if time.monotonic() - start > 60:
        sys.exit(f"the stream did not catch up within 60 s (durable {d})")
    time.sleep(0.05)

seen = []  # (time, durable) whenever durable advanced
done = threading.Event()
def sample():
    while not done.is_set():
        d = durable()
        if d is not None and (not seen or d > seen[-1][1]):
            seen.append((time.monotonic(), d))
        time.sleep(0.002)
sampler = threading.Thread(target=sample)
sampler.start()

made = []  # (insert position after the commit, when the call returned)
for i in range(commits):
    t0 = time.monotonic()
    at = sql(f"INSERT INTO rpo VALUES ({i})", "SELECT pg_current_wal_insert_lsn()")
    made.append((lsn(at), time.monotonic()))
    time.sleep(max(0.0, 0.05 - (time.monotonic() - t0)))
deadline = time.monotonic() + 60
while not seen or seen[-1][1] < made[-1][0]:
    if time.monotonic() > deadline:
        done.set()
        sys.exit("the last commit did not become durable within 60 s")
    time.sleep(0.01)
done.set()
sampler.join()

delays = sorted(max(0.0, next(t for t, d in seen if d >= l) - c) * 1000 for l, c in made)
p95 = delays[int(len(delays) * 0.95)]
print(f"RPO over {len(delays)} commits: min {delays[0]:.0f} ms, median {statistics.median(delays):.0f} ms, "
      f"p95 {p95:.0f} ms, max {delays[-1]:.0f} ms")
PY
