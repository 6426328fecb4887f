#!/bin/sh
# Initialise PGDATA when empty (running /docker-entrypoint-initdb.d/*.sql once), then run the
# server as the postgres user. Arguments after "postgres" go to the server.
set -eu
[ "${1:-}" = postgres ] && shift
mkdir -p "$PGDATA" /var/run/postgresql
chown postgres:postgres "$PGDATA" /var/run/postgresql
chmod 700 "$PGDATA"
as_postgres() { runuser -u postgres -- "$@"; }
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  pwfile=$(mktemp); echo "${POSTGRES_PASSWORD:-postgres}" > "$pwfile"; chown postgres "$pwfile"
  as_postgres initdb -D "$PGDATA" -U postgres --auth-local=trust --auth-host=scram-sha-256 \
    --pwfile="$pwfile" >/dev/null
  rm -f "$pwfile"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  # the initialising server is private (its socket in /tmp), so nobody connects too early
  as_postgres pg_ctl -D "$PGDATA" -o "-c listen_addresses='' -c unix_socket_directories=/tmp" \
    -w start >/dev/null
  for f in /docker-entrypoint-initdb.d/*.sql; do
    [ -e "$f" ] && as_postgres psql -h /tmp -v ON_ERROR_STOP=1 -q -U postgres -f "$f"
  done
  as_postgres pg_ctl -D "$PGDATA" -m fast -w stop >/dev/null
fi
# setpriv execs the server in place (runuser would stay as its parent): postgres is PID 1 and
# gets the stop signal itself, so `docker stop` (SIGINT: a fast shutdown) ends it in a second
exec setpriv --reuid=postgres --regid=postgres --init-groups postgres -D "$PGDATA" "$@"
