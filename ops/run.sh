#!/usr/bin/env bash
# `make run`: the whole system on this machine until Ctrl-C (python manage.py up).
#
# The secrets it needs (Django's key, Redis' password) are made on first use in
# DATA_DIR (./data unless set), readable by root only; `manage.py` typed by hand
# later finds them there.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python manage.py up "$@"
