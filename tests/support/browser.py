"""A real browser on the live services: Debian's chromium, headless, driven by Playwright.

A test module loads these fixtures with `pytest_plugins = ["support.browser"]`:

- `browser`: chromium (/usr/bin/chromium, never a downloaded one), one per test,
  closed at teardown; missing, the test is skipped (fails under CI).
- `lab`: the live uvicorn server over real Redis, and `lab.loop_disk()` /
  `lab.disk_file()` to make this host's disks before `lab.start_worker()`
  starts its real Celery worker with them; every loop device, queue and
  process is gone after the test, also when it fails.
- `visitor(user, color_scheme=..., width=...)`: a fresh browser context and
  page on the live server, logged in through the login form as "alice"
  (staff) or "bob" (a viewer), or anonymous with None; `alice_page` and
  `bob_page` are the two logged in at a desktop width.
- `screenshots(visit, name, color_scheme)`: saves the page as a PNG, into
  docs/screenshots/ only when SCREENSHOTS=1.

Playwright's synchronous API keeps its event loop registered as the thread's
running loop between calls, which Django reads as "called from async code"
and answers with SynchronousOnlyOperation. Nothing runs on that loop while the
test's own code does (the loop only turns inside a Playwright call), so the
ORM is safe here: the `browser` fixture sets DJANGO_ALLOW_ASYNC_UNSAFE for
this process only, for the test's duration, and closes the connections opened
meanwhile before it stops (the server and worker subprocesses never see the
variable: their environment is fixed before the browser starts). What runs an
event loop itself (async_to_sync, as the services do to announce a job on the
channel layer) still refuses that thread:
`lab.in_own_thread(services.start_backup, disk)` runs it in a thread without
a loop.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest
import redis
from playwright.sync_api import Page, sync_playwright

from .devices import loop_device, requires_loop
from .disks import PartSpec, build_disk
from .requirements import requirement_missing
from .services import REPO, CeleryWorker, LiveServer, wait_for

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PASSWORD = "browser-test-password-1"
USERS = {"alice": {"is_staff": True}, "bob": {"is_staff": False}}
DESKTOP = {"width": 1280, "height": 860}
MiB = 1024 * 1024
# How long a page may take to show what the test waits for; jobs get their own timeouts.
PAGE_TIMEOUT_MS = 15_000
SCREENSHOTS_DIR = REPO / "docs" / "screenshots"

T = TypeVar("T")
_lab_numbers = itertools.count(1)


def write_random(path: Path, size: int, length: int) -> None:
    """A sparse file of `size` bytes whose first `length` bytes are random."""
    with open(path, "wb") as disk:
        disk.truncate(size)
        for _ in range(length // MiB):
            disk.write(os.urandom(MiB))


def in_own_thread(function: Callable[..., T], *args, **kwargs) -> T:
    """function(*args, **kwargs) in a thread where no event loop is marked running."""
    from django.db import connections

    def call() -> T:
        try:
            return function(*args, **kwargs)
        finally:
            connections.close_all()  # a connection left open would hold the test database

    with ThreadPoolExecutor(max_workers=1) as thread:
        return thread.submit(call).result()


@pytest.fixture
def browser(live_environment, monkeypatch):
    """Chromium, headless. Set up after the database and the subprocesses' environment,
    so it is closed before the flush and its variable stays out of that environment."""
    if not os.access(CHROMIUM, os.X_OK):
        requirement_missing(f"{CHROMIUM} is missing: `make install` brings Debian's chromium")
    from django.db import connections

    playwright = sync_playwright().start()
    try:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
        try:
            yield browser
        finally:
            # With a loop marked running, Django keeps this thread's connections apart
            # from the usual ones (asgiref's Local): close them while that still holds,
            # or they outlive the test and hold its database.
            connections.close_all()
            browser.close()
    finally:
        playwright.stop()


@pytest.fixture
def browser_users(transactional_db) -> dict:
    from django.contrib.auth.models import User

    return {name: User.objects.create_user(name, f"{name}@example.org", PASSWORD, **flags)
            for name, flags in USERS.items()}


@dataclass
class Visit:
    """One browser context's page, and the script errors it raised so far."""
    page: Page
    script_errors: list[str] = field(default_factory=list)

    def open(self, path: str):
        """Go to a path of the live server; fail on an HTTP error answer."""
        response = self.page.goto(path)
        if response is None or not response.ok:
            pytest.fail(f"GET {path}: {response and response.status}", pytrace=False)
        return response

    def body_page(self) -> str:
        return self.page.get_attribute("body", "data-page")

    def submit_login(self, user: str, password: str = PASSWORD) -> None:
        """Fill in and send the login form this page shows, as a person would."""
        self.page.fill("input[name=username]", user)
        self.page.fill("input[name=password]", password)
        with self.page.expect_navigation():
            self.page.click("form [type=submit]")


@pytest.fixture
def visitor(browser, lab, browser_users) -> Iterator[Callable[..., Visit]]:
    """visitor(user, color_scheme="light", width=DESKTOP width): a page on the live server,
    logged in through the form as user ("alice", "bob"), or anonymous (None)."""
    contexts = []

    def open_page(user: str | None, color_scheme: str = "light",
                  width: int = DESKTOP["width"]) -> Visit:
        context = browser.new_context(base_url=lab.server.url, color_scheme=color_scheme,
                                      viewport={"width": width, "height": DESKTOP["height"]})
        context.set_default_timeout(PAGE_TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        visit = Visit(page)
        page.on("pageerror", lambda error: visit.script_errors.append(str(error)))
        if user is not None:
            log_in(visit, user)
        return visit

    try:
        yield open_page
    finally:
        for context in contexts:
            context.close()


def log_in(visit: Visit, user: str) -> None:
    visit.open("/accounts/login/")
    visit.submit_login(user)
    if visit.body_page() == "login":
        pytest.fail(f"{user} could not log in: {visit.page.url}", pytrace=False)


@pytest.fixture
def alice_page(visitor) -> Visit:
    return visitor("alice")


@pytest.fixture
def bob_page(visitor) -> Visit:
    return visitor("bob")


class Lab:
    """The live server, and this host's disks and worker once a test has made them."""

    def __init__(self, server: LiveServer, environment: dict[str, str], host_name: str,
                 start_worker: Callable[..., CeleryWorker], loops: contextlib.ExitStack,
                 folder: Path):
        self.server = server
        self.environment = environment
        self.host_name = host_name
        self._start_worker = start_worker
        self._loops = loops
        self._folder = folder
        self.disk_paths: list[str] = []
        self.worker: CeleryWorker | None = None

    def disk_file(self, name: str, size: int, random_bytes: int = 0) -> Path:
        """A disk-image file of this host: `size` bytes, sparse after `random_bytes` random ones."""
        path = self._folder / name
        write_random(path, size, random_bytes)
        self.disk_paths.append(str(path))
        return path

    def loop_disk(self, name: str, size: int, random_bytes: int = 0, label: str = "dos",
                  partitions: tuple[PartSpec, ...] = ()) -> str:
        """A loop device over such a file, or over a disk with these partitions and their
        filesystems (build_disk), detached after the test; returns its path."""
        requires_loop()
        backing = self._folder / name
        if partitions:
            build_disk(backing, size, label, partitions)
        else:
            write_random(backing, size, random_bytes)
        device = self._loops.enter_context(loop_device(backing))
        self.disk_paths.append(device)
        return device

    @property
    def datastore(self):
        """The datastore the server and worker use by default (not the test process's own)."""
        from webui import services

        return services.datastore_at(self.environment["IMAGING_DATASTORE"])

    def start_worker(self) -> CeleryWorker:
        """This host's worker, once every disk made so far is in its inventory."""
        self.worker = self._start_worker(self.host_name, disk_files=self.disk_paths)
        for path in self.disk_paths:
            self.disk(path)
        return self.worker

    def disk(self, path: str | os.PathLike):
        """The inventoried Disk of one of this host's disks."""
        from webui.models import Disk

        real = os.path.realpath(path)
        return self.wait_for(lambda: Disk.objects.filter(host__name=self.host_name, path=real,
                                                         present=True).first(),
                             f"{path} in the inventory of {self.host_name}", 30)

    def processes(self) -> list:
        return [self.server, *([self.worker] if self.worker else [])]

    in_own_thread = staticmethod(in_own_thread)

    def wait_for(self, condition: Callable[[], object], what: str, timeout: float = 60) -> object:
        return wait_for(condition, what, timeout, *self.processes())

    def finished(self, job_id: int, timeout: float = 60):
        """The job once it has ended (any final state)."""
        from webui.models import Job

        return self.wait_for(lambda: Job.objects.filter(pk=job_id).exclude(
            state__in=Job.ACTIVE_STATES).first(), f"end of job #{job_id}", timeout)


@pytest.fixture
def lab_host_name(redis_url) -> Iterator[str]:
    """A host name of this run only, its queue dropped afterwards: a message left by a
    failed test finds no worker later, in this run or another one sharing the Redis."""
    name = f"lab-{os.getpid()}-{next(_lab_numbers)}"
    yield name
    queue = f"host.{name}"
    client = redis.Redis.from_url(redis_url)
    try:
        for tag, entry in client.hgetall("unacked").items():
            if json.loads(entry)[2] == queue:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        client.delete(queue, *(f"_kombu.{kind}.{queue}" for kind in ("binding", "binding_permanent")))
    finally:
        client.close()


@pytest.fixture
def lab_loops() -> Iterator[contextlib.ExitStack]:
    """Loop devices of the lab: set up before the worker, so detached after it stopped."""
    with contextlib.ExitStack() as loops:
        yield loops


@pytest.fixture
def lab(lab_host_name, lab_loops, live_server_process, live_environment, celery_worker,
        tmp_path) -> Lab:
    folder = tmp_path / "disks"
    folder.mkdir()
    return Lab(live_server_process, live_environment, lab_host_name, celery_worker, lab_loops,
               folder)


@pytest.fixture
def screenshots(tmp_path) -> Callable[..., Path]:
    """screenshots(visit, name, color_scheme, full_page=True) saves the page (all of it, or
    what the window shows) as <name>-<color_scheme>.png: into
    docs/screenshots/ when SCREENSHOTS=1 (the README shows them), else into the
    test's temporary folder, so a plain test run leaves the tree alone."""
    folder = SCREENSHOTS_DIR if os.environ.get("SCREENSHOTS") == "1" else tmp_path / "screenshots"
    folder.mkdir(parents=True, exist_ok=True)

    def save(visit: Visit, name: str, color_scheme: str, full_page: bool = True) -> Path:
        path = folder / f"{name}-{color_scheme}.png"
        visit.page.screenshot(path=path, full_page=full_page, animations="disabled")
        return path

    return save
