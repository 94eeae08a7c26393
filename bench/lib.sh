# Shared setup of the bench scripts (sourced, not run): checks that PG_BIN
# holds the programs named, builds walvault unless WALVAULT_BIN is given, and
# makes a work directory `$tmp` (named walvault-NAME.*) that the database's OS
# user can use, with a copy of the binary in it. Sets `tmp`, `as` (the
# command prefix that runs a program as that user: runuser when root) and
# `WALVAULT_BIN`. Needs `root` (the repository) and `PG_BIN` set.
#
# usage: bench_setup NAME PROGRAM...
bench_setup() {
  local name=$1 p
  shift
  for p in "$@"; do
    [ -x "$PG_BIN/$p" ] || { echo "$PG_BIN/$p not found (scripts/install-deps.sh)" >&2; exit 1; }
  done
  if [ -z "${WALVAULT_BIN:-}" ]; then
    (cd "$root" && cargo build --release -q)
    WALVAULT_BIN=$root/target/release/walvault
  fi
  tmp=$(mktemp -d -t "walvault-$name.XXXXXX")
  chmod 755 "$tmp"
  as=()
  if [ "$(id -u)" = 0 ]; then
    chown postgres: "$tmp"
    as=(runuser -u postgres --)
  fi
  cp "$WALVAULT_BIN" "$tmp/walvault"
  chmod 755 "$tmp/walvault"
}
