"""`manage.py up` (what `make run` runs): the whole system on this machine until Ctrl-C.

In order: migrations and static files; an admin account on first run; the
demo disk; then Redis (only when none answers at REDIS_URL and it names this
machine), the web server (uvicorn on PORT), this host's worker (queue
host.<HOST_NAME>, the demo disk among its disks) and beat. Once all of them
answer it prints the URL and how to log in. Their output goes to
DATA_DIR/logs/.

The services share one process group of their own. Ctrl-C (SIGINT), SIGTERM or
SIGHUP sends each SIGTERM, and after a grace time SIGKILL goes to whatever is
left in the group (pool processes included). The kernel also sends each of
them SIGTERM should this process die (PR_SET_PDEATHSIG), so even `kill -9` of
it leaves nothing running. If one of them exits, the others are stopped too.

A management command rather than a shell script: it finds DATA_DIR, HOST_NAME,
REDIS_URL, PORT and the disk files through the settings that the web server and
the workers read, and migrates and creates the admin with Django itself.
"""
from __future__ import annotations

import ctypes
import http.client
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import redis
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connections

from webui.models import Host

ADMIN_USERNAME = "admin"
LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
READY_SECONDS = 120
STOP_SECONDS = 15
_PR_SET_PDEATHSIG = 1


def _terminate_with_parent() -> None:
    """Runs in each child before exec: SIGTERM from the kernel when `up` dies."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Service:
    """One child process in the services' process group, its output appended to a log."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path,
                 process_group: int):
        self.name = name
        self.log_path = log_path
        self._log_start = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=settings.BASE_DIR, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, process_group=process_group,
                preexec_fn=_terminate_with_parent)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """What it printed since this run started it."""
        with open(self.log_path, "rb") as log:
            log.seek(self._log_start)
            return log.read().decode(errors="replace")

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.output().splitlines()[-lines:])


class ServiceFailed(Exception):
    pass


class StopRequested(Exception):
    pass


class Command(BaseCommand):
    help = ("Run the whole system on this machine until Ctrl-C: Redis if none answers, "
            "migrations, the web server, this host's worker and beat, the demo disk.")

    def add_arguments(self, parser):
        parser.add_argument("--bind", default="0.0.0.0",
                            help="address the web server listens on (default: every address)")
        parser.add_argument("--no-demo-disk", action="store_true",
                            help="do not build the demo disk or add it to this host's disks")

    def handle(self, *args, bind: str, no_demo_disk: bool, **options):
        self.services: list[Service] = []
        self.stop_signal: int | None = None
        logs = settings.DATA_DIR / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        try:
            self.prepare_database()
            login = self.ensure_admin()
            demo_disk = None if no_demo_disk else self.ensure_demo_disk()
        except KeyboardInterrupt:
            raise CommandError("interrupted") from None
        connections.close_all()

        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.on_stop_signal)
        try:
            self.start_services(bind, demo_disk, logs)
            self.wait_until_ready(bind)
            self.print_banner(bind, login, demo_disk, logs)
            self.supervise()
        except StopRequested:
            pass
        except ServiceFailed as failure:
            # A password made for the new admin account must not be lost with the banner.
            raise CommandError(f"{failure}\nOnce it runs, {login}") from None
        finally:
            self.stop_services()

    # --- before the services start ---------------------------------------------------

    def say(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def prepare_database(self) -> None:
        database = settings.DATABASES["default"]
        where = database["NAME"] if "sqlite" in database["ENGINE"] else \
            f"{database['NAME']} on {database.get('HOST') or 'localhost'}"
        self.say(f"database: {where}: applying migrations")
        call_command("migrate", interactive=False, verbosity=0)
        call_command("collectstatic", interactive=False, verbosity=0)

    def ensure_admin(self) -> str:
        """Create the admin account on first run; say how to log in."""
        users = get_user_model()
        admin = users.objects.filter(is_superuser=True).order_by("pk").first()
        if admin is not None:
            return (f"log in as {admin.get_username()} with its password "
                    f"(forgotten? python manage.py changepassword {admin.get_username()})")
        if settings.ADMIN_PASSWORD:
            users.objects.create_superuser(ADMIN_USERNAME, email="", password=settings.ADMIN_PASSWORD)
            return f"log in as {ADMIN_USERNAME} with the password in ADMIN_PASSWORD"
        password = secrets.token_urlsafe(12)
        users.objects.create_superuser(ADMIN_USERNAME, email="", password=password)
        return (f"log in as {ADMIN_USERNAME}, password {password}\n"
                "  (shown this once: only its hash is kept; change it on the admin pages)")

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

    # --- the services --------------------------------------------------------------

    def start_services(self, bind: str, demo_disk: Path | None, logs: Path) -> None:
        disk_files = list(dict.fromkeys([*settings.IMAGING_DISK_FILES,
                                         *([str(demo_disk)] if demo_disk else [])]))
        env = dict(os.environ, DATA_DIR=str(settings.DATA_DIR), HOST_NAME=settings.HOST_NAME,
                   IMAGING_DISK_FILES=":".join(disk_files), PYTHONUNBUFFERED="1")
        python = sys.executable
        commands = {}
        redis_command = self.redis_command(settings.DATA_DIR / "redis")
        if redis_command:
            commands["redis"] = redis_command
        commands["web"] = [python, "-m", "uvicorn", "webui.asgi:application", "--host", bind,
                           "--port", str(settings.PORT), "--workers", str(settings.WEB_WORKERS),
                           "--lifespan", "off",
                           f"--forwarded-allow-ips={','.join(settings.TRUSTED_PROXIES)}"]
        commands["worker"] = [python, "-m", "celery", "-A", "webui", "worker",
                              "--queues", self.host_queue, "--hostname", self.worker_node_name,
                              "--loglevel", "INFO"]
        commands["beat"] = [python, "-m", "celery", "-A", "webui", "beat",
                            "--scheduler", "django_celery_beat.schedulers:DatabaseScheduler",
                            "--loglevel", "INFO"]
        for name, command in commands.items():
            # The first one leads the group, the others join it.
            group = self.services[0].pid if self.services else 0
            self.services.append(Service(name, command, env, logs / f"{name}.log", group))

    @property
    def worker_node_name(self) -> str:
        return f"{settings.HOST_NAME}@{socket.gethostname()}"

    @property
    def host_queue(self) -> str:
        return Host(name=settings.HOST_NAME).queue

    def redis_command(self, redis_dir: Path) -> list[str] | None:
        """How to start Redis for REDIS_URL, or None when one answers there already."""
        if redis_answers(settings.REDIS_URL):
            self.say(f"redis: {settings.REDIS_URL} answers")
            return None
        url = urlsplit(settings.REDIS_URL)
        if url.hostname not in LOOPBACK_NAMES or url.username or url.password:
            raise CommandError(f"no Redis answers at REDIS_URL={settings.REDIS_URL}")
        if shutil.which("redis-server") is None:
            raise CommandError(f"no Redis answers at {settings.REDIS_URL}, and redis-server "
                               "is not installed (make install)")
        redis_dir.mkdir(parents=True, exist_ok=True)
        self.say(f"redis: none answers at {settings.REDIS_URL}: starting one")
        address = "127.0.0.1" if url.hostname == "localhost" else url.hostname
        # Append-only file: queued jobs survive a restart.
        return ["redis-server", "--bind", address, "--port", str(url.port or 6379),
                "--dir", str(redis_dir), "--save", "", "--appendonly", "yes"]

    def wait_until_ready(self, bind: str) -> None:
        address = "127.0.0.1" if bind in ("0.0.0.0", "::", "") else bind
        checks: dict[str, Callable[[Service], bool]] = {
            "redis": lambda service: redis_answers(settings.REDIS_URL),
            "web": lambda service: http_answers(address, settings.PORT),
            "worker": lambda service: f"{self.worker_node_name} ready." in service.output(),
            "beat": lambda service: "beat: Starting..." in service.output(),
        }
        waiting = {service.name: service for service in self.services}
        deadline = time.monotonic() + READY_SECONDS
        while waiting:
            self.check_running()
            for name, service in list(waiting.items()):
                if checks[name](service):
                    del waiting[name]
            if time.monotonic() > deadline:
                raise ServiceFailed(f"not ready after {READY_SECONDS} s: {', '.join(waiting)}\n"
                                    + "\n".join(f"--- {service.log_path}:\n{service.tail()}"
                                                for service in waiting.values()))
            time.sleep(0.2)

    def print_banner(self, bind: str, login: str, demo_disk: Path | None, logs: Path) -> None:
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
            f"Running: {', '.join(service.name for service in self.services)} "
            f"(worker for host {host}, queue {self.host_queue}); logs in {logs}/",
            "Ctrl-C stops them all.",
        ]
        self.say("\n".join(lines))

    def supervise(self) -> None:
        while self.stop_signal is None:
            self.check_running()
            time.sleep(0.5)

    def check_running(self) -> None:
        if self.stop_signal is not None:
            raise StopRequested
        for service in self.services:
            status = service.process.poll()
            if status is not None:
                raise ServiceFailed(f"{service.name} exited with status {status}; "
                                    f"the last lines of {service.log_path}:\n{service.tail()}")

    def on_stop_signal(self, signum, frame) -> None:
        if self.stop_signal is not None:
            self.kill_group()  # a second Ctrl-C: no more grace
        self.stop_signal = signum

    def stop_services(self) -> None:
        if not self.services:
            return
        self.say(f"stopping {', '.join(service.name for service in self.services)}...")
        deadline = time.monotonic() + STOP_SECONDS
        # Redis last: the others talk to it while they shut down.
        clients = [service for service in self.services if service.name != "redis"]
        broker = [service for service in self.services if service.name == "redis"]
        for phase in (clients, broker):
            for service in phase:
                if service.process.poll() is None:
                    service.process.terminate()
            for service in phase:
                try:
                    service.process.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    self.say(f"{service.name} did not stop within {STOP_SECONDS} s: killing it")
        self.kill_group()
        for service in self.services:
            service.process.wait()
        self.say("stopped.")

    def kill_group(self) -> None:
        """SIGKILL to whatever is left of the services' process group."""
        try:
            os.killpg(self.services[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def redis_answers(url: str) -> bool:
    client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def http_answers(address: str, port: int) -> bool:
    connection = http.client.HTTPConnection(address, port, timeout=2)
    try:
        connection.request("GET", "/admin/login/")
        connection.getresponse().read()
    except OSError:
        return False
    finally:
        connection.close()
    return True
