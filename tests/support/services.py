"""Real services for the wiring tests: Redis, the ASGI server and Celery workers.

Loaded into every run as a pytest plugin (`-p support.services` in pytest.ini),
so its fixtures need no import:

- `redis_url`: the Redis the test process itself uses (REDIS_URL), answering
  a PING; missing, the test is skipped (fails under CI). `make test` starts one.
- `live_server_process`: `uvicorn webui.asgi:application` on a free loopback
  port, a subprocess with its own DATA_DIR, answering HTTP; `.url`, `.log()`.
- `celery_worker(host_name, disk_files=...)`: a factory of real
  `celery -A webui worker -Q host.<name>` subprocesses with HOST_NAME and
  IMAGING_DISK_FILES set, returned once their log says they are ready;
  `.stop()`, `.kill_hard()` (SIGKILL to the worker and its pool, as if its
  machine died), `.log()`.
- `live_environment`: the environment those subprocesses get (a dict the test
  may add to before it starts one).

Every subprocess leads its own process group, and the group is killed at
teardown, also when the test fails: no pool process or reloader outlives it.

The database they share with the test is pytest-django's test database itself:
these fixtures pull in `transactional_db`, so what the test writes is committed
and visible to the subprocesses, and the tables are emptied after the test,
once the subprocesses are gone. The subprocesses get a DATABASE_URL naming that
test database: PostgreSQL's `test_<name>` (when DATABASE_URL points at one),
or, for SQLite, a file this plugin names at session start, because Django
would otherwise keep an SQLite test database in memory, out of other processes'
reach. The alternative, a database these fixtures migrate themselves, would
leave the test code without the ORM on the rows the server and workers write.
The subprocesses share one datastore directory (IMAGING_DATASTORE), as hosts
mounting the same NAS do.

At start-up the plugin also gives the test process a SECRET_KEY when none is
set, so webui.settings loads with DEBUG off, as in production.
"""

from __future__ import annotations

import http.client
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest

from .requirements import requirement_missing

REPO = Path(__file__).resolve().parents[2]
STARTUP_SECONDS = 60
STOP_SECONDS = 10
TEST_SECRET_KEY = "tests-only-secret-key-" + "k" * 20 + "-never-used-outside-the-test-run"

_sqlite_test_dir: Path | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    # Before pytest-django imports webui.settings, which refuses a missing key.
    os.environ.setdefault("SECRET_KEY", TEST_SECRET_KEY)


def _django_settings():
    if "django" not in sys.modules:
        return None
    from django.conf import settings

    return settings if settings.configured else None


def pytest_sessionstart(session):
    """Give SQLite test databases a file, so that subprocesses can open them."""
    global _sqlite_test_dir
    settings = _django_settings()
    if settings is None:
        return
    for alias, database in settings.DATABASES.items():
        test_settings = database.setdefault("TEST", {})
        if database["ENGINE"] == "django.db.backends.sqlite3" and not test_settings.get("NAME"):
            if _sqlite_test_dir is None:
                _sqlite_test_dir = Path(tempfile.mkdtemp(prefix="imaging-test-db-"))
            test_settings["NAME"] = str(_sqlite_test_dir / f"test-{alias}.sqlite3")


def pytest_sessionfinish(session):
    if _sqlite_test_dir is not None:
        shutil.rmtree(_sqlite_test_dir, ignore_errors=True)


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


@pytest.fixture(scope="session")
def redis_url() -> str:
    settings = _django_settings()
    url = settings.REDIS_URL if settings else os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    reason = redis_answers(url)
    if reason:
        requirement_missing(reason)
    return url


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
        """Poll ready() until it is true; fail the test with the log if the
        process dies or the time runs out."""
        deadline = time.monotonic() + timeout
        while not ready():
            if not self.alive():
                self.stop()
                pytest.fail(f"{self.name} exited {self.process.returncode} before {what}:\n"
                            f"{self._log_tail()}", pytrace=False)
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(f"{self.name}: no sign of {what} after {timeout:.0f} s:\n"
                            f"{self._log_tail()}", pytrace=False)
            time.sleep(0.1)

    def _log_tail(self, lines: int = 40) -> str:
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


class LiveServer(ServiceProcess):
    def __init__(self, env: dict[str, str], log_path: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__("uvicorn", [
            sys.executable, "-m", "uvicorn", "webui.asgi:application",
            "--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "off",
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
                 log_path: Path, concurrency: int | None):
        self.host_name = host_name
        self.node_name = f"{host_name}@{socket.gethostname()}"
        command = [sys.executable, "-m", "celery", "-A", "webui", "worker",
                   "--queues", ",".join(queues), "--hostname", self.node_name,
                   "--loglevel", "INFO", "--without-mingle", "--without-gossip"]
        if concurrency is not None:
            command += ["--concurrency", str(concurrency)]
        super().__init__(f"worker {host_name}", command, env, log_path)
        self.wait_until(lambda: f"{self.node_name} ready." in self.log(), "being ready")


@pytest.fixture(scope="session")
def collected_static(tmp_path_factory) -> Path:
    """Static files collected once per run: with DEBUG off, pages need the manifest."""
    static_root = tmp_path_factory.mktemp("static-data") / "static"
    env = dict(os.environ, DATA_DIR=str(static_root.parent))
    result = subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "--verbosity", "0"],
                            cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        pytest.fail(f"collectstatic exited {result.returncode}:\n{result.stderr}", pytrace=False)
    return static_root


@pytest.fixture
def live_environment(transactional_db, redis_url, collected_static, tmp_path) -> dict[str, str]:
    """The environment of the live server and workers of one test."""
    from django.conf import settings
    from django.db import connection

    data_dir = tmp_path / "live-data"
    data_dir.mkdir()
    (data_dir / "static").symlink_to(collected_static)
    datastore = tmp_path / "datastore"
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("PYTEST_", "IMAGING_"))}
    env.update(
        DJANGO_SETTINGS_MODULE="webui.settings",
        DATA_DIR=str(data_dir),
        DATABASE_URL=database_url(connection.settings_dict),
        REDIS_URL=redis_url,
        CHANNEL_LAYER="redis",
        SECRET_KEY=settings.SECRET_KEY,
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1 localhost",
        IMAGING_DATASTORE=str(datastore),
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture
def live_server_process(live_environment, tmp_path) -> Iterator[LiveServer]:
    server = LiveServer(live_environment, tmp_path / "uvicorn.log")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def celery_worker(live_environment, tmp_path) -> Iterator[Callable[..., CeleryWorker]]:
    """celery_worker(host_name, disk_files=(), queues=None, env=None, concurrency=None)
    starts a worker for host_name, consuming host.<host_name> unless queues says
    otherwise (and, as every worker does, the control queue), with the
    settings' concurrency unless given; every worker started is stopped at teardown."""
    workers: list[CeleryWorker] = []

    def start(host_name: str, disk_files: Iterable[os.PathLike | str] = (),
              queues: Iterable[str] | None = None, env: dict[str, str] | None = None,
              concurrency: int | None = None) -> CeleryWorker:
        worker_env = dict(live_environment, HOST_NAME=host_name,
                          IMAGING_DISK_FILES=":".join(str(Path(path)) for path in disk_files),
                          **(env or {}))
        worker = CeleryWorker(host_name, queues or [f"host.{host_name}"], worker_env,
                              tmp_path / f"worker-{host_name}-{len(workers)}.log", concurrency)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()
