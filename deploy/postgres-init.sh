#!/usr/bin/env bash
# The role walvault connects as, for the postgres service of
# docker-compose.yml (mounted into /docker-entrypoint-initdb.d/, run once
# when the data directory is created) and for scripts/sidecar-local (run
# after initdb).
#
#   - LOGIN REPLICATION: base backups and the WAL stream use the
#     replication protocol; the stream creates its slot itself;
#   - pg_monitor: `check` and the daemon's health read
#     pg_replication_slots, pg_stat_replication and data_directory;
#   - a pg_hba.conf line that lets it replicate over TCP with a password.
#
# env: WALVAULT_ROLE_PASSWORD  the role's password (required)
#      POSTGRES_USER, POSTGRES_DB  whom psql connects as, and where
#      PGDATA  the data directory (its pg_hba.conf gets the line)
#
# The image's entrypoint sources this file when it is not executable:
# no `exit`, no `set -u`.
set -e
: "${WALVAULT_ROLE_PASSWORD:?set WALVAULT_ROLE_PASSWORD, the password of the role walvault}"
: "${PGDATA:?set PGDATA, the data directory}"

psql -v ON_ERROR_STOP=1 --no-psqlrc -q \
  --username "${POSTGRES_USER:-postgres}" --dbname "${POSTGRES_DB:-postgres}" \
  --set=walvault_password="$WALVAULT_ROLE_PASSWORD" <<'SQL'
SET password_encryption = 'scram-sha-256';
CREATE ROLE walvault WITH LOGIN REPLICATION PASSWORD :'walvault_password';
GRANT pg_monitor TO walvault;
SQL

printf '\n# walvault: base backups and the WAL stream\nhost replication walvault all scram-sha-256\n' \
  >> "$PGDATA/pg_hba.conf"
echo "postgres-init: role walvault created (REPLICATION, pg_monitor)"
