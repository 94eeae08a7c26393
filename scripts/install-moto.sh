#!/usr/bin/env bash
# Install the Python test tools into one virtualenv: moto's S3 server (PyPI
# `moto[server]`) for the tests of write-once repositories (Garage ignores
# S3 Object Lock, moto enforces it), aiosmtpd (the SMTP server that
# receives the daemon's alert emails) and selenium (drives chromium for
# the status page's browser test).
# usage: scripts/install-moto.sh       (prints the path of moto_server)
# env:   WALVAULT_MOTO_ROOT  the virtualenv (default: $WALVAULT_CACHE/moto)
set -euo pipefail
CACHE=${WALVAULT_CACHE:-/var/cache/walvault}
ROOT=${WALVAULT_MOTO_ROOT:-$CACHE/moto}
BIN=$ROOT/bin/moto_server
if [ ! -x "$BIN" ] || ! "$ROOT/bin/python" -c 'import aiosmtpd, selenium' 2>/dev/null; then
  t0=$(date +%s)
  mkdir -p "$(dirname "$ROOT")"
  [ -x "$ROOT/bin/pip" ] || python3 -m venv "$ROOT" >&2
  "$ROOT/bin/pip" install -q 'moto[server]>=5,<6' 'aiosmtpd>=1.4,<2' 'selenium>=4.20,<5' >&2
  echo "# python test tools installed in $(( $(date +%s) - t0 )) s" >&2
fi
echo "$BIN"
