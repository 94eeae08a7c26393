#!/usr/bin/env bash
# Install moto's S3 server (PyPI `moto[server]`) into a virtualenv, for the
# tests of write-once repositories: Garage ignores S3 Object Lock, moto
# enforces it.
# usage: scripts/install-moto.sh       (prints the path of moto_server)
# env:   WALVAULT_MOTO_ROOT  the virtualenv (default: $WALVAULT_CACHE/moto)
set -euo pipefail
CACHE=${WALVAULT_CACHE:-/var/cache/walvault}
ROOT=${WALVAULT_MOTO_ROOT:-$CACHE/moto}
BIN=$ROOT/bin/moto_server
if [ ! -x "$BIN" ]; then
  t0=$(date +%s)
  mkdir -p "$(dirname "$ROOT")"
  python3 -m venv "$ROOT" >&2
  "$ROOT/bin/pip" install -q 'moto[server]>=5,<6' >&2
  echo "# moto installed in $(( $(date +%s) - t0 )) s" >&2
fi
echo "$BIN"
