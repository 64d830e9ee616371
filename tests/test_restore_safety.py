"""Restore refuses targets it must not overwrite, deciding before it writes a byte."""
from __future__ import annotations

import os

import pytest
from engine import MiB, imaging, one_error_line, sha256_of, write_random
from support.devices import loop_device, mounted, requires_loop, run
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.errors import TargetError
from imaging.restore import restore


@pytest.fixture(autouse=True)
def loop_available():
    requires_loop()


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("image")
    write_random(folder / "source.img", 16 * MiB)
    return backup(str(folder / "source.img"), folder / "store", disk_id="src").image


def _target_disk(tmp_path, size=32 * MiB):
    """A disk image with an ext4 partition, the way a real target disk looks."""
    return build_disk(tmp_path / "target.img", size, "dos", [PartSpec(size // 2, "ext4")])


def _mount_table_with_root_on(device, folder):
    """A stand-in /proc/self/mountinfo whose root filesystem lives on `device`."""
    rdev = os.stat(device).st_rdev
    mountinfo = folder / "mountinfo"
    mountinfo.write_text(
        f"21 1 {os.major(rdev)}:{os.minor(rdev)} / / rw,relatime shared:1 - ext4 {device} rw\n")
    return mountinfo


def test_too_small_target_is_refused(image, tmp_path):
    small = tmp_path / "small.img"
    write_random(small, 8 * MiB, seed=7)
    before = sha256_of(small)
    with loop_device(small) as device:
        message = one_error_line(imaging("restore", image, device, check=False))
    assert "too small" in message and str(16 * MiB) in message
    assert sha256_of(small) == before


def test_mounted_target_is_refused(image, tmp_path):
    fs = tmp_path / "fs.img"
    fs.write_bytes(b"")
    os.truncate(fs, 32 * MiB)
    run("mkfs.ext4", "-q", fs)
    before = sha256_of(fs)
    # Read-only mounts, so the only writer that could change the bytes is restore.
    with loop_device(fs) as device, mounted(device, tmp_path / "mnt", read_only=True):
        message = one_error_line(imaging("restore", image, device, check=False))
        assert message.endswith(f"target {device} is mounted at {tmp_path / 'mnt'}")
    assert sha256_of(fs) == before


def test_target_with_a_mounted_partition_is_refused(image, tmp_path):
    disk = _target_disk(tmp_path)
    part = disk.partitions[0]
    before = sha256_of(disk.path)
    with loop_device(disk.path) as device, \
            loop_device(disk.path, part.start, part.size) as partition, \
            mounted(partition, tmp_path / "mnt", read_only=True):
        message = one_error_line(imaging("restore", image, device, check=False))
        assert f"target {device} has a mounted partition ({partition} at" in message
    assert sha256_of(disk.path) == before


def test_disk_holding_the_root_filesystem_is_refused_before_opening(image, tmp_path):
    disk = _target_disk(tmp_path)
    before = sha256_of(disk.path)
    with loop_device(disk.path) as device:
        mountinfo = _mount_table_with_root_on(device, tmp_path)
        with pytest.raises(TargetError, match="holds the running system's root filesystem"):
            restore(str(image), device, mounts_path=str(mountinfo))
    assert sha256_of(disk.path) == before


def test_partition_of_the_root_disk_counts_too(image, tmp_path):
    """Root on a partition (a loop over part of the disk's file) protects the whole disk."""
    disk = _target_disk(tmp_path)
    part = disk.partitions[0]
    with loop_device(disk.path) as device, loop_device(disk.path, part.start, part.size) as partition:
        mountinfo = _mount_table_with_root_on(partition, tmp_path)
        with pytest.raises(TargetError, match="root filesystem"):
            restore(str(image), device, mounts_path=str(mountinfo))


def test_unmounted_disk_of_the_same_size_is_accepted(image, tmp_path):
    disk = _target_disk(tmp_path, 16 * MiB)
    with loop_device(disk.path) as device:
        imaging("restore", image, device)
    assert sha256_of(disk.path) == sha256_of(image.parent.parent.parent.parent / "source.img")
