"""A dead worker is noticed: its job fails as "worker lost" within two minutes, someone is told,
the dashboard answers all along, and the next backup runs.

Under make run, which starts a killed worker again; and with web, beat and the worker each run
by hand (as systemd units run them), where nothing brings the worker back and beat's own sweep
must fail its job. The worker is killed with SIGKILL in the middle of a backup of a disk that
takes minutes to read (a sparse 64 GiB file).
"""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import threading
import time

from pathlib import Path

import pytest
from support.launch import ApiClient, service_pids
from support.launch import launch  # noqa: F401 (a fixture)
from support.requirements import requirement_missing
from support.webhook import Webhook

from webui import launcher as services_launcher
from webui.testing import REPO, RedisServer, free_port

MiB = 1024 * 1024
LOST_WITHIN_SECONDS = 120


@pytest.fixture
def webhook():
    hook = Webhook()
    yield hook
    hook.close()


@pytest.fixture
def disks(tmp_path):
    long_disk, small_disk = tmp_path / "long.img", tmp_path / "small.img"
    with open(long_disk, "wb") as sparse:
        sparse.truncate(64 * 1024 * MiB)  # minutes to read, no room taken
    small_disk.write_bytes(os.urandom(4 * MiB) + bytes(4 * MiB))
    return long_disk, small_disk


class Watch:
    """GET /api/hosts/ twice a second in a thread: every answer's status, or the error."""

    def __init__(self, api: ApiClient):
        self.api, self.answers = api, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.wait(0.5):
            try:
                self.answers.append(self.api.call("GET", "/api/hosts/")[0])
            except OSError as error:
                self.answers.append(f"{type(error).__name__}: {error}")

    def stop(self) -> list:
        self._stop.set()
        self._thread.join()
        return self.answers


def kill_mid_backup(api: ApiClient, disk: dict, worker_pid: int) -> tuple[dict, float, list]:
    """Start a backup of `disk`, SIGKILL the worker once it runs; the job once it stopped
    running, the seconds that took, and the dashboard's answers meanwhile."""
    job = api.start(f"/api/disks/{disk['id']}/backup/", {"mode": "raw"})
    api.job_when(job, lambda found: found["state"] == "running" and found["progress"]["done"] > 0,
                 120)
    watch = Watch(api)
    os.kill(worker_pid, signal.SIGKILL)
    killed = time.monotonic()
    try:
        lost = api.job_when(job, lambda found: found["state"] != "running", LOST_WITHIN_SECONDS)
    finally:
        answers = watch.stop()
    return lost, time.monotonic() - killed, answers


def backs_up_again(api: ApiClient, held: Path, other: Path) -> None:
    """The disk the lost job held takes a backup again (then cancelled: minutes to read), and
    another runs to its end."""
    job = api.start(f"/api/disks/{api.disk(held)['id']}/backup/", {"mode": "raw"})
    assert api.call("POST", f"/api/jobs/{job}/cancel/", {})[0] == 202
    assert api.finished(job)["state"] == "cancelled"
    backup = api.finished(api.start(f"/api/disks/{api.disk(other)['id']}/backup/",
                                    {"mode": "raw"}))
    assert (backup["state"], backup["error"]) == ("succeeded", "")


def told(hook: Webhook, job: int, timeout: float = 30) -> list[dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        messages = [message for message in hook.received if f"#{job} " in message.get("title", "")]
        if messages:
            return messages
        time.sleep(0.5)
    return []


def test_under_make_run_a_killed_worker_is_started_again_and_its_job_fails_as_lost(
        launch, tmp_path, webhook, disks):
    long_disk, small_disk = disks
    launcher = launch(tmp_path / "data", "--no-demo-disk", NOTIFY_URLS=webhook.url,
                      IMAGING_DISK_FILES=f"{long_disk}:{small_disk}")
    launcher.wait_until_up()
    api = ApiClient(launcher.url(), launcher.api_token())
    [worker] = service_pids(launcher.current_services(), "worker")

    lost, seconds, answers = kill_mid_backup(api, api.disk(long_disk), worker)

    assert (lost["state"], lost["error"]) == ("failed", "worker lost")
    assert seconds < LOST_WITHIN_SECONDS
    assert [message["title"] for message in told(webhook, lost["id"])] == \
        [f"Backup job #{lost['id']} maketest:{long_disk} failed"]
    assert answers and set(answers) == {200}, answers
    assert "worker exited with status -9" in launcher.output()
    [restarted] = service_pids(launcher.current_services(), "worker")
    assert restarted != worker
    backs_up_again(api, long_disk, small_disk)


@pytest.fixture
def by_hand(tmp_path, disks, webhook):
    """Redis, web, beat and a worker, each started alone with the launcher's command line, as
    systemd units start them: nothing restarts anything."""
    if os.geteuid() != 0:
        requirement_missing("the worker reads disks: root is needed")
    data_dir = tmp_path / "data"
    redis_server = RedisServer(tmp_path / "redis", tmp_path / "redis.log", persistent=True)
    port = free_port()
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("SECRET_KEY", "DATABASE_URL", "IMAGING_", "PYTEST_", "DJANGO_"))}
    env.update(DATA_DIR=str(data_dir), REDIS_URL=redis_server.url, PORT=str(port),
               HOST_NAME="byhand", NOTIFY_URLS=webhook.url, PYTHONUNBUFFERED="1",
               IMAGING_DISK_FILES=":".join(map(str, disks)),
               DJANGO_SUPERUSER_PASSWORD=secrets.token_urlsafe(12))
    for step in (["migrate", "--noinput"], ["collectstatic", "--noinput"],
                 ["createsuperuser", "--noinput", "--username", "admin", "--email", ""]):
        done = subprocess.run([sys.executable, "manage.py", *step], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
    started = {}

    def start(name: str) -> services_launcher.ServiceProcess:
        service = services_launcher.ServiceProcess(
            name, [sys.executable, "manage.py", "serve", "--exec", name, "--bind", "127.0.0.1"],
            env, tmp_path / f"{name}.log")
        started.setdefault(name, []).append(service)
        return service

    try:
        web, beat, worker = start("web"), start("beat"), start("worker")
        web.wait_until(lambda: services_launcher.http_answers("127.0.0.1", port), "answering", 60)
        beat.wait_until(lambda: services_launcher.BEAT_READY_LINE in beat.log(), "ready", 60)
        worker.wait_until(lambda: services_launcher.worker_ready_line("byhand") in worker.log(),
                          "ready", 60)
        token = subprocess.run([sys.executable, "manage.py", "drf_create_token", "admin"],
                               cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
        yield ApiClient(f"http://127.0.0.1:{port}", token.stdout.split()[2]), start, worker
    finally:
        for services in started.values():
            for service in services:
                service.stop()
        redis_server.stop()


def test_with_the_services_run_by_hand_beat_fails_the_lost_job_and_tells(by_hand, disks,
                                                                          webhook):
    api, start, worker = by_hand
    long_disk, small_disk = disks

    lost, seconds, answers = kill_mid_backup(api, api.disk(long_disk), worker.pid)

    assert (lost["state"], lost["error"]) == ("failed", "worker lost")
    assert seconds < LOST_WITHIN_SECONDS
    assert [message["title"] for message in told(webhook, lost["id"])] == \
        [f"Backup job #{lost['id']} byhand:{long_disk} failed"]
    assert answers and set(answers) == {200}, answers
    # Back by hand, the worker runs the next backup of the disk its dead predecessor held.
    again = start("worker")
    again.wait_until(lambda: services_launcher.worker_ready_line("byhand") in again.log(),
                     "ready", 60)
    backs_up_again(api, long_disk, small_disk)
