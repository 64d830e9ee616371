#!/usr/bin/env bash
# `make test`: the whole suite on SQLite, then the web tests again on PostgreSQL.
#
# Redis and PostgreSQL are started on loopback first when none answers
# (ops/services.sh); the tests use the REDIS_URL it prints. The test process keeps its state in a temporary DATA_DIR,
# so a run never touches ./data, the one `make run` uses.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

services=$(ops/services.sh) || { echo "test: the services did not start" >&2; exit 1; }
postgres_url=$(sed -n 's/^DATABASE_URL=//p' <<<"$services")
REDIS_URL=$(sed -n 's/^REDIS_URL=//p' <<<"$services")
[ -n "$postgres_url" ] && [ -n "$REDIS_URL" ] || { echo "test: the services did not start" >&2; exit 1; }
export REDIS_URL

DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/imaging-test-data.XXXXXX")
export DATA_DIR
trap 'rm -rf "$DATA_DIR"' EXIT
# STATIC_ROOT: the web tests serve no static files, but it must exist.
mkdir "$DATA_DIR/static"

run_pytest() {  # pytest's exit 5 (no test collected) fails the run as well
    "$PY" -m pytest "$@"
    local status=$?
    if [ "$status" -eq 5 ]; then
        echo "pytest collected no tests: failing" >&2
        return 1
    fi
    return "$status"
}

failed=0
echo "== every test, on SQLite"
(unset DATABASE_URL; run_pytest tests) || failed=1
echo "== the web tests, on PostgreSQL at $postgres_url"
DATABASE_URL=$postgres_url run_pytest tests/test_web_*.py || failed=1
exit "$failed"
