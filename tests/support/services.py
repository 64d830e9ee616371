"""Real services for the wiring tests: Redis, the ASGI server and Celery workers.

Loaded into every run as a pytest plugin (`-p support.services` in pytest.ini),
so its fixtures need no import:

- `redis_url`: the Redis the test process itself uses (REDIS_URL), answering
  a PING; missing, the test is skipped (fails under CI). Without REDIS_URL in the
  environment the plugin starts one for the run, with the launcher (webui.launcher)
  `make run` uses, on a free port with a password.
- `live_server_process`: `uvicorn webui.asgi:application` on a free loopback
  port, a subprocess with its own DATA_DIR, answering HTTP; `.url`, `.log()`.
- `celery_worker(host_name, disk_files=...)`: a factory of real
  `celery -A webui worker -Q host.<name>` subprocesses with HOST_NAME and
  IMAGING_DISK_FILES set, returned once their log says they are ready;
  `.stop()`, `.kill_hard()` (SIGKILL to the worker and its pool, as if its
  machine died), `.log()`.
- `live_environment`: the environment those subprocesses get (a dict the test
  may add to before it starts one).
- `host_name`: a host name of this run's own, whose queue is dropped afterwards:
  a stale message of an earlier run finds no worker.
- `private_redis`: a redis-server of the test's own, made the subprocesses'
  REDIS_URL, so that what the server counts in its cache (login throttles) is
  counted for this test alone; name it before `live_server_process`.

The processes are started by webui.testing, the launcher the web benchmark
uses too. Every subprocess leads its own process group, and the group is
killed at teardown, also when the test fails: no pool process or reloader
outlives it.

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

"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest
import redis

from webui.testing import (REPO, CeleryWorker, LiveServer, RedisServer, ServiceFailed,
                           database_url, free_port, redis_problem)

from .requirements import requirement_missing

__all__ = ["REPO", "CeleryWorker", "LiveServer", "free_port"]

_sqlite_test_dir: Path | None = None
_session_redis: RedisServer | None = None


@pytest.hookimpl(tryfirst=True)
def pytest_load_initial_conftests(early_config, parser, args):
    """Before pytest-django imports webui.settings: without a REDIS_URL, the run's own Redis,
    started by the launcher `make run` uses (with a password), for this run alone."""
    global _session_redis
    if os.environ.get("REDIS_URL") or shutil.which("redis-server") is None:
        return  # a Redis given, or none to start: the redis_url fixture says which
    folder = Path(tempfile.mkdtemp(prefix="imaging-test-redis-"))
    try:
        _session_redis = RedisServer(folder, folder / "redis.log")
    except ServiceFailed as failure:
        raise pytest.UsageError(f"the test run's Redis did not start: {failure}") from None
    os.environ["REDIS_URL"] = _session_redis.url


def pytest_unconfigure(config):
    if _session_redis is not None:
        _session_redis.stop()
        shutil.rmtree(_session_redis.workdir, ignore_errors=True)


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


def wait_for(condition: Callable[[], object], what: str, timeout: float = 30.0,
             *processes) -> object:
    """Poll condition() until it is truthy; fail with the processes' log tails if it never is."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in processes)
            pytest.fail(f"no {what} after {timeout:.0f} s\n{logs}", pytrace=False)
        time.sleep(0.2)
    return value


@pytest.fixture(scope="session")
def redis_url() -> str:
    settings = _django_settings()
    url = settings.REDIS_URL if settings else os.environ.get("REDIS_URL")
    reason = redis_problem(url) if url else "no REDIS_URL"
    if reason:
        requirement_missing(f"{reason}; without REDIS_URL the run starts its own Redis, if "
                            "redis-server is installed (make install)")
    return url


@contextlib.contextmanager
def _failing_the_test() -> Iterator[None]:
    """A service that does not come up fails the test with its log, not a traceback."""
    try:
        yield
    except ServiceFailed as failure:
        pytest.fail(str(failure), pytrace=False)


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
        # A boot test's accelerator answer (imaging.boot) kept in the test's folder.
        XDG_CACHE_HOME=str(tmp_path / "cache"),
    )
    return env


@pytest.fixture
def host_name(redis_url) -> Iterator[str]:
    """This run's host: a stale message of an earlier run finds no worker; its queue goes after."""
    name = f"host-{os.getpid()}"
    yield name
    client = redis.Redis.from_url(redis_url)
    try:
        client.delete(f"host.{name}", *(f"_kombu.{kind}.host.{name}"
                                        for kind in ("binding", "binding_permanent")))
    finally:
        client.close()


@pytest.fixture
def private_redis(request, live_environment, tmp_path) -> Iterator[RedisServer]:
    """Parametrized indirectly with True, it keeps its data across a restart."""
    with _failing_the_test():
        server = RedisServer(tmp_path, tmp_path / "redis.log",
                             persistent=getattr(request, "param", False))
    live_environment["REDIS_URL"] = server.url
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def live_server_process(live_environment, tmp_path) -> Iterator[LiveServer]:
    with _failing_the_test():
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
        with _failing_the_test():
            worker = CeleryWorker(host_name, queues or [f"host.{host_name}"], worker_env,
                                  tmp_path / f"worker-{host_name}-{len(workers)}.log",
                                  concurrency)
        workers.append(worker)
        return worker

    try:
        yield start
    finally:
        for worker in workers:
            worker.stop()
