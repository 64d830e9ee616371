"""The wiring, all real: Redis, two worker processes with two host names, loop-device disks.

A backup taken by host A's worker is restored by host B's worker onto B's disk,
byte for byte; a message delivered twice runs its job once; a worker killed
with SIGKILL mid-backup leaves its job failed as "worker lost", not running.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import redis
from engine import MiB, write_random
from support.devices import loop_device, requires_loop
from support.services import wait_for

from webui import services, tasks
from webui.models import Disk, Host, Image, Job

LOST_WITHIN_SECONDS = 90


def finished(job_id: int, timeout: float, *workers) -> Job:
    return wait_for(lambda: Job.objects.filter(pk=job_id).exclude(
        state__in=Job.ACTIVE_STATES).first(), f"end of job #{job_id}", timeout, *workers)


def host_disk(host_name: str, device: str) -> Disk:
    """The disk the host's worker reported at start for the loop device."""
    return Disk.objects.get(host__name=host_name, path=device, present=True)


@pytest.fixture
def host_names(redis_url):
    """Host names of this run only: a stale message from an earlier run finds no worker.

    Their queues are dropped afterwards (first in a test's arguments, so after its
    workers stop), with the message a killed worker never acknowledged: kombu keeps
    it in Redis for the visibility timeout, then requeues it."""
    names = f"wire-a-{os.getpid()}", f"wire-b-{os.getpid()}"
    yield names
    queues = {f"host.{name}" for name in names}
    client = redis.Redis.from_url(redis_url)
    try:
        for tag, entry in client.hgetall("unacked").items():
            _message, _exchange, routing_key = json.loads(entry)
            if routing_key in queues:
                client.hdel("unacked", tag)
                client.zrem("unacked_index", tag)
        client.delete(*queues, *(f"_kombu.{kind}.{queue}" for queue in queues
                                 for kind in ("binding", "binding_permanent")))
    finally:
        client.close()


@pytest.fixture
def datastore(live_environment):
    return services.datastore_at(live_environment["IMAGING_DATASTORE"])


def test_a_backup_on_host_a_restores_onto_a_disk_of_host_b(host_names, celery_worker, datastore,
                                                           tmp_path):
    requires_loop()
    name_a, name_b = host_names
    write_random(tmp_path / "wire-a.img", 24 * MiB, seed=7)
    (tmp_path / "wire-b.img").write_bytes(b"\xee" * (32 * MiB))
    with loop_device(tmp_path / "wire-a.img") as device_a, \
            loop_device(tmp_path / "wire-b.img") as device_b:
        worker_a = celery_worker(name_a, disk_files=[device_a])
        worker_b = celery_worker(name_b, disk_files=[device_b])
        disk_a, disk_b = host_disk(name_a, device_a), host_disk(name_b, device_b)
        assert (disk_a.size, disk_b.size) == (24 * MiB, 32 * MiB)
        assert Host.objects.get(name=name_a).worker == worker_a.node_name
        # Started with --queues host.<name> only, each also consumes the control queue.
        assert ".> control " in worker_a.log() and ".> control " in worker_b.log()

        backup = services.start_backup(disk_a, mode="raw", datastore=datastore)
        backup = finished(backup.pk, 120, worker_a, worker_b)
        assert (backup.state, backup.host.name, backup.worker) == \
            (Job.State.SUCCEEDED, name_a, worker_a.node_name), backup.error
        image = Image.objects.get(disk=disk_a)

        restore = services.start_restore(image, disk_b.pk, disk_b.stable_id)
        restore = finished(restore.pk, 120, worker_a, worker_b)
        assert (restore.state, restore.host.name, restore.worker) == \
            (Job.State.SUCCEEDED, name_b, worker_b.node_name), restore.error
        with open(device_b, "rb") as written:
            restored = written.read(32 * MiB)
    assert restored[:24 * MiB] == (tmp_path / "wire-a.img").read_bytes()
    assert restored[24 * MiB:] == b"\xee" * (8 * MiB)  # beyond the image: left alone


def test_a_message_delivered_twice_runs_its_job_once(host_names, celery_worker, datastore,
                                                     tmp_path):
    requires_loop()
    name_a, _ = host_names
    write_random(tmp_path / "twice.img", 16 * MiB, seed=3)
    with loop_device(tmp_path / "twice.img") as device:
        worker = celery_worker(name_a, disk_files=[device], concurrency=2)
        disk = host_disk(name_a, device)
        job = services.start_backup(disk, mode="raw", datastore=datastore)
        tasks.run_job.apply_async(args=[job.pk], queue=Host.objects.get(name=name_a).queue)
        job = finished(job.pk, 120, worker)
        wait_for(lambda: worker.log().count("webui.tasks.run_job") >= 4,
                 "both deliveries received and done", 60, worker)
    assert job.state == Job.State.SUCCEEDED, job.error
    assert Image.objects.filter(disk=disk).count() == 1
    assert len(list((Path(datastore.path) / "images" / disk.stable_id).iterdir())) == 1


def test_a_worker_killed_mid_backup_leaves_its_job_failed_as_worker_lost(
        host_names, celery_worker, datastore, tmp_path):
    requires_loop()
    name_a, _ = host_names
    with open(tmp_path / "long.img", "wb") as sparse:
        sparse.truncate(64 * 1024 * MiB)  # long to read, no room taken
    with loop_device(tmp_path / "long.img") as device:
        doomed = celery_worker(name_a, disk_files=[device])
        job = services.start_backup(host_disk(name_a, device), mode="raw", datastore=datastore)
        wait_for(lambda: Job.objects.get(pk=job.pk).state == Job.State.RUNNING,
                 "the backup running", 60, doomed)
        time.sleep(2)
        doomed.kill_hard()
        killed = time.monotonic()
        # Beat's part, every few seconds: the sweeper (here, not on the control queue,
        # which any other worker on this Redis may consume).
        while Job.objects.get(pk=job.pk).state == Job.State.RUNNING:
            assert time.monotonic() - killed < LOST_WITHIN_SECONDS
            services.check_jobs()
            time.sleep(5)
        lost_after = time.monotonic() - killed
    job.refresh_from_db()
    assert (job.state, job.error, job.worker) == (Job.State.FAILED, "worker lost", doomed.node_name)
    assert lost_after < LOST_WITHIN_SECONDS
    assert Image.objects.filter(disk__path=device).count() == 0
