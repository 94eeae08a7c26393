#!/usr/bin/env bash
# What a synchronous WAL receiver costs commits, side by side in one run:
#   none            no synchronous receiver (walvault stream, async, beside)
#   pg_receivewal   pg_receivewal --synchronous into local files
#   walvault        walvault stream --synchronous into the repository (a
#                   local directory, or a Garage bucket with REPO=garage)
# each listed in synchronous_standby_names (synchronous_commit = SYNC_COMMIT),
# while pgbench -c CLIENTS runs for DURATION seconds. Prints the TPS, the
# flush lag (p50/p95/max of pg_stat_replication.flush_lag sampled every
# 20 ms), the WAL written during the run and the CPU seconds the receiver
# used, and the ratio walvault / pg_receivewal. For walvault, from its status
# file: its durable writes, the commits each carried, and their mean latency
# (a journal append on a local directory, a PUT on S3). Then the async
# stream's write amplification at 20 commits a second for AMP_DURATION
# seconds: bytes the walvault process wrote (/proc/PID/io write_bytes) over
# the WAL it received (local directory only).
#
# usage: bench/sync-stream.sh
# env:   PG_BIN (default /usr/lib/postgresql/15/bin), WALVAULT_BIN (default:
#        cargo build --release), SCALE (pgbench, default 20), CLIENTS
#        (default 8), DURATION (seconds, default 30), MODES (default "none
#        pg_receivewal walvault"), REPO (local or garage; garage needs
#        WALVAULT_GARAGE_BIN or runs scripts/install-garage.sh), SYNC_COMMIT
#        (on or remote_write, default on), AMP_DURATION (default 60; 0
#        skips it), KEEP=1 keeps the work dir
# Runs as root (PostgreSQL and the receivers then run as the postgres user)
# or as the database's OS user.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SCALE=${SCALE:-20}
CLIENTS=${CLIENTS:-8}
DURATION=${DURATION:-30}
MODES=${MODES:-none pg_receivewal walvault}
REPO=${REPO:-local}
SYNC_COMMIT=${SYNC_COMMIT:-on}
AMP_DURATION=${AMP_DURATION:-60}
case $REPO in local|garage) ;; *) echo "REPO must be local or garage" >&2; exit 2 ;; esac
case $SYNC_COMMIT in on|remote_write) ;; *) echo "SYNC_COMMIT must be on or remote_write" >&2; exit 2 ;; esac
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup sync initdb pg_ctl pgbench psql pg_receivewal
data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
garage_pid=
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_all
  "${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  if [ -n "$garage_pid" ]; then kill -TERM "$garage_pid" 2>/dev/null || true; wait "$garage_pid" 2>/dev/null || true; fi
  if [ "${KEEP:-0}" = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

"${as[@]}" mkdir -p "$sock"
"${as[@]}" "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync >/dev/null
cat >>"$data/postgresql.conf" <<EOF
port = $port
unix_socket_directories = '$sock'
listen_addresses = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
synchronous_commit = $SYNC_COMMIT
EOF
"${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
conn=(-h "$sock" -p "$port" -U postgres)
sql() { "${as[@]}" "$PG_BIN/psql" "${conn[@]}" -X -A -t -q -c "$1" postgres; }
"${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
# walvault's repository: --repo DIR, or a config file naming a Garage bucket
wv=("${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo")
if [ "$REPO" = garage ]; then
  start_garage "$tmp/garage" walvault
  garage_config "$tmp/walvault.toml" walvault
  wv=("${as[@]}" env AWS_ACCESS_KEY_ID="$s3_key" AWS_SECRET_ACCESS_KEY="$s3_secret" \
    "$tmp/walvault" -q --config "$tmp/walvault.toml")
  garage_retry "$tmp/garage" "${wv[@]}" init
else
  "${wv[@]}" init >/dev/null
fi
"${as[@]}" mkdir -p "$tmp/receivewal"
pgconn="host=$sock port=$port user=postgres dbname=postgres"

set_sync() {
  sql "ALTER SYSTEM SET synchronous_standby_names = '$1'" >/dev/null
  sql "SELECT pg_reload_conf()" >/dev/null
}
# wait until the receiver streams and has flushed everything written so
# far, then commit a few times, so the flush lag sampled next is that of
# the load (the server keeps the last value, which is the catch-up's)
wait_streaming() { # application_name
  local end
  end=$(sql "SELECT pg_current_wal_lsn()")
  for _ in $(seq 1 600); do
    if [ "$(sql "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$1' AND state = 'streaming' AND flush_lsn >= '$end'")" = 1 ]; then
      for _ in 1 2 3 4 5; do sql "SET client_min_messages = warning; DROP TABLE IF EXISTS bench_warm; CREATE TABLE bench_warm(i int)" >/dev/null; done
      return 0
    fi
    sleep 0.1
  done
  echo "$1 did not start streaming" >&2; exit 1
}
start_receiver() { # mode
  case $1 in
    none)
      set_sync ''
      "${wv[@]}" stream --pg "$pgconn application_name=walvault" 2>>"$tmp/stream.log" &
      pids+=($!); wait_streaming walvault ;;
    pg_receivewal)
      set_sync 'receivewal'
      "${as[@]}" "$PG_BIN/pg_receivewal" "${conn[@]}" -D "$tmp/receivewal" --synchronous \
        -d "$pgconn application_name=receivewal" --no-loop 2>>"$tmp/receivewal.log" &
      pids+=($!); wait_streaming receivewal ;;
    walvault)
      set_sync 'walvault'
      "${wv[@]}" stream --synchronous --status-interval 1 --status-file "$tmp/status.json" \
        --pg "$pgconn application_name=walvault" 2>>"$tmp/stream.log" &
      pids+=($!); wait_streaming walvault ;;
  esac
}

# flush lag samples (ms) of the synchronous receiver while pgbench runs
sample_lag() { # file
  while :; do
    sql "SELECT coalesce(extract(epoch FROM flush_lag) * 1000, 0) FROM pg_stat_replication WHERE sync_state = 'sync'" >>"$1" 2>/dev/null || true
    sleep 0.02
  done
}

echo "# PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench scale $SCALE, -c $CLIENTS for $DURATION s, synchronous_commit = $SYNC_COMMIT, walvault repository: $REPO" >&2
printf '%-14s %8s %8s %8s %8s %8s %8s\n' receiver TPS "lag p50" "lag p95" "lag max" "WAL MiB" "CPU s"
# CPU seconds (user + system) the receiver process has used so far
receiver_cpu() { # mode
  local p
  case $1 in
    pg_receivewal) p=$(pgrep -n -x pg_receivewal) ;;
    *) p=$(pgrep -f -n "$tmp/walvault -q .* stream") ;;
  esac
  awk '{print ($14 + $15) / 100}' "/proc/$p/stat"
}
# the synchronous stream's durable writes so far and the seconds they took
# (its status file; "0 0" before it wrote one)
stream_writes() {
  python3 - "$tmp/status.json" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
    print(d["partial_uploads"], d.get("piece_write_seconds", 0))
except OSError:
    print("0 0")
PY
}
declare -A tps
for mode in $MODES; do
  start_receiver "$mode"
  lag=$tmp/lag-$mode
  : >"$lag"
  sample_lag "$lag" &
  sampler=$!
  c0=$(receiver_cpu "$mode")
  s0=$(stream_writes)
  w0=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
  out=$("${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -n -c "$CLIENTS" -j 2 -T "$DURATION" postgres 2>&1)
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  cpu=$(python3 -c "print(f'{$(receiver_cpu "$mode") - $c0:.1f}')")
  sleep 1.2 # the status file's next write
  s1=$(stream_writes)
  wal=$(python3 -c "print(f'{($(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn") - $w0) / 1048576:.0f}')")
  tps[$mode]=$(echo "$out" | awk '/^tps = / {print $3; exit}')
  read -r p50 p95 pmax < <(python3 - "$lag" <<'PY'
import sys
v = sorted(float(x) for x in open(sys.argv[1]) if x.strip())
if not v: print("- - -"); sys.exit()
q = lambda p: v[min(len(v) - 1, int(len(v) * p))]
print(f"{q(0.5):.1f} {q(0.95):.1f} {v[-1]:.1f}")
PY
)
  printf '%-14s %8.0f %8s %8s %8s %8s %8s\n' "$mode" "${tps[$mode]}" "$p50" "$p95" "$pmax" "$wal" "$cpu"
  if [ "$mode" = walvault ]; then
    commits=$(echo "$out" | awk '/^number of transactions actually processed:/ {print $6; exit}')
    python3 -c "
w0, t0 = map(float, '$s0'.split()); w1, t1 = map(float, '$s1'.split()); n = max(w1 - w0, 1)
print(f'  walvault: {n:.0f} durable writes, {$commits / n:.1f} commits each, {(t1 - t0) / n * 1000:.2f} ms each on average')"
  fi
  set_sync ''
  stop_all
done
if [ -n "${tps[walvault]:-}" ] && [ -n "${tps[pg_receivewal]:-}" ]; then
  python3 -c "print(f'walvault / pg_receivewal TPS: {${tps[walvault]} / ${tps[pg_receivewal]}:.2f}')"
fi

# write amplification of the async stream at 20 commits a second
if [ "$REPO" = local ] && [ "$AMP_DURATION" != 0 ]; then
  set_sync ''
  "${wv[@]}" stream --pg "$pgconn application_name=walvault" 2>>"$tmp/stream.log" &
  pids+=($!)
  wait_streaming walvault
  sleep 2
  wpid=$(pgrep -f -n "$tmp/walvault -q .* stream")
  w0=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
  l0=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
  "${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -n -c 1 -R 20 -T "$AMP_DURATION" postgres >/dev/null 2>&1
  sleep 3
  l1=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
  w1=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
  python3 -c "w=$w1-$w0; l=$l1-$l0; print(f'async stream at 20 TPS for $AMP_DURATION s: {l/1048576:.1f} MiB of WAL, {w/1048576:.1f} MiB written: {w/max(l,1):.2f}x')"
  stop_all
fi
