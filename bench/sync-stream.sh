#!/usr/bin/env bash
# What a synchronous WAL receiver costs commits, side by side in one run:
#   none            no synchronous receiver (walvault stream, async, beside)
#   pg_receivewal   pg_receivewal --synchronous into local files
#   walvault        walvault stream --synchronous into a local repository
# each listed in synchronous_standby_names (synchronous_commit = on), while
# pgbench -c CLIENTS runs for DURATION seconds. Prints the TPS, the flush lag
# (p50/p95/max of pg_stat_replication.flush_lag sampled every 20 ms) and the
# ratio walvault / pg_receivewal, with the WAL written during the run and
# the CPU seconds the receiver used. Then the async stream's write amplification
# at 20 commits a second: bytes the walvault process wrote (/proc/PID/io
# write_bytes) over the WAL it received.
#
# usage: bench/sync-stream.sh
# env:   PG_BIN (default /usr/lib/postgresql/15/bin), WALVAULT_BIN (default:
#        cargo build --release), SCALE (pgbench, default 20), CLIENTS
#        (default 8), DURATION (seconds, default 30), MODES (default "none
#        pg_receivewal walvault"), KEEP=1 keeps the work dir
# Runs as root (PostgreSQL and the receivers then run as the postgres user)
# or as the database's OS user.
set -euo pipefail
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
SCALE=${SCALE:-20}
CLIENTS=${CLIENTS:-8}
DURATION=${DURATION:-30}
MODES=${MODES:-none pg_receivewal walvault}
root=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup sync initdb pg_ctl pgbench psql pg_receivewal
data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pids=()
stop_all() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  pids=()
}
cleanup() {
  stop_all
  "${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
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
synchronous_commit = on
EOF
"${as[@]}" "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
conn=(-h "$sock" -p "$port" -U postgres)
sql() { "${as[@]}" "$PG_BIN/psql" "${conn[@]}" -X -A -t -q -c "$1" postgres; }
"${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
"${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo" init >/dev/null
"${as[@]}" mkdir -p "$tmp/receivewal"
pgconn="host=$sock port=$port user=postgres dbname=postgres"

set_sync() {
  sql "ALTER SYSTEM SET synchronous_standby_names = '$1'" >/dev/null
  sql "SELECT pg_reload_conf()" >/dev/null
}
wait_streaming() { # application_name
  for _ in $(seq 1 300); do
    [ "$(sql "SELECT count(*) FROM pg_stat_replication WHERE application_name = '$1' AND state = 'streaming'")" = 1 ] && return 0
    sleep 0.1
  done
  echo "$1 did not start streaming" >&2; exit 1
}
start_receiver() { # mode
  case $1 in
    none)
      set_sync ''
      "${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo" stream --pg "$pgconn application_name=walvault" \
        2>>"$tmp/stream.log" &
      pids+=($!); wait_streaming walvault ;;
    pg_receivewal)
      set_sync 'receivewal'
      "${as[@]}" "$PG_BIN/pg_receivewal" "${conn[@]}" -D "$tmp/receivewal" --synchronous \
        -d "$pgconn application_name=receivewal" --no-loop 2>>"$tmp/receivewal.log" &
      pids+=($!); wait_streaming receivewal ;;
    walvault)
      set_sync 'walvault'
      "${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo" stream --synchronous --pg "$pgconn application_name=walvault" \
        2>>"$tmp/stream.log" &
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

echo "# PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench scale $SCALE, -c $CLIENTS for $DURATION s, local disk" >&2
printf '%-14s %8s %8s %8s %8s %8s %8s\n' receiver TPS "lag p50" "lag p95" "lag max" "WAL MiB" "CPU s"
# CPU seconds (user + system) the receiver process has used so far
receiver_cpu() { # mode
  local p
  case $1 in
    pg_receivewal) p=$(pgrep -n -x pg_receivewal) ;;
    *) p=$(pgrep -f -n "$tmp/walvault -q --repo $tmp/repo stream") ;;
  esac
  awk '{print ($14 + $15) / 100}' "/proc/$p/stat"
}
declare -A tps
for mode in $MODES; do
  start_receiver "$mode"
  lag=$tmp/lag-$mode
  : >"$lag"
  sample_lag "$lag" &
  sampler=$!
  c0=$(receiver_cpu "$mode")
  w0=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
  out=$("${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -n -c "$CLIENTS" -j 2 -T "$DURATION" postgres 2>&1)
  kill "$sampler" 2>/dev/null || true; wait "$sampler" 2>/dev/null || true
  cpu=$(python3 -c "print(f'{$(receiver_cpu "$mode") - $c0:.1f}')")
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
  set_sync ''
  stop_all
done
if [ -n "${tps[walvault]:-}" ] && [ -n "${tps[pg_receivewal]:-}" ]; then
  python3 -c "print(f'walvault / pg_receivewal TPS: {${tps[walvault]} / ${tps[pg_receivewal]}:.2f}')"
fi

# write amplification of the async stream at 20 commits a second
set_sync ''
"${as[@]}" "$tmp/walvault" -q --repo "$tmp/repo" stream --pg "$pgconn application_name=walvault" 2>>"$tmp/stream.log" &
pid=$!; pids+=($pid)
wait_streaming walvault
sleep 2
wpid=$(pgrep -f -n "$tmp/walvault -q --repo $tmp/repo stream")
w0=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
l0=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
"${as[@]}" "$PG_BIN/pgbench" "${conn[@]}" -n -c 1 -R 20 -T "$DURATION" postgres >/dev/null 2>&1
sleep 3
l1=$(sql "SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
w1=$(awk '/^write_bytes/ {print $2}' "/proc/$wpid/io")
python3 -c "w=$w1-$w0; l=$l1-$l0; print(f'async stream at 20 TPS: {l/1048576:.1f} MiB of WAL, {w/1048576:.1f} MiB written: {w/max(l,1):.2f}x')"
stop_all
