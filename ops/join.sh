# Joins this machine to a disk-imaging dashboard as one of its hosts: its worker is installed
# and started as a service. The dashboard serves this script with SERVER, TOKEN and HOST_NAME
# set above; run it as root:  curl -sS <the dashboard>/join/<token>/ | sudo sh
#
# Where things go (environment variables override): IMAGING_PREFIX (the code and its
# virtualenv, /opt/imaging), IMAGING_CONFIG_DIR (the worker's settings, /etc/imaging),
# IMAGING_DATA_DIR (its state and logs, /var/lib/imaging). IMAGING_DISK_FILES: disk-image
# files that count as disks of this host (colon-separated); IMAGING_DATASTORE: where the
# datastore is mounted here, if not at the dashboard's own path.
set -eu

PREFIX=${IMAGING_PREFIX:-/opt/imaging}
CONFIG_DIR=${IMAGING_CONFIG_DIR:-/etc/imaging}
DATA_DIR=${IMAGING_DATA_DIR:-/var/lib/imaging}
APP=$PREFIX/app
PYTHON=$PREFIX/venv/bin/python
ENV_FILE=$CONFIG_DIR/worker.env

say() { echo "join: $*" >&2; }
fail() { say "$*"; exit 1; }
fetch() { curl -sS --fail-with-body "$@"; }

[ "$(id -u)" = 0 ] || fail "run it as root (... | sudo sh): the worker reads and writes disks"
umask 077

missing=
for package in make python3 python3-venv; do
    dpkg-query -W -f='${Status}\n' "$package" 2>/dev/null | grep -q '^install ok installed' \
        || missing="$missing $package"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
fi

say "fetching the worker's code and wheels from $SERVER"
mkdir -p "$PREFIX" "$CONFIG_DIR" "$DATA_DIR"
bundle=$(mktemp "$PREFIX/bundle.XXXXXX")
trap 'rm -rf "$bundle" "$APP.new"' EXIT
fetch -o "$bundle" "$SERVER/join/$TOKEN/bundle.tar" || fail "the dashboard did not send the code"
rm -rf "$APP.new" && mkdir "$APP.new" && tar -xf "$bundle" -C "$APP.new"
rm -rf "$APP.old" && { [ ! -d "$APP" ] || mv "$APP" "$APP.old"; } && mv "$APP.new" "$APP"
rm -rf "$APP.old"

# The engine's Debian packages: the Makefile's list, installed where missing.
make -s -C "$APP" system-packages APT_PACKAGES='$(RUNTIME_PACKAGES)'

[ -x "$PYTHON" ] || python3 -m venv "$PREFIX/venv"
say "installing the worker's Python packages"
"$PYTHON" -m pip install -q --disable-pip-version-check --no-index --find-links "$APP/wheels" \
    -r "$APP/requirements.txt" 2>/dev/null \
    || "$PYTHON" -m pip install -q --disable-pip-version-check --find-links "$APP/wheels" \
        -r "$APP/requirements.txt" \
    || fail "the Python packages did not install (see above)"

say "fetching this host's settings (the join command is used up now)"
settings=$(fetch -X POST "$SERVER/join/$TOKEN/settings") || fail "$settings"
{
    echo "$settings"
    echo "DATA_DIR='$DATA_DIR'"
    [ -z "${IMAGING_DISK_FILES:-}" ] || echo "IMAGING_DISK_FILES='$IMAGING_DISK_FILES'"
    [ -z "${IMAGING_DATASTORE:-}" ] || echo "IMAGING_DATASTORE='$IMAGING_DATASTORE'"
} > "$ENV_FILE.partial"
mv "$ENV_FILE.partial" "$ENV_FILE"

in_settings() { (set -a && . "$ENV_FILE" && set +a && cd "$APP" && "$PYTHON" manage.py "$@"); }
in_settings check_connections

pid_file=$DATA_DIR/worker.pid
if [ -d /run/systemd/system ]; then
    in_settings install_units worker --env-file "$ENV_FILE"
    say "host $HOST_NAME joined: its worker runs as the systemd unit imaging-worker"
else
    # No systemd here: the worker runs supervised (restarted should it exit) in the background.
    if [ -s "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then
        kill -TERM "-$(cat "$pid_file")" 2>/dev/null || true
        sleep 2
    fi
    mkdir -p "$DATA_DIR/logs"
    (set -a && . "$ENV_FILE" && set +a && cd "$APP" \
        && exec setsid "$PYTHON" manage.py serve worker >> "$DATA_DIR/logs/serve.log" 2>&1 < /dev/null) &
    echo $! > "$pid_file"
    say "host $HOST_NAME joined: its worker runs in the background (no systemd here; pid" \
        "$(cat "$pid_file"), log $DATA_DIR/logs/serve.log)"
fi
say "it shows online on $SERVER/hosts/ within a minute"
