"""What `make run` runs (ops/run.sh, then manage.py up) on a fresh data directory:
every service comes up and answers, the admin's printed password logs in and is
stored nowhere, the demo disk is a disk of this host, and Ctrl-C, or even
kill -9 of the launcher, leaves no process behind."""

import http.cookiejar
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from support.requirements import requirement_missing
from support.services import REPO

MiB = 1024 * 1024
READY_SECONDS = 240
STOP_SECONDS = 30


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


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


class Launcher:
    """ops/run.sh in a session of its own, as a terminal would run it."""

    def __init__(self, env: dict[str, str], output: Path):
        self.output_path = output
        with open(output, "wb") as sink:
            self.process = subprocess.Popen([str(REPO / "ops" / "run.sh")], env=env, cwd=REPO,
                                            stdin=subprocess.DEVNULL, stdout=sink,
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

    def wait_until_gone(self, processes: dict[int, str]) -> dict[int, str]:
        deadline = time.monotonic() + STOP_SECONDS
        while still_running(processes) and time.monotonic() < deadline:
            time.sleep(0.2)
        return still_running(processes)

    def kill_everything(self) -> None:
        for pid in [self.process.pid, *still_running(self.services)]:
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

    def start(data_dir: Path, **env) -> Launcher:
        # A Redis port where none answers: the launcher starts its own.
        base = {name: value for name, value in os.environ.items()
                if not name.startswith(("SECRET_KEY", "DATABASE_URL", "IMAGING_", "ADMIN_", "PYTEST_"))}
        launcher = Launcher(dict(base, DATA_DIR=str(data_dir), PORT=str(free_port()),
                                 REDIS_URL=f"redis://127.0.0.1:{free_port()}/0",
                                 HOST_NAME="maketest", **env),
                            tmp_path / f"make-run-{len(launchers)}.out")
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


def service_kinds(services: dict[int, str]) -> set[str]:
    kinds = set()
    for cmdline in services.values():
        for kind, mark in (("redis", "redis-server"), ("web", "uvicorn webui.asgi:application"),
                           ("worker", "celery -A webui worker"), ("beat", "celery -A webui beat")):
            if mark in cmdline:
                kinds.add(kind)
    return kinds


def test_first_run_serves_the_demo_disk_and_ctrl_c_stops_every_process(launch, tmp_path):
    data_dir = tmp_path / "data"
    launcher = launch(data_dir)
    launcher.wait_until_up()
    output = launcher.output()
    password = re.search(r"log in as admin, password (\S+)", output).group(1)
    assert service_kinds(launcher.services) == {"redis", "web", "worker", "beat"}

    base_url = launcher.url()
    browser = log_in(base_url, "admin", password)
    demo_disk = data_dir / "demo" / "demo-disk.img"
    assert demo_disk.stat().st_size == 512 * MiB
    disks = json.loads(browser.open(f"{base_url}/api/disks/", timeout=10).read())["results"]
    assert [(disk["host"], disk["size"]) for disk in disks if disk["path"] == str(demo_disk)] \
        == [("maketest", 512 * MiB)]

    # Only Django's hash of the password is kept; the secret key is root's alone.
    for path in data_dir.rglob("*"):
        if path.is_file() and path != demo_disk:
            assert password.encode() not in path.read_bytes(), path
    assert (data_dir / "secret_key").stat().st_mode & 0o777 == 0o600

    os.killpg(launcher.process.pid, signal.SIGINT)
    assert launcher.process.wait(STOP_SECONDS) == 0
    assert launcher.output().rstrip().endswith("stopped.")
    assert launcher.wait_until_gone(launcher.services) == {}


def test_kill_9_of_the_launcher_leaves_no_service_running(launch, tmp_path):
    data_dir = tmp_path / "data"
    # An existing demo disk is used as it is.
    (data_dir / "demo").mkdir(parents=True)
    with open(data_dir / "demo" / "demo-disk.img", "wb") as disk:
        disk.truncate(64 * MiB)
    launcher = launch(data_dir, ADMIN_PASSWORD="a-chosen-admin-password")
    launcher.wait_until_up()
    assert "log in as admin with the password in ADMIN_PASSWORD" in launcher.output()
    assert "a-chosen-admin-password" not in launcher.output()
    log_in(launcher.url(), "admin", "a-chosen-admin-password")
    assert service_kinds(launcher.services) == {"redis", "web", "worker", "beat"}

    launcher.process.kill()
    launcher.process.wait()
    assert launcher.wait_until_gone(launcher.services) == {}
