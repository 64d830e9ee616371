"""`manage.py up` (what `make run` runs): the whole system on this machine until Ctrl-C.

In order: migrations and static files; an admin account on first run; the
demo disk; then Redis (only when none answers at REDIS_URL and it names this
machine: with REDIS_URL unset, this installation's own, with its password), the
web server (uvicorn on PORT), this host's worker (queue host.<HOST_NAME>, the
demo disk among its disks) and beat, each command line from webui.launcher. Once
all of them answer it prints the URL and how to log in. Their output goes to
DATA_DIR/logs/, private to this user like everything they write (umask 077).

A service that exits is started again after a back-off (webui.launcher), so a
crashed worker never takes the dashboard down. Ctrl-C (SIGINT), SIGTERM or
SIGHUP stops them all (Redis last), SIGKILL for what is left after a grace
time; the kernel also sends each of them SIGTERM should this process die
(PR_SET_PDEATHSIG), so even `kill -9` of it leaves nothing running.

A management command rather than a shell script: it finds DATA_DIR, HOST_NAME,
REDIS_URL, PORT and the disk files through the settings that the web server and
the workers read, and migrates and creates the admin with Django itself.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from webui import launcher
from webui.env import private_directory

from ..firstrun import ensure_admin, prepare_database
from .serve import StopSignals, redis_is_local, specs, supervise


class Command(BaseCommand):
    help = ("Run the whole system on this machine until Ctrl-C: Redis if none answers, "
            "migrations, the web server, this host's worker and beat, the demo disk.")

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="0.0.0.0",
                            help="address the web server (and Redis) listen on (default: every "
                                 "address)")
        parser.add_argument("--no-demo-disk", action="store_true",
                            help="do not build the demo disk or add it to this host's disks")

    def handle(self, *args, bind: str, no_demo_disk: bool, **options):
        logs = private_directory(settings.DATA_DIR / "logs")
        names = [launcher.WEB, launcher.WORKER, launcher.BEAT]
        if self.redis_wanted():
            names.insert(0, launcher.REDIS)
        try:
            demo_disk = None if no_demo_disk else self.ensure_demo_disk()
        except KeyboardInterrupt:
            raise CommandError("interrupted") from None
        disk_files = list(dict.fromkeys([*settings.IMAGING_DISK_FILES,
                                         *([str(demo_disk)] if demo_disk else [])]))
        supervisor = launcher.Supervisor(specs(names, bind, logs, disk_files), self.say)
        stop = StopSignals(supervisor.kill)
        login = "log in as before"
        try:
            # Redis first: saving rows tells the API's cache of the change.
            supervisor.start([name for name in names if name == launcher.REDIS])
            supervisor.wait_until_ready(stop)
            if stop():
                return
            prepare_database(self.say)
            login = ensure_admin()
            connections.close_all()
            supervisor.start()
            supervisor.wait_until_ready(stop)
            if not stop():
                self.print_banner(bind, login, demo_disk, logs, list(supervisor.running))
                supervise(supervisor, stop)
        except launcher.ServiceFailed as failure:
            # A password made for the new admin account must not be lost with the banner.
            raise CommandError(f"{failure}\nOnce it runs, {login}") from None
        finally:
            if supervisor.running:
                self.say(f"stopping {', '.join(supervisor.running)}...")
                supervisor.stop()
                self.say("stopped.")

    # --- before the services start ---------------------------------------------------

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def ensure_demo_disk(self) -> Path | None:
        disk = settings.DATA_DIR / "demo" / "demo-disk.img"
        if not disk.exists():
            if os.geteuid() != 0:
                self.say("demo disk: skipped, building it needs root (so does the worker)")
                return None
            build = subprocess.run([sys.executable, "-m", "demo", str(disk)], cwd=settings.BASE_DIR)
            if build.returncode != 0:
                raise CommandError(f"building the demo disk {disk} failed (exit {build.returncode})")
        return disk

    def redis_wanted(self) -> bool:
        """Whether to run Redis: none answers at REDIS_URL, and it names this machine."""
        problem = launcher.redis_problem(settings.REDIS_URL)
        shown = launcher.shown_url(settings.REDIS_URL)
        if problem is None:
            self.say(f"redis: {shown} answers")
            return False
        if not redis_is_local():
            raise CommandError(f"{problem}: REDIS_URL names another machine, whose Redis must run")
        if "refuses" in problem:
            raise CommandError(f"{problem}: another Redis listens there; stop it, or set "
                               "REDIS_URL to a free port or to that Redis with its password")
        if shutil.which("redis-server") is None:
            raise CommandError(f"{problem}, and redis-server is not installed (make install)")
        self.say(f"redis: none answers at {shown}: starting one")
        return True

    def print_banner(self, bind: str, login: str, demo_disk: Path | None, logs: Path,
                     running: list[str]) -> None:
        port = settings.PORT
        host = settings.HOST_NAME
        if bind in ("0.0.0.0", "::"):
            urls = f"http://127.0.0.1:{port}/  (other machines: http://{host}:{port}/)"
        else:
            urls = f"http://{bind}:{port}/"
        lines = ["", f"The dashboard is up: {urls}", f"  {login}"]
        if demo_disk:
            lines.append(f"Demo disk: {demo_disk} is a disk of host {host}: back it up and "
                         "restore it without touching a real disk.")
        lines += [
            f"Running: {', '.join(running)} (worker for host {host}, queue "
            f"{launcher.host_queue(host)}); logs in {logs}/",
            "A service that stops is started again. Ctrl-C stops them all.",
        ]
        self.say("\n".join(lines))
