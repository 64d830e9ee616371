"""Redis going away (the Celery broker, the channel layer, the cache): no worker dies of it.

A worker rides out a Redis restart, idle or with a job running, and runs the jobs
sent after it.

Each test has a private Redis (webui.testing.RedisServer, nothing kept across a
restart); the live server and workers are pointed at it.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.contrib.auth.models import User
from django.utils import timezone
from engine import MiB, write_random
from support.devices import fuse_unavailable_reason
from support.faulty import faulty_file
from support.requirements import requirement_missing

from webui.api.authentication import new_token
from webui.models import Disk, Image, Job
from webui.testing import RedisServer

DISK_SIZE = 16 * MiB
UNRECOVERABLE = "Unrecoverable error"


def wait_for(condition, what, timeout, *processes):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {p.name}\n{p.log()[-4000:]}" for p in processes)
            pytest.fail(f"no {what} after {timeout:.0f} s\n{logs}", pytrace=False)
        time.sleep(0.2)
    return value


def finished(job_id: int, timeout: float, *processes) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id).exclude(
        state__in=Job.ACTIVE_STATES).first(), f"the end of job #{job_id}", timeout, *processes)


@contextlib.contextmanager
def reads_held(exposed_file: Path):
    """Every read of a faulty_file waits meanwhile: its FUSE server is stopped (SIGSTOP)."""
    mountpoint = str(exposed_file.parent)
    server = None
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().decode(errors="replace").split("\0")[:-1]
        except OSError:
            continue
        if argv and "faulty_disk" in argv[0] and argv[-1] == mountpoint:
            server = int(cmdline.parent.name)
    assert server is not None, f"no faulty_disk process serves {mountpoint}"
    os.kill(server, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server, signal.SIGCONT)


@pytest.fixture
def private_redis(request, tmp_path, live_environment):
    """A Redis of this test only, which the live server and workers it starts use; it keeps
    its data across a restart when the test's parameter says so."""
    server = RedisServer(tmp_path, tmp_path / "redis.log",
                         persistent=getattr(request, "param", False))
    live_environment["REDIS_URL"] = server.url
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def token():
    alice = User.objects.create_user("alice", password="outage-password-1", is_staff=True)
    return new_token(alice)


@pytest.fixture
def disk_image(tmp_path) -> Path:
    path = tmp_path / "disk.img"
    write_random(path, DISK_SIZE, seed=11)
    return path


def post_backup(server, token: str, disk: Disk) -> requests.Response:
    return requests.post(f"{server.url}/api/disks/{disk.pk}/backup/", json={"mode": "raw"},
                         headers={"Authorization": f"Token {token}"}, timeout=60)


def inventoried(path: Path, worker) -> Disk:
    return wait_for(lambda: Disk.objects.filter(path=str(path), present=True).first(),
                    "the disk file in the worker's inventory", 30, worker)


def assert_alive(worker) -> None:
    assert worker.alive(), worker.log_tail(80)
    assert UNRECOVERABLE not in worker.log(), worker.log_tail(80)


def test_an_idle_worker_rides_out_a_redis_restart_and_runs_the_next_job(
        private_redis, live_server_process, celery_worker, token, disk_image):
    worker = celery_worker(f"idle-{os.getpid()}", disk_files=[disk_image])
    disk = inventoried(disk_image, worker)
    private_redis.stop()
    wait_for(lambda: "Connection to broker lost" in worker.log(), "the worker noticing", 30, worker)
    private_redis.start()
    accepted = post_backup(live_server_process, token, disk)
    assert accepted.status_code == 202, accepted.text
    job = finished(accepted.json()["job"], 120, worker, live_server_process)
    assert job.state == Job.State.SUCCEEDED, job.error
    assert_alive(worker)


@pytest.mark.parametrize("private_redis", [False, True], ids=["redis-emptied", "redis-kept"],
                         indirect=True)
def test_a_job_running_across_a_redis_restart_succeeds_and_its_worker_runs_the_next(
        private_redis, live_server_process, celery_worker, token, disk_image, tmp_path):
    if reason := fuse_unavailable_reason():
        requirement_missing(reason)
    with faulty_file(disk_image, [], tmp_path) as slow_disk:
        worker = celery_worker(f"running-{os.getpid()}", disk_files=[slow_disk])
        disk = inventoried(slow_disk, worker)
        with reads_held(slow_disk):
            accepted = post_backup(live_server_process, token, disk)
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job"]
            wait_for(lambda: Job.objects.filter(pk=job_id, state=Job.State.RUNNING).exists(),
                     "the backup running", 60, worker)
            private_redis.stop()
            wait_for(lambda: "Connection to broker lost" in worker.log(), "the worker noticing",
                     30, worker)
            private_redis.start()
            wait_for(lambda: worker.log().count("Connected to ") >= 2, "the worker back on Redis",
                     60, worker)
            back = timezone.now()
            # Its heartbeat went on: check_jobs does not take it for lost.
            wait_for(lambda: Job.objects.get(pk=job_id).heartbeat_at > back,
                     "a heartbeat after the restart", 3 * settings.JOB_HEARTBEAT_SECONDS, worker)
            assert Job.objects.get(pk=job_id).state == Job.State.RUNNING
        job = finished(job_id, 120, worker, live_server_process)
        assert (job.state, job.worker) == (Job.State.SUCCEEDED, worker.node_name), job.error
        assert job.progress["done"] == DISK_SIZE
        assert_alive(worker)

        after = post_backup(live_server_process, token, disk)
        assert after.status_code == 202, after.text
        next_job = finished(after.json()["job"], 120, worker, live_server_process)
        assert next_job.state == Job.State.SUCCEEDED, next_job.error
    assert Image.objects.filter(disk=disk).count() == 2
    assert_alive(worker)
    # Every message acknowledged, the running job's too (kept across the restart, if Redis
    # kept its data): none is redelivered when the visibility timeout runs out.
    kept = redis.Redis.from_url(private_redis.url)
    try:
        assert kept.hlen("unacked") == 0
    finally:
        kept.close()
