"""The web side's speed: the "web" section of `python -m bench`, also `python -m bench.web`.

Everything runs on loopback with the system's own services, started by
webui.testing as the wiring tests start them: a private redis-server, uvicorn
serving webui.asgi, and one Celery worker for a host whose disk file is the
benchmark disk, over a fresh SQLite database (the default deployment) migrated
for the run. Measured:

- Backups: the same raw backup of the disk, each into a new empty datastore,
  by the CLI (`python -m imaging backup`, timed as the engine section times
  it), through the API (POST /api/disks/<id>/backup/ with a token, run by the
  worker; timed from the request until the job's final state reaches a
  WebSocket client, then a sync, as the CLI's timed span ends), and through
  the API again with WATCHERS more WebSocket clients watching. The median of
  `rounds` each, the order rotating from round to round. Every image must hash
  like the disk.
- Progress, during the API backups: the events per second that reach the
  client, and their delay from leaving the worker (sent_at) to arriving.
- The catalog: CATALOG_IMAGES images over CATALOG_DISKS disks, bulk-created in
  the server's database; `clients` concurrent clients GET /api/images/?disk=...
  (a random disk each time), then /api/disks/, `requests` times each; the 95th
  percentile of the response times.
- The pages: the dashboard of that lab and the page of a disk with PAGE_IMAGES
  images, rendered by Django's test client in this process, `requests` times
  each; and the CSS and JavaScript each page loads.

`section()` returns the runs, for the report's table of all runs, and the rows
of its targets table.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import http.client
import json
import math
import operator
import os
import random
import re
import secrets
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException

from bench.disk import build_disk
from bench.measure import _machine_busy_seconds, wait_until_idle
from bench.peers import Bench, Run, merge_rounds, ours_backup
from bench.report import Comparison, Results, throughput, wall_seconds
from bench.system import GiB, MiB, exit_cleanly_on_signals, read_through, size_argument, tree_bytes
from webui.testing import CeleryWorker, LiveServer, RedisServer

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 3
WATCHERS = 200
CLIENTS = 20
REQUESTS = 25
CATALOG_IMAGES = 10_000
CATALOG_DISKS = 100
CATALOG_HOSTS = 10
CATALOG_STORE = "/srv/bench-catalog"
PAGE_IMAGES = 1_000

API_THROUGHPUT_TARGET = 0.95
WATCHED_SLOWDOWN_TARGET = 1.10
EVENTS_PER_SECOND_TARGET = 2.0
DELAY_TARGET_SECONDS = 0.250
LIST_TARGET_SECONDS = 0.100
PAGE_TARGET_SECONDS = 0.150
PAGE_ASSETS_LIMIT = 100 * 1024

HOST_NAME = "bench-web"
USER_NAME = "bench"
FINAL_STATES = {"succeeded", "succeeded-with-warnings", "failed", "cancelled"}
BACKUP_TIMEOUT = 900
# Time for every watcher to see the final state once the first client has it.
WATCHERS_TIMEOUT = 30
# Concurrent WebSocket handshakes while the watchers connect.
HANDSHAKES = 20
# What a run measures, in this order; `--parts` picks some.
PARTS = ("backups", "catalog", "pages")
KINDS = {"cli": "web: backup by the CLI, fresh store",
         "api": "web: backup through the API, run by the worker",
         "watched": "web: API backup, {watchers} more WebSocket clients watching"}


@dataclasses.dataclass
class Scale:
    rounds: int = ROUNDS
    watchers: int = WATCHERS
    clients: int = CLIENTS
    requests: int = REQUESTS


@dataclasses.dataclass
class Section:
    runs: dict[str, Run]
    rows: list[list[str]]
    notes: list[str]


@dataclasses.dataclass
class Figures:
    """What the rows are made of; a part that could not be measured says why in `missing`."""
    runs: dict[str, Run] = dataclasses.field(default_factory=dict)
    events_per_second: list[float] = dataclasses.field(default_factory=list)
    delays: list[float] = dataclasses.field(default_factory=list)
    watcher_delays: list[float] = dataclasses.field(default_factory=list)
    latencies: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    renders: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    # Per page: {url: bytes} of the CSS and JavaScript it loads, and what it loads from elsewhere.
    assets: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    foreign_assets: list[str] = dataclasses.field(default_factory=list)
    dashboard_disks: int = 0
    missing: dict[str, str] = dataclasses.field(default_factory=dict)


def _say(message: str) -> None:
    print(f"[bench.web {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def section(disk: Path, workdir: Path, scale: Scale | None = None, idle_wait: float = 0.0,
            progress: Callable[[str], None] = _say, parts: tuple[str, ...] = PARTS) -> Section:
    """Measure on `disk` (read only), working in `workdir` (made, left for the caller to remove).

    Configures Django in this process, on the run's own database: call it once per process.
    `parts` picks some of PARTS; the rows of the others say they were not measured.
    """
    scale = scale or Scale()
    workdir.mkdir(parents=True, exist_ok=True)
    figures = Figures()
    figures.missing.update((part, "not measured in this run") for part in PARTS
                           if part not in parts)
    try:
        with _Lab(disk, workdir, progress) as lab:
            measures = {
                "backups": lambda: _backups(lab, figures, scale, idle_wait, progress),
                "catalog": lambda: _catalog(lab, figures, scale, progress),
                "pages": lambda: _pages(figures, scale, progress),
            }
            for part in PARTS:
                if part in parts:
                    _part(figures, part, progress, measures[part])
    except Exception as failure:  # as in _part: the report must still be written
        for part in PARTS:
            figures.missing.setdefault(part, _reason(failure))
        progress(f"web section: {type(failure).__name__}: {failure}")
    results = Results(figures.runs, disk.stat().st_size)
    return Section(runs=figures.runs, rows=_rows(results, figures, scale), notes=_notes(scale))


def _part(figures: Figures, name: str, progress: Callable[[str], None],
          measure: Callable[[], None]) -> None:
    # One part failing (a service gone, a refused request) must not cost the
    # report the other parts' figures, nor the engine sections' before them.
    try:
        measure()
    except Exception as failure:
        figures.missing[name] = _reason(failure)
        progress(f"web section, {name}: {type(failure).__name__}: {failure}")


def _reason(failure: BaseException) -> str:
    first_line = (str(failure).strip().splitlines() or [""])[0]
    return f"{type(failure).__name__}: {first_line}" if first_line else type(failure).__name__


# --- the services, the database and the benchmark disk in the inventory ------

class _Lab:
    """Redis, the web server and the worker, on a database migrated here; the disk inventoried."""

    def __init__(self, disk: Path, workdir: Path, progress: Callable[[str], None]):
        self.disk = disk
        self.workdir = workdir
        self.progress = progress
        self.stores = workdir / "stores"
        self.logs = workdir / "logs"
        self._services = contextlib.ExitStack()

    def __enter__(self) -> "_Lab":
        self.stores.mkdir()
        self.logs.mkdir()
        try:
            self.progress("web: starting Redis, migrating a fresh database")
            self.redis = self._start(RedisServer(self.workdir, self.logs / "redis.log"))
            env = _environment(self.workdir / "data", self.redis.url, self.disk)
            _configure_django(env)
            self.token, self.cookie = _staff_credentials()
            self.progress("web: starting uvicorn and a Celery worker")
            self.server = self._start(LiveServer(env, self.logs / "uvicorn.log",
                                                 workers=os.cpu_count() or 1))
            self.worker = self._start(CeleryWorker(HOST_NAME, [f"host.{HOST_NAME}"], env,
                                                   self.logs / "worker.log"))
            self.disk_id = self._inventoried_disk()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        from django.conf import settings
        from django.db import connections

        if settings.configured:
            connections.close_all()
        self._services.close()

    def _start(self, service):
        self._services.callback(service.stop)
        return service

    def _inventoried_disk(self) -> int:
        from webui.models import Disk

        path = os.path.realpath(self.disk)
        self.worker.wait_until(lambda: Disk.objects.filter(path=path, present=True).exists(),
                               f"{path} in the worker's inventory")
        return Disk.objects.get(path=path).pk

    def request(self, connection: http.client.HTTPConnection, method: str, path: str,
                body: dict | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Token {self.token}", "Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, path, body=None if body is None else json.dumps(body),
                           headers=headers)
        response = connection.getresponse()
        text = response.read()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, {"detail": text[:200].decode(errors="replace")}

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        connection = http.client.HTTPConnection("127.0.0.1", self.server.port, timeout=60)
        try:
            return self.request(connection, "POST", path, body)
        finally:
            connection.close()

    async def watch(self) -> "_Watcher":
        """A WebSocket client on /ws/dashboard/, logged in as a browser is."""
        socket = await connect(f"ws://127.0.0.1:{self.server.port}/ws/dashboard/",
                               origin=self.server.url,
                               additional_headers={"Cookie": self.cookie}, open_timeout=60)
        return _Watcher(socket)


def _environment(data_dir: Path, redis_url: str, disk: Path) -> dict[str, str]:
    """The services' environment: this run's database, Redis and datastore, the disk its only
    disk file, production settings; nothing of the caller's deployment."""
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("IMAGING_", "PYTEST_")) and name != "SECRET_KEY_FILE"}
    env.update(
        DJANGO_SETTINGS_MODULE="webui.settings",
        DATA_DIR=str(data_dir),
        DATABASE_URL=f"sqlite:///{data_dir / 'db.sqlite3'}",
        REDIS_URL=redis_url,
        CHANNEL_LAYER="redis",
        SECRET_KEY=secrets.token_urlsafe(50),
        DEBUG="false",
        ALLOWED_HOSTS="127.0.0.1 localhost",
        HOST_NAME=HOST_NAME,
        IMAGING_DATASTORE=str(data_dir / "datastore"),
        IMAGING_DISK_FILES=os.path.realpath(disk),
        PYTHONUNBUFFERED="1",
    )
    return env


def _configure_django(env: dict[str, str]) -> None:
    """Django in this process, on the services' database: the catalog is written with the ORM."""
    for name in set(os.environ) - set(env):
        del os.environ[name]
    os.environ.update(env)
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def _staff_credentials() -> tuple[str, str]:
    """(API token, session cookie) of a staff user, as a script and a browser hold them."""
    from django.contrib.auth.models import User
    from django.test import Client

    from webui.api.authentication import new_token

    user = User.objects.create_user(USER_NAME, password=secrets.token_urlsafe(16), is_staff=True)
    browser = Client()
    browser.force_login(user, backend="django.contrib.auth.backends.ModelBackend")
    return new_token(user), f"sessionid={browser.cookies['sessionid'].value}"


# --- backups: CLI, API, API watched by many -------------------------------------

class _Watcher:
    """Every message a WebSocket client receives, with when it arrived."""

    def __init__(self, socket: ClientConnection):
        self.socket = socket
        # (time.perf_counter(), time.time(), message) per message, in arrival order.
        self.messages: list[tuple[float, float, dict]] = []
        self._news = asyncio.Event()
        self._closed = False
        self._task = asyncio.create_task(self._listen())

    async def _listen(self) -> None:
        try:
            async for text in self.socket:
                message = json.loads(text)
                self.messages.append((time.perf_counter(), time.time(), message))
                if message.get("state") in FINAL_STATES:
                    self._news.set()
        finally:
            self._closed = True
            self._news.set()

    async def final(self, job_id: int) -> tuple[float, dict]:
        """When the job's final state arrived (perf_counter), and the job as it came."""
        while True:
            for arrived, _, message in self.messages:
                if message.get("id") == job_id and message.get("state") in FINAL_STATES:
                    return arrived, message
            if self._closed:
                raise RuntimeError(f"the WebSocket closed before job {job_id} finished "
                                   f"(code {self.socket.close_code})")
            self._news.clear()
            await self._news.wait()

    def progress(self, job_id: int) -> list[tuple[float, float, dict]]:
        return [(arrived, wall, message) for arrived, wall, message in self.messages
                if message.get("job") == job_id and "progress" in message
                and "id" not in message]

    def running_since(self, job_id: int) -> float | None:
        return next((arrived for arrived, _, message in self.messages
                     if message.get("id") == job_id and message.get("state") == "running"), None)

    async def close(self) -> None:
        await self.socket.close()
        await self._task


def _backups(lab: _Lab, figures: Figures, scale: Scale, idle_wait: float,
             progress: Callable[[str], None]) -> None:
    progress("web: hashing the disk, to check every image against it")
    with open(lab.disk, "rb") as disk:
        disk_sha256 = hashlib.file_digest(disk, "sha256").hexdigest()
    labels = {kind: label.format(watchers=scale.watchers) for kind, label in KINDS.items()}
    kinds = list(KINDS)
    rounds = []
    for number in range(scale.rounds):
        runs: dict[str, Run] = {}
        for kind in kinds[number % len(kinds):] + kinds[:number % len(kinds)]:
            progress(f"web: round {number + 1} of {scale.rounds}: {labels[kind]}")
            store = lab.stores / f"{kind}-{number}"
            wait_until_idle(idle_wait)
            if kind == "cli":
                run, sha256 = _cli_backup(lab, store, labels[kind])
            else:
                watchers = scale.watchers if kind == "watched" else 0
                run, sha256 = _api_backup(lab, store, labels[kind], watchers, figures)
            if not run.error and sha256 != disk_sha256:
                run.error = f"the image's sha256 {sha256[:12]}... is not the disk's"
            runs[f"web.{kind}"] = run
            shutil.rmtree(store, ignore_errors=True)
        rounds.append(runs)
    figures.runs.update(merge_rounds(rounds))


def _cli_backup(lab: _Lab, store: Path, label: str) -> tuple[Run, str | None]:
    bench = Bench(disk=lab.disk, workdir=lab.workdir, repo_root=REPO_ROOT, gzip_sample=0)
    run = ours_backup(bench, "cli", label, store)
    if run.error:
        return run, None
    return run, json.loads((run.image / "manifest.json").read_text())["sha256"]


def _api_backup(lab: _Lab, store: Path, label: str, watchers: int,
                figures: Figures) -> tuple[Run, str | None]:
    from webui.models import Datastore

    datastore_id = Datastore.objects.create(path=str(store)).pk
    read_through(lab.disk)
    try:
        return asyncio.run(_watched_backup(lab, store, label, datastore_id, watchers, figures))
    except (OSError, RuntimeError, KeyError, ValueError, http.client.HTTPException,
            WebSocketException) as failure:
        return Run(label, error=_reason(failure)), None


async def _watched_backup(lab: _Lab, store: Path, label: str, datastore_id: int, watchers: int,
                          figures: Figures) -> tuple[Run, str | None]:
    handshakes = asyncio.Semaphore(HANDSHAKES)

    async def connected() -> _Watcher:
        async with handshakes:
            return await lab.watch()

    client = await lab.watch()
    crowd: list[_Watcher] = []
    try:
        joined = await asyncio.gather(*(connected() for _ in range(watchers)),
                                      return_exceptions=True)
        crowd += [watcher for watcher in joined if isinstance(watcher, _Watcher)]
        refused = next((failure for failure in joined if isinstance(failure, BaseException)), None)
        if refused is not None:
            raise refused
        services = [lab.worker.pid, lab.server.pid, lab.redis.pid]
        with contextlib.suppress(OSError):  # only the peak of this run, where the kernel can
            Path(f"/proc/{lab.worker.pid}/clear_refs").write_text("5")
        await asyncio.to_thread(os.sync)
        busy_before, cpu_before = _machine_busy_seconds(), _cpu_seconds(services)
        started = time.perf_counter()
        status, answer = await asyncio.to_thread(
            lab.post, f"/api/disks/{lab.disk_id}/backup/",
            {"mode": "raw", "datastore": datastore_id})
        if status != 202:
            raise RuntimeError(f"POST backup answered {status}: {answer.get('detail', answer)}")
        job_id = answer["job"]
        async with asyncio.timeout(BACKUP_TIMEOUT):
            finished, job = await client.final(job_id)
        await asyncio.to_thread(os.sync)
        seconds = time.perf_counter() - started
        cpu = _cpu_seconds(services) - cpu_before
        other_cpu = max(0.0, _machine_busy_seconds() - busy_before - cpu)
        async with asyncio.timeout(WATCHERS_TIMEOUT):
            for watcher in crowd:
                await watcher.final(job_id)
    finally:
        await asyncio.gather(*(watcher.close() for watcher in [client, *crowd]),
                             return_exceptions=True)
    if job["state"] != "succeeded":
        reason = job.get("error") or "no reason given"
        return Run(label, error=f"job {job['state']}: {reason}"), None

    events = client.progress(job_id)
    running_since = client.running_since(job_id) or (events[0][0] if events else started)
    rate = len(events) / (finished - running_since) if finished > running_since else 0.0
    delays = [wall - message["progress"]["sent_at"] for _, wall, message in events]
    note = (f"{len(events)} progress events ({rate:.1f}/s), worker says "
            f"{job['result']['seconds']:.2f} s")
    if crowd:
        received = [len(watcher.progress(job_id)) for watcher in crowd]
        figures.watcher_delays += [wall - message["progress"]["sent_at"] for watcher in crowd
                                   for _, wall, message in watcher.progress(job_id)]
        note += f"; each watcher got {min(received)}–{max(received)} events and the final state"
    else:
        figures.events_per_second.append(rate)
        figures.delays += delays
    run = Run(label, seconds=seconds, output_bytes=tree_bytes(store / "chunks"),
              peak_memory=_peak_rss(lab.worker.pid), cpu_seconds=cpu, other_cpu_seconds=other_cpu,
              new_bytes=job["result"]["new_bytes"], note=note)
    return run, job["result"]["sha256"]


def _cpu_seconds(pids: list[int]) -> float:
    """CPU seconds the processes, their live descendants (uvicorn's worker processes) and
    their children that exited have used so far."""
    ticks = 0
    for pid in _with_descendants(pids):
        try:
            # After the command name: state is field 3 of proc(5), utime..cstime are 14-17.
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # a descendant gone meanwhile: its parent has its time
            continue
        ticks += sum(int(field) for field in fields[11:15])
    return ticks / os.sysconf("SC_CLK_TCK")


def _with_descendants(pids: list[int]) -> list[int]:
    found, pending = [], list(pids)
    while pending:
        pid = pending.pop()
        found.append(pid)
        for children in Path(f"/proc/{pid}/task").glob("*/children"):
            with contextlib.suppress(FileNotFoundError):
                pending += [int(child) for child in children.read_text().split()]
    return found


def _peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


# --- the catalog: 10,000 images over 100 disks ---------------------------------

def _catalog(lab: _Lab, figures: Figures, scale: Scale, progress: Callable[[str], None]) -> None:
    from webui.models import Disk

    progress(f"web: bulk-creating {CATALOG_IMAGES:,} images over {CATALOG_DISKS} disks")
    disk_ids = _seed_catalog()
    rng = random.Random(1)
    # Each endpoint: (every client's paths, the count every answer must report).
    endpoints = {
        "images": ([[f"/api/images/?disk={rng.choice(disk_ids)}" for _ in range(scale.requests)]
                    for _ in range(scale.clients)], CATALOG_IMAGES // CATALOG_DISKS),
        # The catalog's disks, the benchmark disk and this machine's own.
        "disks": ([["/api/disks/"] * scale.requests for _ in range(scale.clients)],
                  Disk.objects.count()),
    }
    for name, (paths, count) in endpoints.items():
        progress(f"web: {scale.requests} GET /api/{name}/ by one client, then by "
                 f"{scale.clients} at once")
        # Alone, what one request costs the server; together, how requests queue.
        figures.latencies[f"{name} alone"] = _concurrent_gets(lab, paths[:1], count)
        figures.latencies[name] = _concurrent_gets(lab, paths, count)


def _seed_catalog() -> list[int]:
    """A lab's history: hosts, disks with a daily schedule, an image a day each and the backup
    job that made it. Returns the disks' ids."""
    datastore, hosts = _lab_rows()
    disks = _seed_disks(datastore, hosts, range(CATALOG_DISKS), CATALOG_IMAGES // CATALOG_DISKS)
    return [disk.pk for disk in disks]


def _lab_rows():
    """The catalog's datastore and hosts (made once)."""
    from django.utils import timezone

    from webui.models import Datastore, Host

    datastore, _ = Datastore.objects.get_or_create(path=CATALOG_STORE, defaults=dict(
        chunk_count=80_000, chunk_bytes=300 * GiB, image_count=CATALOG_IMAGES,
        logical_bytes=CATALOG_IMAGES * 500 * GiB))
    hosts = [Host.objects.update_or_create(name=f"lab-{number:02d}", defaults=dict(
        worker=f"lab-{number:02d}@bench", last_seen=timezone.now()))[0]
        for number in range(CATALOG_HOSTS)]
    return datastore, hosts


def _seed_disks(datastore, hosts, numbers, images_each: int):
    """Disks (spread over the hosts) with a daily schedule, an image a day back from today
    and the job that made each image."""
    from django.utils import timezone

    from webui.models import Disk, Image, Job, Schedule

    now = timezone.now()
    today = now.replace(hour=3, minute=0, second=0, microsecond=0)  # the schedule's last run
    if today > now:
        today -= dt.timedelta(days=1)
    disks = Disk.objects.bulk_create(
        Disk(host=hosts[number % len(hosts)], stable_id=f"wwn-0x5000c500{number:08x}",
             model="Bench Disk 500", serial=f"BENCH{number:04d}", size=500 * GiB,
             path=f"/dev/sd{chr(ord('a') + number // len(hosts) % 26)}", kind="disk",
             last_seen=today)
        for number in numbers)
    Schedule.objects.bulk_create(
        Schedule(disk=disk, datastore=datastore, cron="0 3 * * *",
                 created=today - dt.timedelta(days=images_each + 1)) for disk in disks)
    images = Image.objects.bulk_create((
        Image(datastore=datastore, disk=disk, stamp=f"{created:%Y-%m-%dT%H-%M-%SZ}",
              path=f"{datastore.path}/images/{disk.stable_id}/{created:%Y-%m-%dT%H-%M-%SZ}",
              mode="used", size=disk.size, stored_bytes=disk.size // 3,
              new_bytes=(day * 7919 % 97 + 1) * 64 * MiB, level=3, created=created,
              seconds=600.0 + day % 60,
              sha256=hashlib.sha256(f"{disk.stable_id}/{day}".encode()).hexdigest(),
              verified_at=created + dt.timedelta(hours=1) if day % 2 else None,
              verify_ok=True if day % 2 else None)
        for disk in disks
        for day, created in ((day, today - dt.timedelta(days=day)) for day in range(images_each))),
        batch_size=1000)
    Job.objects.bulk_create((
        Job(kind="backup", state=Job.State.SUCCEEDED, host=image.disk.host,
            disk=image.disk, image=image, datastore=datastore,
            params={"mode": "used", "level": 3, "force": False}, created=image.created,
            started=image.created, finished=image.created + dt.timedelta(seconds=image.seconds),
            heartbeat_at=image.created, worker=image.disk.host.worker,
            result={"image": image.path})
        for image in images), batch_size=1000)
    return disks


def _concurrent_gets(lab: _Lab, paths_per_client: list[list[str]], count: int) -> list[float]:
    """Response times of each client's GETs, all clients at once, each on its own keep-alive
    connection opened (with one untimed GET) before the first timed one."""
    start = threading.Barrier(len(paths_per_client))
    times: list[float] = []
    failures: list[BaseException] = []

    def client(paths: list[str]) -> None:
        connection = http.client.HTTPConnection("127.0.0.1", lab.server.port, timeout=60)
        try:
            for number, path in enumerate(paths):
                if number == 1:  # the first GET opened the connection and warmed the server
                    start.wait()
                began = time.perf_counter()
                status, answer = lab.request(connection, "GET", path)
                elapsed = time.perf_counter() - began
                if status != 200 or answer.get("count") != count or not answer.get("results"):
                    raise RuntimeError(f"GET {path} answered {status} with count "
                                       f"{answer.get('count')}, not 200 with {count}")
                if number:
                    times.append(elapsed)
        except BaseException as failure:
            failures.append(failure)
            start.abort()
        finally:
            connection.close()

    threads = [threading.Thread(target=client, args=([paths[0], *paths],), daemon=True)
               for paths in paths_per_client]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        # A client that failed broke the barrier for the others: report the first cause.
        raise next((failure for failure in failures
                    if not isinstance(failure, threading.BrokenBarrierError)), failures[0])
    return times


# --- the pages: the dashboard and a disk with 1,000 images ----------------------

class _AssetLinks(HTMLParser):
    """The stylesheets and scripts a page links."""

    def __init__(self):
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = dict(attrs)
        if tag == "link" and "stylesheet" in (found.get("rel") or "").split() and found.get("href"):
            self.urls.append(found["href"])
        elif tag == "script" and found.get("src"):
            self.urls.append(found["src"])


# What a stylesheet or a module pulls in after it: @import; import/export ... from, import().
CSS_IMPORT = re.compile(r"""@import\s+(?:url\()?\s*["']?([^"')\s;]+)""")
JS_IMPORT = re.compile(r"""^\s*(?:import|export)\s+(?:[\w*{}\s,]+?\s+from\s+)?["']([^"']+)["']"""
                       r"""|\bimport\s*\(\s*["']([^"']+)["']""", re.MULTILINE)


def _pages(figures: Figures, scale: Scale, progress: Callable[[str], None]) -> None:
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client
    from django.urls import reverse

    from webui.models import Disk

    progress(f"web: a disk with {PAGE_IMAGES:,} images, and the static files collected")
    datastore, hosts = _lab_rows()
    disk = _seed_disks(datastore, hosts[:1], [CATALOG_DISKS], PAGE_IMAGES)[0]
    figures.dashboard_disks = Disk.objects.count()
    call_command("collectstatic", interactive=False, verbosity=0)
    browser = Client(HTTP_HOST="127.0.0.1")
    browser.force_login(User.objects.get(username=USER_NAME),
                        backend="django.contrib.auth.backends.ModelBackend")
    for name, path in (("dashboard", reverse("dashboard")),
                       ("disk", reverse("disk", args=[disk.pk]))):
        progress(f"web: rendering {path} {scale.requests} times")
        html = _render(browser, path)  # untimed: templates compiled, caches warm
        times = []
        for _ in range(scale.requests):
            began = time.perf_counter()
            _render(browser, path)
            times.append(time.perf_counter() - began)
        figures.renders[name] = times
        figures.assets[name] = _linked_assets(html, path, Path(settings.STATIC_ROOT),
                                              urljoin("/", settings.STATIC_URL), figures)


def _render(browser, path: str) -> str:
    response = browser.get(path)
    if response.status_code != 200 or not response["Content-Type"].startswith("text/html"):
        raise RuntimeError(f"GET {path} answered {response.status_code} "
                           f"{response['Content-Type']}, not a page")
    return response.content.decode()


def _linked_assets(html: str, page: str, static_root: Path, static_url: str,
                   figures: Figures) -> dict[str, int]:
    """{url: bytes} of every stylesheet and script the page loads, and what those import,
    as collectstatic wrote them (uncompressed)."""
    links = _AssetLinks()
    links.feed(html)
    pending = [urljoin(page, url) for url in links.urls]
    sizes: dict[str, int] = {}
    while pending:
        url = pending.pop()
        parts = urlsplit(url)
        if parts.scheme or parts.netloc or not parts.path.startswith(static_url):
            figures.foreign_assets.append(url)
            continue
        if parts.path in sizes:
            continue
        file = static_root / parts.path.removeprefix(static_url)
        content = file.read_bytes()
        sizes[parts.path] = len(content)
        imports = CSS_IMPORT if file.suffix == ".css" else JS_IMPORT
        pending += [urljoin(parts.path, next(group for group in found.groups() if group))
                    for found in imports.finditer(content.decode(errors="replace"))]
    return sizes


# --- the rows of the targets table -------------------------------------------

def percentile(values: list[float], share: float) -> float:
    """The nearest-rank percentile: the smallest value that `share` of the values do not exceed."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def _rows(results: Results, figures: Figures, scale: Scale) -> list[list[str]]:
    comparisons = [
        Comparison("Backup through the API and a worker vs the CLI (throughput)", "web.api",
                   "web.cli", throughput, "MiB/s", API_THROUGHPUT_TARGET),
        Comparison(f"API backup watched by {scale.watchers} more WebSocket clients vs by one "
                   "(wall time)", "web.watched", "web.api", wall_seconds, "s",
                   WATCHED_SLOWDOWN_TARGET, operator.le),
    ]
    rows = [comparison.row(results) for comparison in comparisons]
    backups_missing = figures.missing.get("backups")
    rows.append(_figure_row(
        "Progress events reaching a WebSocket client during an API backup (median of the runs)",
        statistics.median(figures.events_per_second) if figures.events_per_second else None,
        lambda rate: f"{rate:.1f} per s", f"≥ {EVENTS_PER_SECOND_TARGET:g} per s",
        lambda rate: rate >= EVENTS_PER_SECOND_TARGET, backups_missing))
    rows.append(_figure_row(
        "Progress delay, worker (sent_at) to WebSocket client, 95th percentile",
        percentile(figures.delays, 0.95) if figures.delays else None,
        lambda delay: f"{delay * 1000:.1f} ms (of {len(figures.delays)} events, worst "
                      f"{max(figures.delays) * 1000:.1f} ms)",
        f"< {DELAY_TARGET_SECONDS * 1000:.0f} ms", lambda delay: delay < DELAY_TARGET_SECONDS,
        backups_missing))
    rows.append(_figure_row(
        f"Progress delay with {scale.watchers} more clients watching, 95th percentile over "
        "all of them", percentile(figures.watcher_delays, 0.95) if figures.watcher_delays else None,
        lambda delay: f"{delay * 1000:.1f} ms (of {len(figures.watcher_delays)} events)",
        "info", None, backups_missing))
    for name, criterion in (("images", "GET /api/images/?disk=…"), ("disks", "GET /api/disks/")):
        times, alone = figures.latencies.get(name), figures.latencies.get(f"{name} alone")
        rows.append(_figure_row(
            f"{criterion} with {scale.clients} concurrent clients, {CATALOG_IMAGES:,} images over "
            f"{CATALOG_DISKS} disks, 95th percentile",
            percentile(times, 0.95) if times else None,
            lambda p95, times=times, alone=alone: (
                f"{p95 * 1000:.1f} ms (median {statistics.median(times) * 1000:.1f} ms of "
                f"{len(times)} requests; one client alone: median "
                f"{statistics.median(alone) * 1000:.1f} ms)"),
            f"< {LIST_TARGET_SECONDS * 1000:.0f} ms", lambda p95: p95 < LIST_TARGET_SECONDS,
            figures.missing.get("catalog")))
    pages_missing = figures.missing.get("pages")
    for name, criterion in (
            ("dashboard", f"Dashboard render, server-side, 95th percentile "
                          f"({figures.dashboard_disks or 'all'} disks)"),
            ("disk", f"Disk page render with {PAGE_IMAGES:,} images, server-side, "
                     "95th percentile")):
        times = figures.renders.get(name)
        rows.append(_figure_row(
            criterion, percentile(times, 0.95) if times else None,
            lambda p95, times=times: (f"{p95 * 1000:.1f} ms (median "
                                      f"{statistics.median(times) * 1000:.1f} ms of "
                                      f"{len(times)} renders)"),
            f"< {PAGE_TARGET_SECONDS * 1000:.0f} ms", lambda p95: p95 < PAGE_TARGET_SECONDS,
            pages_missing))
    totals = {name: sum(sizes.values()) for name, sizes in figures.assets.items()}
    foreign = sorted(set(figures.foreign_assets))
    rows.append(_figure_row(
        "A page's own CSS and JavaScript (every file it links, and what they import), "
        "the larger of the two pages", max(totals.values()) if totals else None,
        lambda largest: "; ".join([
            *(f"{name}: {total / 1024:.1f} KiB in {len(figures.assets[name])} files"
              for name, total in totals.items()),
            *([f"also from elsewhere: {', '.join(foreign)}"] if foreign else [])]),
        f"≤ {PAGE_ASSETS_LIMIT // 1024} KiB",
        lambda largest: largest <= PAGE_ASSETS_LIMIT and not foreign, pages_missing))
    return rows


def _figure_row(criterion: str, value: float | None, shown: Callable[[float], str], target: str,
                passes: Callable[[float], bool] | None, missing: str | None) -> list[str]:
    if value is None:
        return [criterion, "—", "", "", target, f"n/a ({missing or 'not measured'})"]
    verdict = "info" if passes is None else "PASS" if passes(value) else "FAIL"
    return [criterion, shown(value), "", "", target, verdict]


def _notes(scale: Scale) -> list[str]:
    return [
        "Web: a private redis-server, uvicorn serving webui.asgi and one Celery worker (threads "
        "pool), as `make run` starts them, on loopback over a fresh SQLite database. The same raw "
        f"backup of the disk, each into a new empty datastore, {scale.rounds} times each way, the "
        "order rotating: by the CLI (`python -m imaging backup`, timed as above), through the "
        "API (POST /api/disks/<id>/backup/ with a token, run by the worker; timed from the "
        "request until the job's final state reaches a client on /ws/dashboard/, then a sync) "
        f"and through the API with {scale.watchers} more clients on /ws/dashboard/, connected "
        "beforehand, each receiving every event of the backup (the job's page gets the same "
        "events). Every image's sha256 is checked against the disk's. CPU s of an API backup: "
        "the worker's, the web server's and Redis's; peak memory: the worker's peak RSS; other "
        "CPU s includes the benchmark's own WebSocket clients, all in its one process, which "
        "also adds to the delays the watchers see.",
        f"Web catalog: {CATALOG_IMAGES:,} images (and the backup jobs that made them) over "
        f"{CATALOG_DISKS} disks of {CATALOG_HOSTS} hosts, each disk with a daily schedule, "
        f"bulk-created in the server's database; {scale.clients} clients at once, each on its "
        f"own keep-alive connection with token auth, {scale.requests} timed GETs each of the "
        "first page (50 per page), the images of a random disk, then the disks, each endpoint "
        "first by one client alone; response times measured by the clients.",
        f"Web pages: the dashboard of that lab and the page of a disk with {PAGE_IMAGES:,} "
        "images (with their backup jobs), rendered by Django's test client in this process "
        f"for a staff user, once untimed, then {scale.requests} times each; the CSS and "
        "JavaScript a page links (stylesheets, scripts, and their @import and import) summed "
        "as collectstatic writes them, before compression.",
    ]


# --- python -m bench.web --------------------------------------------------------

def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(part.strip() for part in text.split(",") if part.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'none'}: use some of "
                                         f"{', '.join(PARTS)}")
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.web", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=size_argument, default=GiB,
                        help="test disk size, e.g. 256M for a quick try (default 1G)")
    parser.add_argument("--disk", type=Path,
                        help="back up this disk image (only read) instead of building one")
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / "data" / "bench",
                        help="a temporary directory is made and removed inside it")
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--watchers", type=int, default=WATCHERS)
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--requests", type=int, default=REQUESTS,
                        help="timed GETs per client and endpoint")
    parser.add_argument("--wait-idle", type=float, default=0, metavar="SECONDS")
    parser.add_argument("--parts", type=_parts, default=PARTS, metavar="PART,...",
                        help=f"measure only these of {', '.join(PARTS)} (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    if min(args.rounds, args.clients, args.requests) < 1 or args.watchers < 0:
        parser.error("--rounds, --clients and --requests must be at least 1, --watchers 0 or more")
    exit_cleanly_on_signals()
    args.workdir.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="web-", dir=args.workdir))
    try:
        disk = args.disk
        if disk is None:
            disk = workdir / "disk.img"
            _say(f"building a {args.size / MiB:.0f} MiB test disk")
            build_disk(disk, args.size)
        disk_size = disk.stat().st_size
        result = section(disk, workdir / "web", Scale(args.rounds, args.watchers, args.clients,
                                                      args.requests), idle_wait=args.wait_idle,
                         parts=args.parts)
    finally:
        if args.keep:
            _say(f"kept {workdir}")
        else:
            shutil.rmtree(workdir)
    results = Results(result.runs, disk_size)
    for run in result.runs.values():
        spread = f" ({run.spread[0]:.2f}–{run.spread[1]:.2f})" if run.spread else ""
        figures = run.error or (f"{run.seconds:.2f} s{spread}, {throughput(results, run):.0f} "
                                f"MiB/s, CPU {run.cpu_seconds:.1f} s, other CPU "
                                f"{run.other_cpu_seconds:.1f} s; {run.note}")
        print(f"- {run.label}: {figures}")
    print()
    header = ["Criterion", "Ours", "Peer", "Ours/peer", "Target", "Result"]
    for row in [header, ["---"] * len(header), *result.rows]:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
