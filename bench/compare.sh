#!/usr/bin/env bash
# End-to-end comparison on one pgbench database, in one run, on this machine:
#   full backup   walvault | pg_basebackup -Ft -X none | pg_basebackup client-lz4 |
#                 pg_basebackup server-zstd:1 | pgbackrest full |
#                 pg_basebackup to /dev/null (the protocol's floor: nothing kept)
#   after churn   walvault (deduplicated) | pgbackrest incr
#   restore       walvault restore | pgbackrest restore           (files only; the
#                 latest backup, taken after the churn, and the full one before it)
#                 | dd of the database's size with O_DIRECT (the disk's floor)
#   s3restore     walvault backup into a single-node Garage bucket, then
#                 walvault restore from it (throughput from object storage;
#                 pgBackRest's S3 client needs TLS, which Garage does not serve)
#   PITR (RTO)    walvault restore-pitr --start | pgbackrest restore --type=time + start
#                 (the same backup window: both restore a backup from before the
#                 churn and replay it to the same target; pgBackRest's archive-get
#                 asynchronous, as its user guide recommends)
#   archive call  walvault wal-push | pgbackrest archive-push      (per call,
#                 synchronous, and both tools' asynchronous modes)
# (The RPO of `walvault stream`, commit to durable under pgbench, is
# bench/rpo.sh.)
# Each measured operation runs ROUNDS times, the tools alternating; the table
# shows the median wall time, CPU (user+sys), peak RSS and bytes stored, and
# ratios against walvault. The database is in the page cache for every tool,
# and each operation starts after a sync (nothing left to write back).
#
# usage: bench/compare.sh [SCALE]        (pgbench scale, default 100 ≈ 1.5 GB)
# env:   ROUNDS (default 2), PG_BIN (default /usr/lib/postgresql/15/bin),
#        PHASES (default "full incr restore s3restore pitr push20": the phases measured;
#        the full backups of walvault and pgBackRest always run, once when
#        "full" is left out, since the later phases start from them),
#        WALVAULT_BIN (default: cargo build --release), KEEP=1 keeps the work dir,
#        WV_INIT_ARGS (options of walvault's `init`, e.g. "--compression zstd:1")
# Installs pgbackrest and GNU time with apt-get when missing. Runs as root
# (PostgreSQL, pgbackrest and walvault then run as the postgres user) or as
# the database's OS user.
set -euo pipefail
SCALE=${1:-100}
ROUNDS=${ROUNDS:-2}
PHASES=" ${PHASES:-full incr restore s3restore pitr push20} "
want() { [[ "$PHASES" == *" $1 "* ]]; }
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
root=$(cd "$(dirname "$0")/.." && pwd)

need=()
command -v pgbackrest >/dev/null || need+=(pgbackrest)
[ -x /usr/bin/time ] || need+=(time)
if [ ${#need[@]} -gt 0 ]; then
  echo "# installing ${need[*]}" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
# shellcheck source=bench/lib.sh
. "$root/bench/lib.sh"
bench_setup compare initdb pg_ctl pgbench psql pg_basebackup
run() { (cd "$tmp" && "${as[@]}" "$@"); }
wv=$tmp/walvault
data=$tmp/data
sock=$tmp/sock
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
started=()
garage_pid=
cleanup() {
  if [ -n "$garage_pid" ]; then kill -TERM "$garage_pid" 2>/dev/null || true; wait "$garage_pid" 2>/dev/null || true; fi
  for d in "${started[@]}"; do
    run "$PG_BIN/pg_ctl" -D "$d" -m immediate -w stop >/dev/null 2>&1 || true
  done
  pkill -f -- "--slot walvault_bench" 2>/dev/null || true
  if [ "${KEEP:-0}" = 1 ]; then echo "# kept $tmp" >&2; else rm -rf "$tmp"; fi
}
trap cleanup EXIT

run mkdir -p "$sock" "$tmp/pgbr-repo" "$tmp/pgbr-log" "$tmp/pgbr-lock" "$tmp/pgbr-spool" "$tmp/out"
cat >"$tmp/pgbackrest.conf" <<EOF
[global]
repo1-path=$tmp/pgbr-repo
log-path=$tmp/pgbr-log
lock-path=$tmp/pgbr-lock
spool-path=$tmp/pgbr-spool
compress-type=lz4
process-max=2
start-fast=y
log-level-console=warn
log-level-file=off
repo1-retention-full=100

# archive-get as pgBackRest's user guide recommends for recovery: asynchronous,
# segments fetched ahead in parallel into the spool
[global:archive-get]
archive-async=y
process-max=2

[bench]
pg1-path=$data
pg1-socket-path=$sock
pg1-port=$port
pg1-user=postgres

[push]
pg1-path=$data
pg1-socket-path=$sock
pg1-port=$port
pg1-user=postgres

[pushasync]
pg1-path=$data
pg1-socket-path=$sock
pg1-port=$port
pg1-user=postgres
archive-async=y
EOF
chmod 644 "$tmp/pgbackrest.conf"
pgbr=(pgbackrest "--config=$tmp/pgbackrest.conf" --stanza=bench)

echo "# cluster: PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}'), pgbench scale $SCALE" >&2
run "$PG_BIN/initdb" -D "$data" -U postgres -A trust -k --no-sync >/dev/null
cat >>"$data/postgresql.conf" <<EOF
port = $port
unix_socket_directories = '$sock'
listen_addresses = ''
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
track_commit_timestamp = on
shared_buffers = 256MB
max_wal_size = 4GB
archive_mode = on
archive_command = 'pgbackrest --config=$tmp/pgbackrest.conf --stanza=bench archive-push %p'
EOF
run "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w start >/dev/null
started+=("$data")
conn=(-h "$sock" -p "$port" -U postgres)
q() { run "$PG_BIN/psql" "${conn[@]}" -X -At -c "$1" postgres; }
run "$PG_BIN/pgbench" "${conn[@]}" -i -q -s "$SCALE" postgres >/dev/null 2>&1
q "CHECKPOINT" >/dev/null
db_bytes=$(q "SELECT sum(pg_database_size(datname)) FROM pg_database")
echo "# database: $((db_bytes / 1000000)) MB" >&2
run "${pgbr[@]}" stanza-create >/dev/null
pgconn="host=$sock port=$port user=postgres dbname=postgres"

# measure (bench/lib.sh) appends "name wall cpu rss_kib bytes" here
results=$tmp/results.txt
: >"$results"

full_rounds=$ROUNDS
want full || full_rounds=1
echo "# full backups (x$full_rounds)" >&2
for r in $(seq "$full_rounds"); do
  run rm -rf "$tmp/wv-repo" "$tmp/out/bb" "$tmp/out/bb-lz4"
  # shellcheck disable=SC2086 # WV_INIT_ARGS is a list of options
  run "$wv" --repo "$tmp/wv-repo" init ${WV_INIT_ARGS:-} >/dev/null
  measure "full:walvault" "$tmp/wv-repo" "$wv" -q --repo "$tmp/wv-repo" backup --pg "$pgconn" --fast
  if want full; then
    measure "full:pg_basebackup" "$tmp/out/bb" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/out/bb" -Ft -X none -c fast --no-sync
    measure "full:pg_basebackup-lz4" "$tmp/out/bb-lz4" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/out/bb-lz4" -Ft -X none -c fast --no-sync --compress=client-lz4
    # the bytes walvault's zstd:1 default is held against (issue 14)
    run rm -rf "$tmp/out/bb-zstd"
    measure "full:pg_basebackup-server-zstd1" "$tmp/out/bb-zstd" "$PG_BIN/pg_basebackup" "${conn[@]}" -D "$tmp/out/bb-zstd" -Ft -X none -c fast --no-sync --compress=server-zstd:1
    # the floor of any tool that reads over the protocol: the same
    # BASE_BACKUP, received and thrown away (the walsender's work and a
    # client that does nothing with the bytes)
    measure "full:pg_basebackup-to-null" "$tmp/out" sh -c "'$PG_BIN/pg_basebackup' -h '$sock' -p $port -U postgres -D - -Ft -X none -c fast >/dev/null"
  fi
  measure "full:pgbackrest" "$tmp/pgbr-repo" "${pgbr[@]}" --type=full backup
done

# continuous WAL for the PITR case, then churn
run "$wv" --repo "$tmp/wv-repo" stream --pg "$pgconn" --slot walvault_bench --status-file "$tmp/stream.json" -q \
  >"$tmp/stream.log" 2>&1 &
sleep 2
# the stream starts after the measured backups: a base backup it continues
# from (not measured), so walvault's archive has no gap before the churn
run "$wv" -q --repo "$tmp/wv-repo" backup --pg "$pgconn" --fast >/dev/null
echo "# churn: pgbench -T 20" >&2
run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 20 postgres >/dev/null
q "CREATE TABLE marker(t text); INSERT INTO marker VALUES ('before the target')" >/dev/null
sleep 1.1
target=$(q "SELECT to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US+00')")
sleep 1.1
q "INSERT INTO marker VALUES ('after the target')" >/dev/null
run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 5 postgres >/dev/null

want incr && echo "# incremental backups (x$ROUNDS)" >&2
want incr && for r in $(seq "$ROUNDS"); do
  # every round follows its own 20 s of churn (the first one the churn above)
  if [ "$r" -gt 1 ]; then
    run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 20 postgres >/dev/null
  fi
  measure "incr:walvault" "$tmp/wv-repo" "$wv" -q --repo "$tmp/wv-repo" backup --pg "$pgconn" --fast
  measure "incr:pgbackrest" "$tmp/pgbr-repo" "${pgbr[@]}" --type=incr backup
done
# everything archived by both before the restores
end=$(q "SELECT pg_current_wal_insert_lsn()")
q "SELECT pg_switch_wal()" >/dev/null
wait_durable "$tmp/stream.json" "$end" 60
run "${pgbr[@]}" check >/dev/null 2>&1 || true
pkill -TERM -f -- "--slot walvault_bench" || true
sleep 1

# Restores and PITR: round 0 is a warm-up, not recorded (the first
# operation to write gigabytes into this VM's memory pays for touching it:
# 7-8 s for either tool), and the order of the tools alternates by round.
restore_wv() {
  run rm -rf "$tmp/r-wv"
  measure "restore:walvault" "$tmp/r-wv" "$wv" -q --repo "$tmp/wv-repo" restore --backup latest --pgdata "$tmp/r-wv"
  restore_disk
}
# the disk's floor, in the same rounds: the database's size written with
# O_DIRECT in 4 MiB writes and fsynced, one stream, by dd
restore_disk() {
  run rm -f "$tmp/disk.out"
  measure "restore:disk-dd-direct" "$tmp/out" dd if=/dev/zero "of=$tmp/disk.out" bs=4M "count=$(( (db_bytes + 4194303) / 4194304 ))" oflag=direct conv=fsync
  run rm -f "$tmp/disk.out"
}
restore_pgbr() {
  run rm -rf "$tmp/r-pgbr"
  measure "restore:pgbackrest" "$tmp/r-pgbr" "${pgbr[@]}" "--pg1-path=$tmp/r-pgbr" restore
}
rounds() { # FIRST SECOND: round 0 unrecorded, then ROUNDS alternating
  local keep=$results
  for r in $(seq 0 "$ROUNDS"); do
    if [ "$r" = 0 ]; then results=$tmp/warmup.txt; else results=$keep; fi
    if [ $((r % 2)) = 1 ]; then "$1"; "$2"; else "$2"; "$1"; fi
  done
  results=$keep
}
want restore && echo "# restores (warm-up + x$ROUNDS)" >&2
want restore && rounds restore_wv restore_pgbr
# the full backup each tool took before the churn: its blocks are all of
# one backup (the latest's are spread over four)
first_wv=$(run "$wv" --repo "$tmp/wv-repo" list --json | python3 -c 'import json, sys; print(json.load(sys.stdin)[0]["id"])')
first_pgbr=$(run "${pgbr[@]}" info --output=json | python3 -c 'import json, sys; print([b["label"] for b in json.load(sys.stdin)[0]["backup"] if b["type"] == "full"][-1])')
restore_first_wv() {
  run rm -rf "$tmp/r-wv"
  measure "restorefull:walvault" "$tmp/r-wv" "$wv" -q --repo "$tmp/wv-repo" restore --backup "$first_wv" --pgdata "$tmp/r-wv"
}
restore_first_pgbr() {
  run rm -rf "$tmp/r-pgbr"
  measure "restorefull:pgbackrest" "$tmp/r-pgbr" "${pgbr[@]}" "--pg1-path=$tmp/r-pgbr" "--set=$first_pgbr" restore
}
want restore && echo "# restores of the full backup before the churn (warm-up + x$ROUNDS)" >&2
want restore && rounds restore_first_wv restore_first_pgbr

if want s3restore; then
  # the same database into a Garage bucket on this machine, then restores
  # from it: what a restore from object storage reaches (ranged GETs,
  # concurrent downloads) next to the local repository's figure above
  start_garage "$tmp/garage" walvault
  garage_config "$tmp/walvault-s3.toml" walvault
  wv_s3=(env AWS_ACCESS_KEY_ID="$s3_key" AWS_SECRET_ACCESS_KEY="$s3_secret" "$wv" -q --config "$tmp/walvault-s3.toml")
  # shellcheck disable=SC2086 # WV_INIT_ARGS is a list of options
  garage_retry "$tmp/garage" run "${wv_s3[@]}" init ${WV_INIT_ARGS:-}
  echo "# backup into Garage, restores from it (warm-up + x$ROUNDS)" >&2
  measure "s3backup:walvault-garage" "$tmp/garage/data" "${wv_s3[@]}" backup --pg "$pgconn" --fast
  restore_s3() {
    run rm -rf "$tmp/r-s3"
    measure "s3restore:walvault-garage" "$tmp/r-s3" "${wv_s3[@]}" restore --backup latest --pgdata "$tmp/r-s3"
  }
  keep=$results
  results=$tmp/warmup.txt
  restore_s3
  results=$keep
  for r in $(seq "$ROUNDS"); do restore_s3; done
  run rm -rf "$tmp/r-s3"
fi

# PITR: restore to the target time, start, replay, promote; the RTO
pitr_port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cat >"$tmp/pgbr-pitr.sh" <<EOF
set -e
pgbackrest --config=$tmp/pgbackrest.conf --stanza=bench --pg1-path=$tmp/p-pgbr --type=time "--target=$target" --target-action=promote --archive-mode=off restore >/dev/null
$PG_BIN/pg_ctl -D $tmp/p-pgbr -l $tmp/p-pgbr.log -W -o "-p $pitr_port" start >/dev/null
for i in \$(seq 1200); do
  v=\$($PG_BIN/psql -h $sock -p $pitr_port -U postgres -X -At -c "SELECT pg_is_in_recovery()" postgres 2>/dev/null || true)
  [ "\$v" = f ] && exit 0
  sleep 0.1
done
exit 1
EOF
chmod 755 "$tmp/pgbr-pitr.sh"
check_marker() { # DATADIR TOOL
  got=$(run "$PG_BIN/psql" -h "$sock" -p "$pitr_port" -U postgres -X -At -c "SELECT string_agg(t, ',') FROM marker" postgres)
  [ "$got" = "before the target" ] || { echo "$2 PITR recovered marker=$got" >&2; exit 1; }
  run "$PG_BIN/pg_ctl" -D "$1" -m immediate -w stop >/dev/null
  run rm -rf "$1"
}
pitr_wv() {
  measure "pitr:walvault" "$tmp/p-wv" "$wv" -q --repo "$tmp/wv-repo" restore-pitr --pgdata "$tmp/p-wv" \
    --target-time "$target" --start --port "$pitr_port" --pg-bin "$PG_BIN" --archive-mode off --json
  # where the time went, from walvault's own report
  python3 - "$tmp/cmd.log" >&2 <<'PY' || true
import json, sys
# (the report is the last JSON line; notes on stderr may follow it)
r = json.loads([l for l in open(sys.argv[1]).read().splitlines() if l.startswith("{")][-1])
print(f"#     restore {r['restore_seconds']:.2f}s, WAL staged {r['wal_fetch_seconds']:.2f}s, "
      f"replay {r['replay_seconds']:.2f}s, {r['wal_files']} WAL files, "
      f"{(r['wal_bytes_replayed'] or 0) / 2**20:.0f} MiB replayed")
PY
  check_marker "$tmp/p-wv" walvault
}
pitr_pgbr() {
  measure "pitr:pgbackrest" "$tmp/p-pgbr" bash "$tmp/pgbr-pitr.sh"
  check_marker "$tmp/p-pgbr" pgbackrest
}
want pitr && echo "# point-in-time recovery to $target (warm-up + x$ROUNDS)" >&2
want pitr && rm -rf "$tmp/r-wv" "$tmp/r-pgbr" && rounds pitr_wv pitr_pgbr

if want push20; then
  # per-call cost of the archive command: on segments full of pgbench WAL,
  # and on 20 segments switched after one insert each (mostly empty)
  echo "# archive command, one call per segment" >&2
  run mkdir -p "$tmp/segs" "$tmp/segs-full"
  seg_lt() { ls "$data/pg_wal" | grep -E '^[0-9A-F]{24}$' | sort | awk -v c="$1" '$0 < c'; }
  first=$(q "SELECT pg_walfile_name(pg_current_wal_lsn())")
  # pgbench until at least 4 segments after the current one are complete
  # (small scales write little WAL per second)
  for _ in $(seq 15); do
    run "$PG_BIN/pgbench" "${conn[@]}" -n -c 2 -j 2 -T 2 postgres >/dev/null
    cur=$(q "SELECT pg_walfile_name(pg_current_wal_lsn())")
    [ "$(seg_lt "$cur" | awk -v f="$first" '$0 > f' | wc -l)" -ge 4 ] && break
  done
  # complete segments written by these pgbench runs (none recycled: no checkpoint)
  seg_lt "$cur" | awk -v f="$first" '$0 > f' | tail -20 | while read -r s; do cp "$data/pg_wal/$s" "$tmp/segs-full/"; done
  for i in $(seq 20); do
    q "INSERT INTO marker VALUES ('seg $i'); SELECT pg_switch_wal()" >/dev/null
  done
  q "CHECKPOINT" >/dev/null
  cur=$(q "SELECT pg_walfile_name(pg_current_wal_lsn())")
  # the 20 complete segments before the current one (later names are recycled files)
  seg_lt "$cur" | tail -20 | while read -r s; do cp "$data/pg_wal/$s" "$tmp/segs/"; done
  chown -R "$(stat -c %u "$tmp")" "$tmp/segs" "$tmp/segs-full"
  echo "# $(ls "$tmp/segs-full" | wc -l) full segments, $(ls "$tmp/segs" | wc -l) switched ones" >&2
  run "$wv" --repo "$tmp/wv-push" init >/dev/null
  # a second pgBackRest stanza of the same cluster, empty: first-time pushes
  run pgbackrest "--config=$tmp/pgbackrest.conf" --stanza=push stanza-create >/dev/null
  for set in segs-full segs; do
    cat >"$tmp/push-wv-$set.sh" <<EOF
for f in $tmp/$set/*; do $wv -q --repo $tmp/wv-push wal-push \$f || exit 1; done
EOF
    cat >"$tmp/push-pgbr-$set.sh" <<EOF
for f in $tmp/$set/*; do pgbackrest --config=$tmp/pgbackrest.conf --stanza=push archive-push \$f >/dev/null 2>&1 || exit 1; done
EOF
  done
  ls "$tmp/segs-full" | wc -l >"$tmp/nfull"
  measure "pushfull:walvault" "$tmp/wv-push" bash "$tmp/push-wv-segs-full.sh"
  measure "pushfull:pgbackrest" "$tmp/pgbr-repo" bash "$tmp/push-pgbr-segs-full.sh"
  measure "pushfull:walvault-again" "$tmp/wv-push" bash "$tmp/push-wv-segs-full.sh"
  measure "pushfull:pgbackrest-again" "$tmp/pgbr-repo" bash "$tmp/push-pgbr-segs-full.sh"
  measure "push20:walvault" "$tmp/wv-push" bash "$tmp/push-wv-segs.sh"
  measure "push20:pgbackrest" "$tmp/pgbr-repo" bash "$tmp/push-pgbr-segs.sh"
  measure "push20:walvault-again" "$tmp/wv-push" bash "$tmp/push-wv-segs.sh"
  measure "push20:pgbackrest-again" "$tmp/pgbr-repo" bash "$tmp/push-pgbr-segs.sh"
  # asynchronous modes: each tool gets a pg_wal of its own with every file
  # marked ready (archive_status/*.ready), as when the archiver is behind;
  # the loop calls the archive command per file in order and marks it done,
  # as PostgreSQL does. Only the calls are timed (and their CPU: the
  # background processes' work is not in the CPU column).
  run "$wv" --repo "$tmp/wv-push-async" init >/dev/null
  run pgbackrest "--config=$tmp/pgbackrest.conf" --stanza=pushasync stanza-create >/dev/null
  # (pgBackRest's asynchronous mode wants the WAL inside its pg1-path, with
  # the cluster's pg_control: a data directory of its own for each set)
  prep_wal() { # DIR SET
    rm -rf "$1"
    mkdir -p "$1/global" "$1/pg_wal/archive_status"
    cp "$data/global/pg_control" "$1/global/"
    cp "$tmp/$2"/* "$1/pg_wal/"
    for f in "$tmp/$2"/*; do : >"$1/pg_wal/archive_status/$(basename "$f").ready"; done
    chmod 700 "$1"
    chown -R "$(stat -c %u "$tmp")" "$1"
  }
  for set in segs-full segs; do
    cat >"$tmp/push-async-wv-$set.sh" <<EOF
cd $tmp/aw-wv-$set/pg_wal
for f in 0*; do $wv -q --repo $tmp/wv-push-async wal-push --async $tmp/aw-wv-$set/pg_wal/\$f || exit 1; mv archive_status/\$f.ready archive_status/\$f.done; done
EOF
    cat >"$tmp/push-async-pgbr-$set.sh" <<EOF
cd $tmp/aw-pgbr-$set/pg_wal
for f in 0*; do pgbackrest --config=$tmp/pgbackrest.conf --stanza=pushasync --pg1-path=$tmp/aw-pgbr-$set archive-push $tmp/aw-pgbr-$set/pg_wal/\$f >/dev/null 2>&1 || exit 1; mv archive_status/\$f.ready archive_status/\$f.done; done
EOF
    prep_wal "$tmp/aw-wv-$set" "$set"
    prep_wal "$tmp/aw-pgbr-$set" "$set"
  done
  measure "pushfull:walvault-async" "$tmp/wv-push-async" bash "$tmp/push-async-wv-segs-full.sh"
  measure "pushfull:pgbackrest-async" "$tmp/pgbr-repo" bash "$tmp/push-async-pgbr-segs-full.sh"
  measure "push20:walvault-async" "$tmp/wv-push-async" bash "$tmp/push-async-wv-segs.sh"
  measure "push20:pgbackrest-async" "$tmp/pgbr-repo" bash "$tmp/push-async-pgbr-segs.sh"
fi

nfull=$(cat "$tmp/nfull" 2>/dev/null || echo 0)
python3 - "$results" "$db_bytes" "$nfull" <<'PY'
import sys, statistics, collections
rows = collections.defaultdict(list)
for line in open(sys.argv[1]):
    name, wall, cpu, rss, stored = line.split()
    rows[name].append((float(wall), float(cpu), int(rss), int(stored)))
db = int(sys.argv[2])
calls = {"push20": 20, "pushfull": int(sys.argv[3])}
def med(name, i):
    return statistics.median(r[i] for r in rows[name])
phases = collections.OrderedDict()
for name in rows:
    phase, tool = name.split(":")
    phases.setdefault(phase, []).append(tool)
titles = {"full": "Full backup", "incr": "Second backup after 20 s of pgbench churn",
          "restore": "Restore of the latest backup (taken after the churn; files only)",
          "restorefull": "Restore of the full backup taken before the churn (files only)",
          "s3backup": "Full backup into a Garage bucket (127.0.0.1)",
          "s3restore": "Restore from a Garage bucket (127.0.0.1; compare with the local restore above)", "pitr": "Point-in-time recovery: restore + WAL + replay + promote (RTO)",
          "push20": "Archive command: 20 mostly empty (switched) segments, one call each",
          "pushfull": f"Archive command: {calls['pushfull']} segments full of pgbench WAL, one call each"}
print(f"database: {db/1e6:.0f} MB; median of {len(rows[next(iter(rows))])} runs per tool\n")
for phase, tools in phases.items():
    print(f"### {titles.get(phase, phase)}\n")
    rate = "ms per call" if phase in calls else "MB/s"
    print(f"| tool | wall s | CPU s | peak RSS MiB | stored MiB | {rate} | wall vs walvault |")
    print("|---|---|---|---|---|---|---|")
    base = med(f"{phase}:walvault", 0) if f"{phase}:walvault" in rows else None
    for t in tools:
        n = f"{phase}:{t}"
        w, c, m, s = (med(n, i) for i in range(4))
        mbs = f"{db/1e6/w:.0f}" if phase in ("full", "restore", "restorefull", "pitr", "s3backup", "s3restore") else "-"
        if phase in calls and calls[phase]:
            mbs = f"{w * 1000 / calls[phase]:.1f}"
        ratio = f"{w/base:.2f}x" if base else "-"
        stored = f"{s/2**20:.1f}" if phase in ("full", "incr", "push20", "pushfull") else "-"
        print(f"| {t} | {w:.2f} | {c:.2f} | {m/1024:.0f} | {stored} | {mbs} | {ratio} |")
    print()
PY
