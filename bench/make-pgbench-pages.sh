#!/usr/bin/env bash
# Make the "real pgbench relation pages" input of benches/block_pipeline.rs.
#
# usage: bench/make-pgbench-pages.sh OUTFILE
# env:   PG_BIN       PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#        PAGES_BYTES  bytes to copy (default 64 MiB)
#
# Creates a throwaway cluster in a temp dir, loads it with `pgbench -i -s 5`
# (pgbench_accounts is then ~65 MiB, just over the 64 MiB we copy), runs
# `pgbench -T 10` so the pages carry dead tuples, free space and hint bits like
# a live table, CHECKPOINTs so every page is on disk, and copies the first
# PAGES_BYTES of pgbench_accounts' relation file to OUTFILE. The server listens
# only on a unix socket in a private directory, so it never clashes with another
# cluster. The cluster is stopped and removed on exit, whatever happens.
# PostgreSQL refuses to run as root: as root, every PostgreSQL program runs as
# the postgres user.
set -euo pipefail
[ $# -eq 1 ] || { echo "usage: $0 OUTFILE" >&2; exit 2; }
out=$1
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
bytes=${PAGES_BYTES:-$((64 << 20))}

for p in initdb pg_ctl pgbench psql; do
  [ -x "$PG_BIN/$p" ] || { echo "$PG_BIN/$p not found: install PostgreSQL 15 (scripts/install-deps.sh) or set PG_BIN" >&2; exit 1; }
done

tmp=$(mktemp -d -t walvault-pgbench-pages.XXXXXX)
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

# A port nobody listens on (the socket is private anyway; the port only names it).
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null || echo 54329)

pg mkdir "$sock"
pg "$PG_BIN/initdb" -D "$data" -U postgres -A trust --no-sync >/dev/null
started=1
pg "$PG_BIN/pg_ctl" -D "$data" -l "$tmp/server.log" -w \
  -o "-p $port -k $sock -c listen_addresses='' -c fsync=off" start >/dev/null

conn=(-h "$sock" -p "$port" -U postgres)
echo "# pgbench -i -s 5" >&2
pg "$PG_BIN/pgbench" "${conn[@]}" -i -s 5 -q postgres >/dev/null 2>&1
echo "# pgbench -T 10 (churn)" >&2
pg "$PG_BIN/pgbench" "${conn[@]}" -c 2 -j 2 -T 10 postgres >/dev/null
pg "$PG_BIN/psql" "${conn[@]}" -X -q -c CHECKPOINT postgres
rel=$(pg "$PG_BIN/psql" "${conn[@]}" -X -At -c "SELECT pg_relation_filepath('pgbench_accounts')" postgres)
file=$data/$rel

size=$(stat -c %s "$file")
if [ "$size" -lt "$bytes" ]; then
  echo "$file is $size bytes, less than the $bytes wanted: use a larger pgbench scale" >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
head -c "$bytes" "$file" >"$out.tmp"
mv "$out.tmp" "$out"
echo "# wrote $bytes bytes of pgbench_accounts ($rel, $size bytes) to $out" >&2
