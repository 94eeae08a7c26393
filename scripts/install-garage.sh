#!/usr/bin/env bash
# Install the Garage S3-compatible server used by walvault's tests, if it is not there yet.
#
# usage: scripts/install-garage.sh            (prints the path of the garage binary)
# env:   WALVAULT_CACHE        cache root (default: /var/cache/walvault as root, else ~/.cache/walvault)
#        WALVAULT_GARAGE_ROOT  install root (default: $WALVAULT_CACHE/garage)
#        GARAGE_VERSION        crate version (default 2.5.0)
#
# A dev-profile build with the hashing and compression crates at opt-level 3: about
# 3.5 minutes on 2 cores, fast enough for tests. It uses its own target directory so
# it never fights with walvault's build for the cargo lock.
set -euo pipefail
if [ "$(id -u)" = 0 ]; then CACHE=${WALVAULT_CACHE:-/var/cache/walvault}; else CACHE=${WALVAULT_CACHE:-$HOME/.cache/walvault}; fi
ROOT=${WALVAULT_GARAGE_ROOT:-$CACHE/garage}
VER=${GARAGE_VERSION:-2.5.0}
BIN=$ROOT/bin/garage
if [ -x "$BIN" ] && "$BIN" --version 2>/dev/null | grep -q "$VER"; then
  echo "$BIN"; exit 0
fi
if command -v garage >/dev/null 2>&1 && garage --version 2>/dev/null | grep -q "$VER"; then
  command -v garage; exit 0
fi
mkdir -p "$ROOT"
export CARGO_TARGET_DIR=$ROOT/target
cfg=()
for p in blake2 crc-fast crc32fast md-5 sha1 sha2 xxhash-rust zstd-sys ring libsodium-sys; do
  cfg+=(--config "profile.dev.package.$p.opt-level=3")
done
t0=$(date +%s)
CARGO_PROFILE_DEV_DEBUG=0 cargo "${cfg[@]}" install --force "garage@$VER" --locked --debug --root "$ROOT" >&2
rm -rf "$ROOT/target"
echo "# garage $VER built in $(( $(date +%s) - t0 )) s" >&2
echo "$BIN"
