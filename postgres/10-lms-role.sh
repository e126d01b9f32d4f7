#!/bin/sh
# compose.yaml: run once by the PostgreSQL image, as its superuser, on the first start of
# an empty data volume (after the TimescaleDB image's own scripts created the extension in
# POSTGRES_DB). The application's role logs in and owns its database, nothing more: it
# cannot read server files, run programs, create roles or databases, or reach other
# databases' data. The superuser (POSTGRES_USER) stays for the administrator.
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres -v app_password="$LMS_DB_PASSWORD" <<'SQL'
CREATE ROLE lms LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS PASSWORD :'app_password';
ALTER DATABASE lms OWNER TO lms;
SQL
