"""`manage.py serve`: run some of this machine's services, supervised, or become one.

    manage.py serve worker             this host's worker, restarted should it exit
    manage.py serve --exec web         become the web server (a systemd unit, a container)

Unlike `up` it migrates nothing and makes no account or demo disk: it is what a
service manager runs, or a host that only has disks. The command lines come from
webui.launcher, the same ones `up` runs.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from imaging.datastore import keyring
from webui import launcher
from webui.env import private_directory

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
EVERY_ADDRESS = ("0.0.0.0", "::", "")


def redis_is_local() -> bool:
    return urlsplit(settings.REDIS_URL).hostname in LOOPBACK_NAMES


def local_redis_config(bind: str) -> Path:
    """This installation's own Redis: where REDIS_URL says, with its password, listening where
    the web server does (other hosts' workers reach it there), keeping queued jobs."""
    url = urlsplit(settings.REDIS_URL)
    if not url.password:
        raise CommandError(f"REDIS_URL={launcher.shown_url(settings.REDIS_URL)} names a Redis "
                           "on this machine without a password: give it one "
                           "(redis://:PASSWORD@host:port/0), or leave REDIS_URL unset to use "
                           "this installation's own")
    addresses = ("0.0.0.0",) if bind in EVERY_ADDRESS else ("127.0.0.1", bind)
    return launcher.write_redis_config(settings.REDIS_URL, settings.DATA_DIR / "redis",
                                       persistent=True, bind=dict.fromkeys(addresses))


def service_env(disk_files: list[str] | None = None) -> dict[str, str]:
    return dict(os.environ, DATA_DIR=str(settings.DATA_DIR), HOST_NAME=settings.HOST_NAME,
                IMAGING_DISK_FILES=":".join(disk_files if disk_files is not None
                                            else settings.IMAGING_DISK_FILES),
                PYTHONUNBUFFERED="1")


def command_for(name: str, bind: str) -> list[str]:
    if name == launcher.REDIS:
        if not redis_is_local():
            raise CommandError(f"REDIS_URL={launcher.shown_url(settings.REDIS_URL)} names "
                               "another machine: its Redis runs there")
        return launcher.redis_command(local_redis_config(bind))
    if name == launcher.WEB:
        return launcher.web_command(bind=bind, port=settings.PORT, workers=settings.WEB_WORKERS,
                                    trusted_proxies=settings.TRUSTED_PROXIES)
    if name == launcher.WORKER:
        return launcher.worker_command(settings.HOST_NAME)
    if name == launcher.BEAT:
        return launcher.beat_command()
    raise CommandError(f"no service {name!r}: use {', '.join(launcher.SERVICES)}")


def specs(names: list[str], bind: str, logs: Path,
          disk_files: list[str] | None = None) -> list[launcher.ServiceSpec]:
    address = "127.0.0.1" if bind in EVERY_ADDRESS else bind
    ready = {
        launcher.REDIS: lambda service: launcher.redis_problem(settings.REDIS_URL) is None,
        launcher.WEB: lambda service: launcher.http_answers(address, settings.PORT),
        launcher.WORKER: lambda service: launcher.worker_ready_line(settings.HOST_NAME)
        in service.log(),
        launcher.BEAT: lambda service: launcher.BEAT_READY_LINE in service.log(),
    }
    env = service_env(disk_files)
    return [launcher.ServiceSpec(name, command_for(name, bind), env if name == launcher.WORKER
                                 else without_keys(env), logs / f"{name}.log", ready[name])
            for name in names]


def without_keys(env: dict[str, str]) -> dict[str, str]:
    """The environment of every service but the worker: the key of an encrypted datastore and
    its passphrase reach the process that backs up and restores, never the web server."""
    return {name: value for name, value in env.items()
            if name not in (keyring.KEY_FILE_VARIABLE, keyring.PASSPHRASE_VARIABLE)}


def supervise(supervisor: launcher.Supervisor, stop_requested) -> None:
    while not stop_requested():
        supervisor.watch()
        time.sleep(0.5)


class StopSignals:
    """SIGINT, SIGTERM and SIGHUP ask for a stop; a second one kills at once."""

    def __init__(self, on_second) -> None:
        self.received: int | None = None
        self._on_second = on_second
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self._handle)

    def __call__(self) -> bool:
        return self.received is not None

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            self._on_second()
        self.received = signum


class Command(BaseCommand):
    help = "Run some of this machine's services (redis, web, worker, beat), supervised, or exec one."

    def add_arguments(self, parser):
        parser.add_argument("services", nargs="+", choices=launcher.SERVICES)
        parser.add_argument("--exec", action="store_true", dest="become",
                            help="become the one service named (for systemd and containers)")
        parser.add_argument("--bind", default="0.0.0.0",
                            help="address the web server (and Redis) listen on (default: every "
                                 "address)")

    def handle(self, *args, services: list[str], become: bool, bind: str, **options):
        if become:
            if len(services) != 1:
                raise CommandError("--exec runs one service")
            command = command_for(services[0], bind)
            sys.stdout.flush()
            env = service_env()
            os.execvpe(command[0], command,
                       env if services[0] == launcher.WORKER else without_keys(env))
        logs = private_directory(settings.DATA_DIR / "logs")
        supervisor = launcher.Supervisor(specs(list(dict.fromkeys(services)), bind, logs),
                                         self.say)
        stop = StopSignals(supervisor.kill)
        try:
            supervisor.start()
            supervisor.wait_until_ready(stop)
            self.say(f"running: {', '.join(supervisor.running)}; logs in {logs}/")
            supervise(supervisor, stop)
        except launcher.ServiceFailed as failure:
            raise CommandError(str(failure)) from None
        finally:
            supervisor.stop()

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()
