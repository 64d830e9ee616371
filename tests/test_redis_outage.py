"""Redis going away (the Celery broker, the channel layer, the cache): no job is orphaned and
no worker dies of it.

A job whose message Redis does not take is failed at once and frees its disk; its
request is answered 503 (the API) or with a message on the page (forms), within
seconds even when Redis hangs; a scheduled run that cannot start is notified. A
worker rides out a Redis restart, idle or with a job running, and runs the jobs sent
after it. A queued job whose message a restarted Redis lost is sent again.

Each test has a private Redis (webui.testing.RedisServer, nothing kept across a
restart); the live server and workers, or the test process's own Celery app, are
pointed at it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import tempfile
import time
from pathlib import Path

import pytest
import redis
import requests
from django.conf import settings
from django.contrib.auth.models import User
from django.test import TransactionTestCase, override_settings
from django.utils import timezone
from engine import MiB, write_random
from support.devices import fuse_unavailable_reason
from support.faulty import faulty_file
from support.requirements import requirement_missing
from support.services import wait_for
from support.web import MEMORY_LAYER, PLAIN_STATIC, LabMixin
from test_web_notifications import Webhook

from webui import services
from webui.api.authentication import new_token
from webui.celery import app
from webui.models import Disk, Image, Job, Schedule
from webui.testing import RedisServer

DISK_SIZE = 16 * MiB
# What sending a job may cost when Redis does not answer at all: the broker's socket timeouts
# (two attempts of 3 s). A whole request also meets the cache's and the channel layer's own
# timeouts (1 s and 2 s a call, a few calls).
HUNG_BROKER_SECONDS = 10
HUNG_REDIS_SECONDS = 30
UNRECOVERABLE = "Unrecoverable error"
# How long a task may take to be acknowledged once its job is finished.
ACK_SECONDS = 10


def finished(job_id: int, timeout: float, *processes) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id).exclude(
        state__in=Job.ACTIVE_STATES).first(), f"the end of job #{job_id}", timeout, *processes)


@contextlib.contextmanager
def broker_at(url: str):
    """The test process's own Celery app sends its messages to `url` meanwhile."""
    before = app.conf.broker_url

    def switch(to: str) -> None:
        app.conf.broker_url = to
        # Celery keeps the producer pool it made for the first URL it sent to.
        app.amqp._producer_pool = None

    switch(url)
    try:
        yield
    finally:
        switch(before)


@contextlib.contextmanager
def hung(server: RedisServer):
    """Redis stopped in its tracks (SIGSTOP): connections are accepted, nothing answers."""
    os.kill(server.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(server.pid, signal.SIGCONT)


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


# --- a job that cannot be sent: the test process sends, to a stopped Redis -----------------

@override_settings(CHANNEL_LAYERS=MEMORY_LAYER, STORAGES=PLAIN_STATIC)
class UnsentJobTests(LabMixin, TransactionTestCase):
    """Committed rows (the job is sent once its row is committed), Redis stopped."""

    def setUp(self):
        self.create_lab()
        folder = Path(self.enterContext(tempfile.TemporaryDirectory()))
        self.redis = RedisServer(folder, folder / "redis.log")
        self.addCleanup(self.redis.stop)
        self.redis.stop()
        self.enterContext(broker_at(self.redis.url))

    def post_backup(self, disk: Disk):
        self.client.force_login(self.alice)
        return self.client.post(f"/api/disks/{disk.pk}/backup/", {"mode": "raw"},
                                content_type="application/json")

    def assert_unavailable(self, response):
        self.assertEqual(response.status_code, 503, response.content)
        self.assertEqual(list(response.json()), ["detail"])
        detail = response.json()["detail"]
        job = Job.objects.latest("pk")
        self.assertRegex(detail, rf"^job #{job.pk} was not started: the job queue \(Redis\) did "
                                 r"not take it \(.*Connection refused.*\); try again once Redis "
                                 r"is back$")
        self.assertEqual(response["Retry-After"], "30")
        return job

    def test_a_backup_asked_while_redis_is_down_is_answered_503_failed_and_frees_its_disk(self):
        job = self.assert_unavailable(self.post_backup(self.d1))
        self.assertEqual((job.kind, job.disk, job.state),
                         ("backup", self.d1, Job.State.FAILED))
        self.assertTrue(job.error.startswith("not started: the job queue (Redis) did not take it: "),
                        job.error)
        self.assertIsNotNone(job.finished)
        # Not "busy with backup job #1": that job holds the disk no more.
        again = self.assert_unavailable(self.post_backup(self.d1))
        self.assertNotEqual(again.pk, job.pk)
        self.assertFalse(Job.objects.filter(state__in=Job.ACTIVE_STATES).exists())

    def test_a_restore_and_a_verify_are_answered_503_too(self):
        image = self.make_image(disk=self.d1, size=self.d2.size // 2)
        self.client.force_login(self.alice)
        restore = self.client.post(f"/api/images/{image.pk}/restore/",
                                   {"target_disk": self.d2.pk, "confirm": self.d2.stable_id},
                                   content_type="application/json")
        self.assertEqual(self.assert_unavailable(restore).target_disk, self.d2)
        verify = self.client.post(f"/api/images/{image.pk}/verify/", {},
                                  content_type="application/json")
        self.assertEqual(self.assert_unavailable(verify).kind, "verify")
        self.assertFalse(Job.objects.filter(state__in=Job.ACTIVE_STATES).exists())

    def test_a_form_that_starts_a_job_says_why_on_its_page(self):
        self.client.force_login(self.alice)
        response = self.client.post(f"/datastores/{self.datastore.pk}/gc/", follow=True)
        self.assertEqual(response.status_code, 200)
        job = Job.objects.get()
        self.assertEqual((job.kind, job.state), ("gc", Job.State.FAILED))
        shown = [str(message) for message in response.context["messages"]]
        self.assertEqual(shown, [f"No garbage collection: job #{job.pk} was not started: the job "
                                 f"queue (Redis) did not take it ({job.error.split('it: ')[1]}); "
                                 f"try again once Redis is back"])
        self.assertContains(response, f"No garbage collection: job #{job.pk} was not started")

    def test_a_scheduled_backup_that_cannot_be_sent_is_failed_and_notified(self):
        hook = Webhook()
        self.addCleanup(hook.close)
        with override_settings(NOTIFY_URLS=[hook.url]):
            self.assertEqual(services.run_schedule(self.schedule.pk), [])
        job = Job.objects.get()
        self.assertEqual((job.kind, job.schedule, job.state),
                         ("backup", self.schedule, Job.State.FAILED))
        [message] = [message for message in hook.received if message["title"].endswith("failed")]
        self.assertEqual(message["title"], f"Backup job #{job.pk} {self.d1} failed")
        self.assertIn("not started: the job queue (Redis) did not take it", message["message"])

    def test_a_prune_that_cannot_be_sent_leaves_the_backup_before_it_succeeded(self):
        Schedule.objects.filter(pk=self.schedule.pk).update(keep_last=3)
        # No datastore: finish_job reads no catalog, which this lab's folder is not.
        backup = services.claim_job(self.make_job(schedule=self.schedule, datastore=None).pk,
                                    "h1@node")
        with override_settings(NOTIFY_URLS=[]):
            done = services.finish_job(backup, {"bytes_read": 1})
        self.assertEqual(done.state, Job.State.SUCCEEDED, done.error)
        prune = Job.objects.get(kind="prune")
        self.assertEqual((prune.schedule, prune.state), (self.schedule, Job.State.FAILED))

    def test_a_hung_redis_costs_a_request_seconds_not_the_request(self):
        self.redis.start()
        with hung(self.redis):
            started = time.monotonic()
            response = self.post_backup(self.d1)
            took = time.monotonic() - started
        self.assertEqual(response.status_code, 503, response.content)
        self.assertIn("Timeout", response.json()["detail"])
        self.assertLess(took, HUNG_BROKER_SECONDS)
        print(f"a backup request against a hung Redis: 503 after {took:.1f} s")


# --- all real: the live server and workers on a private Redis, stopped or restarted --------

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


def assert_alive(worker, restarts: int) -> None:
    """Alive, with no unrecoverable error, and cut off from Redis once for each time Redis
    went away: the broker's socket timeouts cut no connection that was only quiet."""
    assert worker.alive(), worker.log_tail(80)
    assert UNRECOVERABLE not in worker.log(), worker.log_tail(80)
    assert worker.log().count("Connection to broker lost") == restarts, worker.log_tail(80)


def test_a_backup_asked_while_redis_is_stopped_is_refused_then_runs_once_it_is_back(
        private_redis, live_server_process, celery_worker, token, disk_image):
    worker = celery_worker(f"outage-{os.getpid()}", disk_files=[disk_image])
    disk = inventoried(disk_image, worker)
    private_redis.stop()
    started = time.monotonic()
    refused = post_backup(live_server_process, token, disk)
    took = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "30"
    failed = Job.objects.get()
    assert refused.json() == {"detail": f"job #{failed.pk} was not started: the job queue (Redis) "
                                        f"did not take it ({failed.error.split('it: ')[1]}); try "
                                        f"again once Redis is back"}
    assert (failed.state, failed.disk) == (Job.State.FAILED, disk)
    assert not Job.objects.filter(state__in=Job.ACTIVE_STATES).exists()
    assert took < HUNG_REDIS_SECONDS

    private_redis.start()
    accepted = post_backup(live_server_process, token, disk)
    assert accepted.status_code == 202, accepted.text
    job = finished(accepted.json()["job"], 120, worker, live_server_process)
    assert (job.state, job.worker) == (Job.State.SUCCEEDED, worker.node_name), job.error
    assert Image.objects.get(disk=disk).size == DISK_SIZE
    assert_alive(worker, restarts=1)


def test_a_hung_redis_costs_a_backup_request_seconds(private_redis, live_server_process,
                                                     celery_worker, token, disk_image):
    worker = celery_worker(f"hung-{os.getpid()}", disk_files=[disk_image])
    disk = inventoried(disk_image, worker)
    with hung(private_redis):
        started = time.monotonic()
        refused = post_backup(live_server_process, token, disk)
        took = time.monotonic() - started
    assert refused.status_code == 503, refused.text
    assert Job.objects.get().state == Job.State.FAILED
    assert took < HUNG_REDIS_SECONDS
    print(f"a backup request to the live server against a hung Redis: 503 after {took:.1f} s")


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
    assert_alive(worker, restarts=1)


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
        assert_alive(worker, restarts=1)

        after = post_backup(live_server_process, token, disk)
        assert after.status_code == 202, after.text
        next_job = finished(after.json()["job"], 120, worker, live_server_process)
        assert next_job.state == Job.State.SUCCEEDED, next_job.error
    assert Image.objects.filter(disk=disk).count() == 2
    assert_alive(worker, restarts=1)
    # Every message acknowledged, the running job's too (kept across the restart, if Redis
    # kept its data): none is redelivered when the visibility timeout runs out. A task is
    # acknowledged once it returns, a moment after its job's row is finished.
    kept = redis.Redis.from_url(private_redis.url)
    try:
        wait_for(lambda: kept.hlen("unacked") == 0 or None, "every message acknowledged",
                 ACK_SECONDS, worker)
    finally:
        kept.close()


def test_a_queued_job_whose_message_a_restarted_redis_lost_is_sent_again(
        private_redis, live_environment, celery_worker, disk_image):
    host = f"lost-{os.getpid()}"
    first = celery_worker(host, disk_files=[disk_image])
    disk = inventoried(disk_image, first)
    first.stop()  # the host's jobs wait in its queue
    later = timezone.now() + services.delivery.LOST_AFTER + dt.timedelta(seconds=1)
    queue = disk.host.queue
    queued = redis.Redis.from_url(private_redis.url)
    try:
        with broker_at(private_redis.url):
            job = services.start_backup(disk, mode="raw", datastore=services.datastore_at(
                live_environment["IMAGING_DATASTORE"]))
            assert queued.llen(queue) == 1
            assert services.resend_lost_jobs(now=later) == 0  # it waits in the queue
            private_redis.stop()
            private_redis.start()
            assert queued.llen(queue) == 0
            assert services.resend_lost_jobs(now=later) == 1
            assert queued.llen(queue) == 1
            assert services.resend_lost_jobs(now=later) == 0
    finally:
        queued.close()
    worker = celery_worker(host, disk_files=[disk_image])
    job = finished(job.pk, 120, worker)
    assert job.state == Job.State.SUCCEEDED, job.error
