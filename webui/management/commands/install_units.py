"""`manage.py install_units` (make install-services): the services as systemd units.

One unit per service, imaging-<service>.service, each running `manage.py serve
--exec <service>` (webui.launcher's command line, as under make run), restarted
on failure, started at boot, with a private umask. Their settings are one
environment file, readable by root only: the one given (a joined host's), or
/etc/imaging/imaging.env written from this shell's environment (DATA_DIR made
absolute, and every variable the settings read that is set here). Before the
units start, the database is migrated and the first admin account made, as
`make run` does.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from imaging.datastore import keyring
from webui import launcher
from webui.env import READ_NAMES, QUOTABLE

from ..firstrun import ensure_admin, prepare_database
from .serve import redis_is_local

SYSTEMD_RUNNING = Path("/run/systemd/system")
DESCRIPTIONS = {launcher.REDIS: "Redis, its broker and live progress",
                launcher.WEB: "web server", launcher.WORKER: "this host's worker",
                launcher.BEAT: "beat, schedules and sweeps"}


def unit_name(service: str) -> str:
    return f"imaging-{service}.service"


def unit_text(service: str, env_file: Path, bind: str, local_redis: bool) -> str:
    python, manage = sys.executable, settings.BASE_DIR / "manage.py"
    after = f" {unit_name(launcher.REDIS)}" if local_redis and service != launcher.REDIS else ""
    lines = [
        "[Unit]",
        f"Description=Disk imaging dashboard: {DESCRIPTIONS[service]}",
        f"After=network-online.target{after}",
        f"Wants=network-online.target{after}",
        "",
        "[Service]",
        f"WorkingDirectory={settings.BASE_DIR}",
        f"EnvironmentFile={env_file}",
    ]
    if service == launcher.WEB:
        lines += [f"ExecStartPre={python} {manage} migrate --noinput",
                  f"ExecStartPre={python} {manage} collectstatic --noinput --verbosity 0"]
    lines += [
        f"ExecStart={python} {manage} serve --exec {service} --bind {bind}",
        "Restart=on-failure",
        "RestartSec=5s",
        "UMask=0077",
        # Celery's warm shutdown lets running jobs stop between two chunks.
        "KillMode=mixed",
        "TimeoutStopSec=30",
        "",
        "[Install]",
        "WantedBy=multi-user.target",
    ]
    return "\n".join(lines) + "\n"


def environment_text() -> str:
    # The worker's key of encrypted datastores too (serve drops it for the other services).
    carried = [*READ_NAMES, keyring.KEY_FILE_VARIABLE, keyring.PASSPHRASE_VARIABLE]
    values = {name: os.environ[name] for name in carried if os.environ.get(name)}
    values["DATA_DIR"] = str(settings.DATA_DIR)
    for name, value in values.items():
        if not QUOTABLE.fullmatch(value):
            raise CommandError(f"{name} holds a quote, backslash or line break, which an "
                               "environment file cannot carry")
    return "".join(f"{name}='{value}'\n" for name, value in values.items())


def write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)
    os.replace(partial, path)


class Command(BaseCommand):
    help = "Install the services as systemd units (restarted on failure, started at boot)."

    def add_arguments(self, parser):
        parser.add_argument("services", nargs="+", choices=launcher.SERVICES)
        parser.add_argument("--env-file", type=Path,
                            help="their settings (default: /etc/imaging/imaging.env, written "
                                 "from this environment)")
        parser.add_argument("--directory", type=Path, default=Path("/etc/systemd/system"),
                            help="where the units go (default: /etc/systemd/system)")
        parser.add_argument("--bind", default="0.0.0.0",
                            help="address the web server and Redis listen on")
        parser.add_argument("--no-start", action="store_true",
                            help="write the units only: neither enable nor start them")

    def handle(self, *args, services: list[str], env_file: Path | None, directory: Path,
               bind: str, no_start: bool, **options):
        if env_file is None:
            env_file = Path("/etc/imaging/imaging.env")
            write_private(env_file, environment_text())
            self.stdout.write(f"settings: {env_file}")
        if launcher.WEB in services:
            prepare_database(self.stdout.write)
            self.stdout.write(ensure_admin())
        local_redis = launcher.REDIS in services and redis_is_local()
        names = [name for name in dict.fromkeys(services)
                 if name != launcher.REDIS or local_redis]
        for name in names:
            unit = directory / unit_name(name)
            directory.mkdir(parents=True, exist_ok=True)
            unit.write_text(unit_text(name, env_file.absolute(), bind, local_redis))
            self.stdout.write(f"unit: {unit}")
        if no_start:
            return
        if not SYSTEMD_RUNNING.is_dir() or shutil.which("systemctl") is None:
            raise CommandError("systemd does not run on this machine: the units are written, "
                               "but nothing starts them here (make run does)")
        units = [unit_name(name) for name in names]
        for command in (["systemctl", "daemon-reload"],
                        ["systemctl", "enable", "--now", *units]):
            result = subprocess.run(command, capture_output=True, text=True)
            if result.returncode != 0:
                raise CommandError(f"{' '.join(command)} failed: {result.stderr.strip()}")
        self.stdout.write(f"started and enabled at boot: {', '.join(units)}")
