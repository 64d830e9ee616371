"""The system's services on loopback for the wiring tests and the web benchmark.

What tests/support/services.py and bench/web.py start: a private Redis (with a
password, as every Redis of this system has), uvicorn serving webui.asgi and
Celery workers, each with the command line webui.launcher defines for `make run`,
in the environment it is given, its output in a log file. Each leads its own
process group, and stopping it kills the group, so no pool process or reloader
outlives it. A process that dies or does not become ready in time raises
ServiceFailed with the tail of its log.

Nothing here reads Django's settings: callers configure Django (or not) as they need.
"""
from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import quote

from . import launcher
from .env import env_networks
from .launcher import REPO, ServiceFailed, ServiceProcess

__all__ = ["REPO", "CeleryWorker", "LiveServer", "RedisServer", "ServiceFailed",
           "database_url", "free_port", "redis_problem"]

STARTUP_SECONDS = 60
redis_problem = launcher.redis_problem


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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class RedisServer(ServiceProcess):
    """A private redis-server on a free loopback port with a password of its own: broker and
    channel layer; `persistent` keeps an append-only file in `workdir`, so that what was
    queued survives a restart (`restart()`), as with `make run`'s Redis."""

    def __init__(self, workdir: Path, log_path: Path, persistent: bool = False):
        self.port = free_port()
        self.url = f"redis://:{secrets.token_hex(16)}@127.0.0.1:{self.port}/0"
        self.workdir = workdir
        self.persistent = persistent
        self._start(log_path)

    def _start(self, log_path: Path) -> None:
        config = launcher.write_redis_config(self.url, self.workdir, persistent=self.persistent)
        super().__init__("redis-server", launcher.redis_command(config), dict(os.environ),
                         log_path)
        self.wait_until(lambda: redis_problem(self.url) is None, f"a PONG at 127.0.0.1:{self.port}",
                        STARTUP_SECONDS)

    def restart(self) -> None:
        """Stopped (its data saved if persistent) and started again on the same port."""
        self.stop()
        self.start()

    def start(self) -> None:
        """Started again after stop(): the same port and password, its data if persistent."""
        self._start(self.log_path)


class LiveServer(ServiceProcess):
    """uvicorn as `make run` starts it; `workers` processes (WEB_WORKERS there)."""

    def __init__(self, env: dict[str, str], log_path: Path, workers: int = 1):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # Whom uvicorn believes, as the server's own settings read TRUSTED_PROXIES from `env`.
        super().__init__("uvicorn", launcher.web_command(
            bind="127.0.0.1", port=self.port, workers=workers,
            trusted_proxies=env_networks("TRUSTED_PROXIES", environ=env)), env, log_path)
        self.wait_until(lambda: launcher.http_answers("127.0.0.1", self.port),
                        f"an HTTP answer at {self.url}", STARTUP_SECONDS)


class CeleryWorker(ServiceProcess):
    def __init__(self, host_name: str, queues: Iterable[str], env: dict[str, str],
                 log_path: Path, concurrency: int | None = None):
        self.host_name = host_name
        self.node_name = launcher.node_name(host_name)
        super().__init__(f"worker {host_name}", launcher.worker_command(
            host_name, queues=queues, concurrency=concurrency, quiet=True), env, log_path)
        self.wait_until(lambda: launcher.worker_ready_line(host_name) in self.log(), "being ready",
                        STARTUP_SECONDS)
