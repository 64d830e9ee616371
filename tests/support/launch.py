"""`make run` (ops/run.sh, then manage.py up) as a terminal would run it, and what it started.

`launch(data_dir, *arguments, **env)`, the fixture, starts ops/run.sh in a
session of its own with a fresh port, its own Redis (a free port, a password)
and HOST_NAME "maketest" unless given; every launcher it started, and every service each
started, is killed at teardown, also when the test fails.
"""

from __future__ import annotations

import http.cookiejar
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from webui.testing import REPO, free_port

from .requirements import requirement_missing

READY_SECONDS = 240
STOP_SECONDS = 30
SERVICE_MARKS = {"redis": "redis-server", "web": "uvicorn webui.asgi:application",
                 "worker": "celery -A webui worker", "beat": "celery -A webui beat"}


def process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) of every live process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
        except OSError:
            continue
        state, parent = stat.rsplit(")", 1)[1].split()[:2]
        if state != "Z":
            table[int(entry.name)] = (int(parent), cmdline)
    return table


def descendants(pid: int) -> dict[int, str]:
    table = process_table()
    found, frontier = {}, [pid]
    while frontier:
        parent = frontier.pop()
        for child, (child_parent, cmdline) in table.items():
            if child_parent == parent and child not in found:
                found[child] = cmdline
                frontier.append(child)
    return found


def still_running(processes: dict[int, str]) -> dict[int, str]:
    table = process_table()
    return {pid: cmdline for pid, cmdline in processes.items()
            if pid in table and table[pid][1] == cmdline}


def service_kinds(services: dict[int, str]) -> set[str]:
    return {kind for cmdline in services.values() for kind, mark in SERVICE_MARKS.items()
            if mark in cmdline}


def service_pids(services: dict[int, str], kind: str) -> list[int]:
    return [pid for pid, cmdline in services.items() if SERVICE_MARKS[kind] in cmdline]


class Launcher:
    """ops/run.sh in a session of its own, as a terminal would run it."""

    def __init__(self, env: dict[str, str], output: Path, arguments: list[str]):
        self.env = env
        self.output_path = output
        with open(output, "wb") as sink:
            self.process = subprocess.Popen([str(REPO / "ops" / "run.sh"), *arguments], env=env,
                                            cwd=REPO, stdin=subprocess.DEVNULL, stdout=sink,
                                            stderr=subprocess.STDOUT, start_new_session=True)
        self.services: dict[int, str] = {}

    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def url(self) -> str:
        found = re.search(r"The dashboard is up: (http://127\.0\.0\.1:\d+)/", self.output())
        assert found, self.output()
        return found.group(1)

    def wait_until_up(self) -> None:
        deadline = time.monotonic() + READY_SECONDS
        while "Ctrl-C stops them all." not in self.output():
            assert self.process.poll() is None, f"make run exited early:\n{self.output()}"
            assert time.monotonic() < deadline, f"make run not up in {READY_SECONDS} s:\n{self.output()}"
            time.sleep(0.5)
        self.services = descendants(self.process.pid)

    def current_services(self) -> dict[int, str]:
        return descendants(self.process.pid)

    def manage(self, *arguments: str, input: str | None = None) -> subprocess.CompletedProcess:
        """`manage.py ...` typed by hand in the repository, with the launcher's DATA_DIR."""
        env = {name: value for name, value in self.env.items() if name != "PYTHONUNBUFFERED"}
        return subprocess.run([sys.executable, "manage.py", *arguments], cwd=REPO, env=env,
                              input=input, capture_output=True, text=True, timeout=120)

    def api_token(self, username: str = "admin") -> str:
        created = self.manage("drf_create_token", username)
        assert created.returncode == 0, created.stderr
        return re.fullmatch(r"Generated token (\S+) for user \S+\n", created.stdout).group(1)

    def wait_until_gone(self, processes: dict[int, str]) -> dict[int, str]:
        deadline = time.monotonic() + STOP_SECONDS
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        return still_running(processes)

    def kill_everything(self) -> None:
        for pid in [self.process.pid, *still_running({**self.services, **self.current_services()})]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.process.wait()


@pytest.fixture
def launch(tmp_path):
    if os.geteuid() != 0:
        requirement_missing("make run needs root: the demo disk and the worker use loop devices and disks")
    if shutil.which("redis-server") is None:
        requirement_missing("redis-server is not installed (make install)")
    launchers = []

    def start(data_dir: Path, *arguments: str, **env) -> Launcher:
        base = {name: value for name, value in os.environ.items()
                if not name.startswith(("SECRET_KEY", "DATABASE_URL", "IMAGING_", "ADMIN_", "PYTEST_",
                                        "REDIS_URL", "DJANGO_"))}
        # A port where no Redis answers, with a password: the launcher starts its own.
        # REDIS_URL=None: none given, as a user gives none (its own password, on its own port).
        env = {"REDIS_URL": f"redis://:{secrets.token_hex(8)}@127.0.0.1:{free_port()}/0",
               "HOST_NAME": "maketest", **env}
        env = {name: value for name, value in env.items() if value is not None}
        launcher = Launcher(dict(base, DATA_DIR=str(data_dir), PORT=str(free_port()), **env),
                            tmp_path / f"make-run-{len(launchers)}.out", list(arguments))
        launchers.append(launcher)
        return launcher

    try:
        yield start
    finally:
        for launcher in launchers:
            launcher.kill_everything()


def log_in(base_url: str, username: str, password: str) -> urllib.request.OpenerDirector:
    browser = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(http.cookiejar.CookieJar()))
    login_url = f"{base_url}/admin/login/?next=/admin/"
    page = browser.open(login_url, timeout=10).read().decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page).group(1)
    form = urllib.parse.urlencode({"username": username, "password": password,
                                   "csrfmiddlewaretoken": token, "next": "/admin/"}).encode()
    response = browser.open(urllib.request.Request(login_url, data=form), timeout=10)
    assert urllib.parse.urlsplit(response.url).path == "/admin/", "the login was refused"
    return browser


class ApiClient:
    """The JSON API of a running server, as a program with a token uses it."""

    def __init__(self, base_url: str, token: str):
        self.base_url = base_url
        self.headers = {"Authorization": f"Token {token}", "Content-Type": "application/json"}

    def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        request = urllib.request.Request(
            f"{self.base_url}{path}", method=method, headers=self.headers,
            data=None if body is None else json.dumps(body).encode())
        try:
            with urllib.request.urlopen(request, timeout=15) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as error:
            return error.code, json.loads(error.read() or b"null")

    def get(self, path: str) -> dict:
        status, body = self.call("GET", path)
        assert status == 200, (path, status, body)
        return body

    def start(self, path: str, body: dict | None = None) -> int:
        """POST that starts a job: its id."""
        status, answer = self.call("POST", path, body or {})
        assert status == 202, (path, status, answer)
        return answer["job"]

    def disk(self, path: str, timeout: float = 120) -> dict:
        """The present disk seen at `path`, once its host has reported it."""
        deadline = time.monotonic() + timeout
        while True:
            found = [disk for disk in self.get("/api/disks/")["results"]
                     if disk["path"] == str(path) and disk["present"]]
            if found:
                return found[0]
            assert time.monotonic() < deadline, f"no disk at {path} after {timeout} s"
            time.sleep(1)

    def job_when(self, job: int, done, timeout: float) -> dict:
        """The job once done(job) holds."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.get(f"/api/jobs/{job}/")
            if done(found):
                return found
            assert time.monotonic() < deadline, f"job {job} still {found['state']} after {timeout} s"
            time.sleep(0.5)

    def finished(self, job: int, timeout: float = 300) -> dict:
        return self.job_when(job, lambda found: found["state"] not in ("queued", "running"),
                             timeout)
