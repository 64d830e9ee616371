"""A backup job reads the disk it names, or nothing: the engine checks the path's identity.

The catalog learns where a disk is from the inventory, every minute; meanwhile a
USB disk unplugged and another plugged in may take its /dev/sdX. Here a loop
device plays it: its identity is its backing file's name, and renaming that file
makes /dev/loopN another disk, at once and with no free loop device to race for.
"""
from __future__ import annotations

import time
from pathlib import Path

import pytest
from engine import MiB, write_random
from support.devices import loop_device, requires_loop

import imaging.backup
from imaging.base.errors import SourceError
from webui import services
from webui.models import Disk, Image, Job


def finished(job_id: int, worker, timeout: float = 120) -> Job:
    deadline = time.monotonic() + timeout
    while (job := Job.objects.get(pk=job_id)).state in Job.ACTIVE_STATES:
        if time.monotonic() > deadline:
            pytest.fail(f"job #{job_id} still {job.state} after {timeout:.0f} s\n"
                        f"{worker.log()[-3000:]}", pytrace=False)
        time.sleep(0.2)
    return job


def image_files(store: Path) -> list[str]:
    images = store / "images"
    return sorted(str(path.relative_to(store)) for path in images.rglob("*")) \
        if images.exists() else []


def test_the_engine_refuses_a_disk_that_is_not_the_expected_one_before_writing(
        disk_factory, tmp_path, monkeypatch):
    monkeypatch.setenv("HOST_NAME", "h1")
    disk = disk_factory("usb-a.img", 8 * MiB)
    store = tmp_path / "store"
    with loop_device(disk.path) as device:
        with pytest.raises(SourceError) as refused:
            imaging.backup.backup(device, store, expected_id="loop-h1-usb-b.img")
        assert not store.exists()
        result = imaging.backup.backup(device, store, expected_id="loop-h1-usb-a.img")
    assert str(refused.value) == (f"{device} is disk loop-h1-usb-a.img now, not the expected "
                                  "loop-h1-usb-b.img: nothing was read")
    assert result.image.parent.name == "loop-h1-usb-a.img"


def test_a_backup_job_whose_disk_path_now_holds_another_disk_fails_and_files_nothing(
        celery_worker, host_name, live_environment, tmp_path):
    requires_loop()
    store = Path(live_environment["IMAGING_DATASTORE"])
    datastore = services.datastore_at(store)
    usb_a = tmp_path / "usb-a.img"
    write_random(usb_a, 8 * MiB, seed=5)
    with loop_device(usb_a) as device:
        # No inventory during the test: the catalog keeps the path it was told.
        worker = celery_worker(host_name, disk_files=[device],
                               env={"INVENTORY_INTERVAL_SECONDS": "3600"})
        disk_a = Disk.objects.get(host__name=host_name, path=device)
        assert disk_a.stable_id == f"loop-{host_name}-usb-a.img"
        first = finished(services.start_backup(disk_a, mode="raw", datastore=datastore).pk, worker)
        assert first.state == Job.State.SUCCEEDED, first.error
        images = list(Image.objects.values_list("pk", "path", "disk", "sha256"))
        disks = list(Disk.objects.values_list("pk", "stable_id", "host", "path", "present"))
        files = image_files(store)

        usb_a.rename(tmp_path / "usb-b.img")  # /dev/loopN is now disk usb-b
        job = finished(services.start_backup(disk_a, mode="raw", datastore=datastore).pk, worker)

    assert job.state == Job.State.FAILED
    assert job.error == (f"{device} is disk loop-{host_name}-usb-b.img now, not the expected "
                         f"loop-{host_name}-usb-a.img: nothing was read")
    assert job.image is None
    assert list(Image.objects.values_list("pk", "path", "disk", "sha256")) == images
    assert list(Disk.objects.values_list("pk", "stable_id", "host", "path", "present")) == disks
    assert image_files(store) == files
    assert not (store / "images" / f"loop-{host_name}-usb-b.img").exists()
