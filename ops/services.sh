#!/usr/bin/env bash
# Start PostgreSQL for the tests on 127.0.0.1:5432, with a role and database for
# them, when it does not answer; print their DATABASE_URL. (Redis needs nothing:
# a test run starts its own, with webui.launcher as `make run` does.)
#
# Idempotent: a server that already answers is left alone. PostgreSQL is
# Debian's own cluster (pg_createcluster/pg_ctlcluster), which needs root;
# without root an already running server is used if the URL logs in.
set -euo pipefail

PG_USER=imaging
PG_PASSWORD=imaging
PG_DATABASE=imaging
PG_CLUSTER=main

say() { echo "services: $*" >&2; }
fail() { say "$*"; exit 1; }

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

postgres_url() { echo "postgres://$PG_USER:$PG_PASSWORD@127.0.0.1:$1/$PG_DATABASE"; }

logs_in() { psql "$1" -tAc 'SELECT 1' >/dev/null 2>&1; }

as_postgres() { runuser -u postgres -- "$@"; }

start_postgres() {
    local url
    url=$(postgres_url 5432)
    if logs_in "$url"; then
        say "PostgreSQL answers at $url"
        echo "DATABASE_URL=$url"
        return
    fi
    [ "$(id -u)" = 0 ] || fail "PostgreSQL does not answer at $url, and starting Debian's cluster needs root"
    local version
    version=$(ls /usr/lib/postgresql 2>/dev/null | sort -V | tail -n 1)
    [ -n "$version" ] || fail "PostgreSQL is not installed (make install)"
    if ! pg_lsclusters -h | awk -v v="$version" -v c="$PG_CLUSTER" '$1 == v && $2 == c {found=1} END {exit !found}'; then
        pg_createcluster --port 5432 "$version" "$PG_CLUSTER" >/dev/null
    fi
    local port status
    read -r port status < <(pg_lsclusters -h | awk -v v="$version" -v c="$PG_CLUSTER" '$1 == v && $2 == c {print $3, $4}')
    if [ "$status" != online ]; then
        pg_ctlcluster "$version" "$PG_CLUSTER" start
    fi
    wait_for 30 pg_isready -q -h 127.0.0.1 -p "$port" || fail "PostgreSQL $version/$PG_CLUSTER did not start"

    # The tests' role may create databases: pytest-django makes its own test_ one.
    if [ "$(as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_roles WHERE rolname = '$PG_USER'")" != 1 ]; then
        as_postgres psql -p "$port" -q -c "CREATE ROLE $PG_USER LOGIN CREATEDB PASSWORD '$PG_PASSWORD'"
    fi
    if [ "$(as_postgres psql -p "$port" -tAc "SELECT 1 FROM pg_database WHERE datname = '$PG_DATABASE'")" != 1 ]; then
        as_postgres createdb -p "$port" -O "$PG_USER" "$PG_DATABASE"
    fi
    url=$(postgres_url "$port")
    logs_in "$url" || fail "PostgreSQL is up but $url does not log in"
    say "PostgreSQL $version/$PG_CLUSTER answers at $url"
    echo "DATABASE_URL=$url"
}

start_postgres
