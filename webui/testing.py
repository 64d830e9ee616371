"""The system's services as real subprocesses on loopback: Redis, the ASGI server, Celery workers.

What the wiring tests (tests/support/services.py) and the web benchmark
(bench/web.py) start, the same way `make run` does: `uvicorn
webui.asgi:application` and `celery -A webui worker -Q host.<name>`, each in
the environment it is given, its output in a log file. Each subprocess leads
its own process group, and stopping it kills the group, so no pool process or
reloader outlives it. A process that dies or does not become ready in time
raises ServiceFailed with the tail of its log.

Nothing here reads Django's settings: callers configure Django (or not) as they need.
"""
from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from urllib.parse import quote

from webui.env import env_networks

REPO = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60
STOP_SECONDS = 10


class ServiceFailed(Exception):
    """A service exited, or was not ready in time; the message holds its log's tail."""


def database_url(settings_dict: dict) -> str:
    """A DATABASE_URL for the database a Django connection is using."""
    engine, name = settings_dict["ENGINE"], settings_dict["NAME"]
    if engine == "django.db.backends.sqlite3":
        return f"sqlite:///{Path(name).resolve()}"
    if engine == "django.db.backends.postgresql":
        user = quote(settings_dict.get("USER") or "", safe="")
        password = quote(settings_dict.get("PASSWORD") or "", safe="")
        credentials = f"{user}:{password}@" if user else ""
        host = settings_dict.get("HOST") or "127.0.0.1"
        port = settings_dict.get("PORT") or 5432
        return f"postgres://{credentials}{host}:{port}/{quote(name, safe='')}"
    raise RuntimeError(f"no DATABASE_URL for a subprocess on {engine}")


def redis_answers(url: str) -> str | None:
    """None if Redis at url answers a PING, else why not."""
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as error:
        return f"no Redis answers at {url} ({error}); `make services` starts one"
    return None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class ServiceProcess:
    """A subprocess leading its own process group, its output kept in a log file."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], log_path: Path):
        self.name = name
        self.command = command
        self.env = env
        self.log_path = log_path
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=REPO, stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until(self, ready: Callable[[], bool], what: str, timeout: float = STARTUP_SECONDS) -> None:
        """Poll ready() until it is true; stop the process and raise ServiceFailed with
        its log if it dies or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                self.stop()
                raise ServiceFailed(f"{self.name} exited {self.process.returncode} before {what}:\n"
                                    f"{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise ServiceFailed(f"{self.name}: no sign of {what} after {timeout:.0f} s:\n"
                                    f"{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def _signal_group(self, signum: int) -> None:
        try:
            os.killpg(self.process.pid, signum)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """SIGTERM, then SIGKILL for whatever of its group is left after a grace time."""
        if self.alive():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                pass
        self.kill_hard()

    def kill_hard(self) -> None:
        """SIGKILL to every process of the group, at once, as a power cut would."""
        self._signal_group(signal.SIGKILL)
        self.process.wait()


class RedisServer(ServiceProcess):
    """A private redis-server on a free loopback port: broker and channel layer, nothing kept."""

    def __init__(self, workdir: Path, log_path: Path):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        super().__init__("redis-server", [
            "redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
            "--appendonly", "no", "--dir", str(workdir),
        ], dict(os.environ), log_path)
        self.wait_until(lambda: redis_answers(self.url) is None, f"a PONG at {self.url}")


class LiveServer(ServiceProcess):
    """uvicorn as `make run` starts it; `workers` processes (WEB_WORKERS there)."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        trusted_proxies = ",".join(env_networks("TRUSTED_PROXIES", environ=env))
        super().__init__("uvicorn", [
            sys.executable, "-m", "uvicorn", "webui.asgi:application",
            "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(workers),
            "--lifespan", "off", f"--forwarded-allow-ips={trusted_proxies}",
        ], env, log_path)
        self.wait_until(self._answers, f"an HTTP answer at {self.url}")

    def _answers(self) -> bool:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
        try:
            connection.request("HEAD", "/")
            connection.getresponse()
        except OSError:
            return False
        finally:
            connection.close()
        return True


class CeleryWorker(ServiceProcess):
    def __init__(self, host_name: str, queues: Iterable[str], env: dict[str, str],
                 log_path: Path, concurrency: int | None = None):
        self.host_name = host_name
        self.node_name = f"{host_name}@{socket.gethostname()}"
        command = [sys.executable, "-m", "celery", "-A", "webui", "worker",
                   "--queues", ",".join(queues), "--hostname", self.node_name,
                   "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        if concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        super().__init__(f"worker {host_name}", command, env, log_path)
        self.wait_until(lambda: f"{self.node_name} ready." in self.log(), "being ready")
