#!/bin/sh
# The application's PostgreSQL role: INFERQ_DB_USER (inferq_app in compose.yaml), password
# INFERQ_DB_PASSWORD, owner of POSTGRES_DB and of its public schema, and nothing more: no
# superuser (which could run `COPY ... TO PROGRAM`), no CREATEROLE, no CREATEDB. The
# superuser POSTGRES_USER may then log in only over the container's Unix socket, so its
# password, which compose/.env hands to every inferq container too, opens nothing over
# the network.
#
# The postgres image runs this once, when it initializes an empty data volume. On a volume
# made before this script existed, run it by hand (it is idempotent; it also hands the
# existing tables to the role, so that its migrations can alter them):
#   docker compose exec -u postgres postgres /docker-entrypoint-initdb.d/10-inferq-app-role.sh
set -eu

superuser="${POSTGRES_USER:-postgres}"
database="${POSTGRES_DB:-$superuser}"
app_role="${INFERQ_DB_USER:-inferq_app}"
: "${INFERQ_DB_PASSWORD:?INFERQ_DB_PASSWORD must be set (the password of the application role)}"

# The password stays out of argv: psql reads it from the environment (\getenv).
psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$superuser" --dbname "$database" \
    --set app_role="$app_role" --set database="$database" <<'SQL'
\getenv app_password INFERQ_DB_PASSWORD
SELECT NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'app_role') AS create_role \gset
\if :create_role
CREATE ROLE :"app_role" LOGIN;
\endif
ALTER ROLE :"app_role" WITH LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS
    PASSWORD :'app_password';
ALTER DATABASE :"database" OWNER TO :"app_role";
ALTER SCHEMA public OWNER TO :"app_role";

-- Tables, views and free-standing sequences a superuser created (a volume from before this
-- script): the role's migrations must own what they alter. Sequences owned by a column
-- follow their table.
SET inferq.app_role = :'app_role';
DO $$
DECLARE
    app text := current_setting('inferq.app_role');
    obj record;
BEGIN
    FOR obj IN
        SELECT c.oid::regclass AS name,
               CASE c.relkind WHEN 'v' THEN 'VIEW' WHEN 'm' THEN 'MATERIALIZED VIEW'
                              WHEN 'S' THEN 'SEQUENCE' ELSE 'TABLE' END AS kind
        FROM pg_class c
        WHERE c.relnamespace = 'public'::regnamespace
          AND c.relkind IN ('r', 'p', 'v', 'm', 'S')
          AND pg_get_userbyid(c.relowner) <> app
          AND NOT EXISTS (SELECT FROM pg_depend d
                          WHERE d.classid = 'pg_class'::regclass AND d.objid = c.oid
                            AND d.deptype IN ('a', 'i'))
    LOOP
        EXECUTE format('ALTER %s %s OWNER TO %I', obj.kind, obj.name, app);
    END LOOP;
    FOR obj IN
        SELECT t.oid::regtype AS name FROM pg_type t
        WHERE t.typnamespace = 'public'::regnamespace AND t.typtype = 'e'
          AND pg_get_userbyid(t.typowner) <> app
    LOOP
        EXECUTE format('ALTER TYPE %s OWNER TO %I', obj.name, app);
    END LOOP;
END
$$;
SQL

# The superuser over TCP: refused, whatever its password (first matching line wins).
hba="${PGDATA:?PGDATA must be set (the postgres image sets it)}/pg_hba.conf"
rule="host all $superuser all reject"
if ! grep -qxF "$rule" "$hba"; then
    {
        echo "# inferq: the superuser logs in over the Unix socket only (docker compose exec postgres psql)"
        echo "$rule"
        cat "$hba"
    } > "$hba.inferq-new"
    cat "$hba.inferq-new" > "$hba"  # in place: the file keeps its owner and mode
    rm "$hba.inferq-new"
    psql --no-psqlrc -v ON_ERROR_STOP=1 --username "$superuser" --dbname "$database" \
        --quiet --tuples-only --command "SELECT pg_reload_conf()" > /dev/null
fi
