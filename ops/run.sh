#!/usr/bin/env bash
# `make run`: the whole system on this machine until Ctrl-C (python manage.py up).
#
# Without SECRET_KEY (or SECRET_KEY_FILE) in the environment, a key is made on
# the first run and kept in $DATA_DIR/secret_key, readable by root only, so
# logins survive restarts; Django refuses to start without one.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA_DIR=${DATA_DIR:-data}

if [ -z "${SECRET_KEY:-}" ] && [ -z "${SECRET_KEY_FILE:-}" ]; then
    key_file=$DATA_DIR/secret_key
    if [ ! -s "$key_file" ]; then
        mkdir -p "$DATA_DIR"
        (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(50))' \
            > "$key_file.partial" && mv "$key_file.partial" "$key_file")
    fi
    SECRET_KEY_FILE=$(realpath "$key_file")
    export SECRET_KEY_FILE
fi
exec .venv/bin/python manage.py up "$@"
