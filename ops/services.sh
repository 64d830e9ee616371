#!/usr/bin/env bash
# Start the services the system and its tests need, on loopback, when none answers.
#
#   ops/services.sh redis       Redis on 127.0.0.1:6379 with a password; prints its REDIS_URL
#   ops/services.sh postgres    PostgreSQL on 127.0.0.1:5432 with a role and database
#                               for the tests; prints their DATABASE_URL
#   ops/services.sh             both
#
# Idempotent: a service that already answers is left alone (a Redis without a
# password that answers there, a developer's own, is used as it is). PostgreSQL is
# Debian's own cluster (pg_createcluster/pg_ctlcluster), which needs root;
# without root an already running server is used if the URL logs in.
set -euo pipefail

REDIS_PORT=6379
PG_USER=imaging
PG_PASSWORD=imaging
PG_DATABASE=imaging
PG_CLUSTER=main
RUN_DIR=${TMPDIR:-/tmp}

say() { echo "services: $*" >&2; }
fail() { say "$*"; exit 1; }

wait_for() {  # wait_for SECONDS COMMAND...: until COMMAND succeeds
    local deadline=$((SECONDS + $1)); shift
    until "$@" >/dev/null 2>&1; do
        (( SECONDS < deadline )) || return 1
        sleep 0.2
    done
}

REDIS_DIR=$RUN_DIR/imaging-test-redis-$REDIS_PORT
REDIS_PASSWORD_FILE=$REDIS_DIR/password

redis_says() { REDISCLI_AUTH=${1:-} redis-cli -h 127.0.0.1 -p "$REDIS_PORT" --no-auth-warning ping 2>/dev/null; }
redis_answers_to() { [ "$(redis_says "$1")" = PONG ]; }

start_redis() {
    local password=
    [ -s "$REDIS_PASSWORD_FILE" ] && password=$(cat "$REDIS_PASSWORD_FILE")
    if [ -n "$password" ] && redis_answers_to "$password"; then
        say "Redis answers on 127.0.0.1:$REDIS_PORT"
        echo "REDIS_URL=redis://:$password@127.0.0.1:$REDIS_PORT/0"
        return
    fi
    if redis_answers_to ""; then
        say "a Redis without a password answers on 127.0.0.1:$REDIS_PORT: the tests use it"
        echo "REDIS_URL=redis://127.0.0.1:$REDIS_PORT/0"
        return
    fi
    command -v redis-server >/dev/null || fail "redis-server is not installed (make install)"
    mkdir -p -m 700 "$REDIS_DIR"
    password=$(od -An -N24 -tx1 /dev/urandom | tr -d ' \n')
    (umask 077 && echo "$password" > "$REDIS_PASSWORD_FILE")
    # A broker and channel layer only: nothing worth persisting across restarts. The
    # password goes in on stdin: a command line is readable by every local user.
    printf 'requirepass %s\n' "$password" | redis-server - --bind 127.0.0.1 --port "$REDIS_PORT" \
        --daemonize yes --save '' --appendonly no --dir "$REDIS_DIR" \
        --pidfile "$REDIS_DIR/redis.pid" --logfile "$REDIS_DIR/redis.log" >/dev/null
    wait_for 10 redis_answers_to "$password" \
        || fail "Redis did not answer; see $REDIS_DIR/redis.log"
    say "started Redis on 127.0.0.1:$REDIS_PORT"
    echo "REDIS_URL=redis://:$password@127.0.0.1:$REDIS_PORT/0"
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

case "${1:-all}" in
    redis) start_redis ;;
    postgres) start_postgres ;;
    all) start_redis; start_postgres ;;
    *) fail "usage: $0 [redis|postgres|all]" ;;
esac
