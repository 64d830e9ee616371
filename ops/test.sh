#!/usr/bin/env bash
# `make test`: the whole suite on SQLite, then the web tests again on PostgreSQL.
#
# PostgreSQL is started on loopback first when it does not answer
# (ops/services.sh); each pytest run starts a Redis of its own, with the launcher.
# The test process keeps its state in a temporary DATA_DIR, so a run never
# touches ./data, the one `make run` uses.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python

postgres_url=$(ops/services.sh | sed -n 's/^DATABASE_URL=//p')
[ -n "$postgres_url" ] || { echo "test: PostgreSQL did not start" >&2; exit 1; }
# Each pytest run starts a Redis of its own (tests/support/services.py).
unset REDIS_URL

DATA_DIR=$(mktemp -d "${TMPDIR:-/tmp}/imaging-test-data.XXXXXX")
export DATA_DIR
trap 'rm -rf "$DATA_DIR"' EXIT

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
(unset DATABASE_URL; run_pytest --durations=30 tests) || failed=1
# The browser's tests drive the pages' scripts and layout, which no database changes;
# every other web test runs again on PostgreSQL.
echo "== the web tests but the browser's, on PostgreSQL at $postgres_url"
DATABASE_URL=$postgres_url run_pytest --durations=20 \
    $(ls tests/test_web_*.py | grep -v '^tests/test_web_browser\.py$') || failed=1
exit "$failed"
