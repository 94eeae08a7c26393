#!/usr/bin/env bash
# Make the "real pgbench WAL" input of benches/wal_decode.rs.
#
# usage: bench/make-pgbench-wal.sh OUTFILE
# env:   PG_BIN  PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#
# Creates a throwaway cluster in a temp dir (unix socket only), runs
# `pgbench -i -s 2`, switches to a new segment, runs pgbench until four more
# segments are complete, and
# concatenates four complete 16 MiB segments of that WAL (the first after
# initialization, so the mix is TPC-B updates with full-page images) into
# OUTFILE, preceded by nothing: the first byte is a segment start. The
# segment number of the first segment is written to OUTFILE.segno. As root,
# PostgreSQL programs run as the postgres user. Cleaned up on exit.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTFILE" >&2; exit 2; }
out=$1
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
for p in initdb pg_ctl pgbench psql; do
  [ -x "$PG_BIN/$p" ] || { echo "$PG_BIN/$p not found: install PostgreSQL 15 (scripts/install-deps.sh) or set PG_BIN" >&2; exit 1; }
done
tmp=$(mktemp -d -t walvault-pgbench-wal.XXXXXX)
as_pg=()
if [ "$(id -u)" = 0 ]; then
  chown postgres: "$tmp"
  as_pg=(runuser -u postgres --)
fi
pg() { (cd "$tmp" && "${as_pg[@]}" "$@"); }
data=$tmp/data
sock=$tmp/sock
started=0
cleanup() {
  if [ "$started" = 1 ]; then
    pg "$PG_BIN/pg_ctl" -D "$data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  rm -rf "$tmp"
}
trap cleanup EXIT
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 54328)
pg mkdir "$sock"
pg "$PG_BIN/initdb" -D "$data" -U postgres -A trust --no-sync >/dev/null
started=1
pg "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w \
  -o "-p $port -k $sock -c listen_addresses='' -c fsync=off -c wal_keep_size=1GB" start >/dev/null
conn=(-h "$sock" -p "$port" -U postgres)
q() { pg "$PG_BIN/psql" "${conn[@]}" -X -At -c "$1" postgres; }
pg "$PG_BIN/pgbench" "${conn[@]}" -i -s 2 -q postgres >/dev/null 2>&1
first=$(q "SELECT pg_walfile_name(pg_switch_wal())")
n=$((16#${first:16:8} + 1))
# TPC-B until four segments after the switch are complete
while :; do
  cur=$(q "SELECT pg_walfile_name(pg_current_wal_lsn())")
  [ $((16#${cur:16:8})) -ge $((n + 4)) ] && break
  echo "# pgbench -T 5 (at $cur)" >&2
  pg "$PG_BIN/pgbench" "${conn[@]}" -c 2 -j 2 -T 5 postgres >/dev/null
done
mkdir -p "$(dirname "$out")"
: >"$out.tmp"
for i in 0 1 2 3; do
  name=${first:0:16}$(printf '%08X' $((n + i)))
  cat "$data/pg_wal/$name" >>"$out.tmp"
done
echo $((16#${first:8:8} * 256 + n)) >"$out.segno"
mv "$out.tmp" "$out"
echo "# wrote 4 segments from ${first:0:16}$(printf '%08X' "$n") to $out" >&2
