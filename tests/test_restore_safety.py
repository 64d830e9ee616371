"""Restore refuses targets it must not overwrite, deciding before it writes a byte.

Every refusal also checks that the target's bytes did not change. The root
filesystem refusals use a stand-in mount table (mounts.MOUNTINFO, which no
caller's argument can reach) so that nothing here goes near this machine's
own disks.
"""
from __future__ import annotations

import inspect
import os
import stat

import pytest
from engine import MiB, imaging, one_error_line, sha256_of, write_random
from support.devices import loop_device, mounted, requires_loop, run
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.base.errors import TargetError
from imaging.datastore.image import Image
from imaging.disks import mounts
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


def _number(device) -> str:
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


@pytest.fixture
def mount_table(tmp_path, monkeypatch):
    """Point the engine at a stand-in mount table: mount_table((number, at, source), ...)."""
    def stand_in(*entries):
        table = tmp_path / "mountinfo"
        table.write_text("".join(
            f"{21 + n} 1 {number} / {at} rw,relatime shared:1 - ext4 {source} rw\n"
            for n, (number, at, source) in enumerate(entries)))
        monkeypatch.setattr(mounts, "MOUNTINFO", str(table))
    return stand_in


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


def test_disk_holding_the_root_filesystem_is_refused_before_opening(image, tmp_path,
                                                                    mount_table):
    disk = _target_disk(tmp_path)
    before = sha256_of(disk.path)
    with loop_device(disk.path) as device:
        mount_table((_number(device), "/", device))
        with pytest.raises(TargetError, match="holds the running system's root filesystem"):
            restore(str(image), device)
    assert sha256_of(disk.path) == before


def test_partition_of_the_root_disk_counts_too(image, tmp_path, mount_table):
    """Root on a partition (a loop over part of the disk's file) protects the whole disk."""
    disk = _target_disk(tmp_path)
    part = disk.partitions[0]
    before = sha256_of(disk.path)
    with loop_device(disk.path) as device, loop_device(disk.path, part.start, part.size) as partition:
        mount_table((_number(partition), "/", partition))
        with pytest.raises(TargetError, match="root filesystem"):
            restore(str(image), device)
    assert sha256_of(disk.path) == before


def _stand_in_sysfs(root, disk_number, layers):
    """A /sys/dev/block where `disk_number` has a partition, held by each of `layers` in turn.

    layers: device numbers, the first holding the partition, each next one
    holding the one before (LUKS over the partition, an LVM volume over LUKS).
    """
    partition = root / disk_number / "part1"
    partition.mkdir(parents=True)
    (partition / "partition").write_text("1\n")
    below = "259:90"
    (partition / "dev").write_text(below + "\n")
    for number in layers:
        holder = root / below / "holders" / f"dm-{number.split(':')[1]}"
        holder.mkdir(parents=True)
        (holder / "dev").write_text(number + "\n")
        below = number
    return root


def test_root_on_lvm_over_luks_over_a_partition_protects_the_disk(image, tmp_path, mount_table,
                                                                  monkeypatch):
    """The holders of the disk's partitions are followed all the way up.

    This kernel has no device-mapper (no /dev/mapper/control, no modules to
    load), so a real LVM or LUKS device cannot be made here: the target is a
    real loop device, and the sysfs tree above it (a partition, a LUKS
    mapping holding it, an LVM volume holding that) is a stand-in in the
    layout the kernel uses.
    """
    disk = _target_disk(tmp_path)
    before = sha256_of(disk.path)
    with loop_device(disk.path) as device:
        sysfs = _stand_in_sysfs(tmp_path / "sys-dev-block", _number(device), ["252:90", "252:91"])
        monkeypatch.setattr(mounts, "SYS_DEV_BLOCK", sysfs)
        mount_table(("252:91", "/", "/dev/mapper/vg-root"))
        with pytest.raises(TargetError, match=f"target {device} holds the running system's root"):
            restore(str(image), device)
        mount_table(("254:0", "/", "/dev/vda"), ("252:91", "/srv", "/dev/mapper/vg-srv"))
        message = one_error_line_of(lambda: restore(str(image), device))
        assert message == (f"target {device} has a mounted partition (/dev/mapper/vg-srv at /srv)")
    assert sha256_of(disk.path) == before


def one_error_line_of(call) -> str:
    with pytest.raises(TargetError) as refused:
        call()
    assert "\n" not in str(refused.value)
    return str(refused.value)


def test_no_argument_switches_a_check_off():
    assert list(inspect.signature(restore).parameters) == [
        "image_dir", "target", "verify", "progress", "allowed_targets", "workers", "partition",
        "grow"]


def test_targets_inside_a_datastore_are_refused(image, tmp_path):
    store = image.parent.parent.parent
    chunk = Image.open(image).store.chunk_path(Image.open(image).index()[0])
    link = tmp_path / "innocent-looking.img"
    link.symlink_to(chunk)
    for target, inside in [(chunk, chunk), (image / "index", image / "index"),
                           (store / "new-disk.img", store / "new-disk.img"), (link, chunk)]:
        before = sha256_of(inside) if inside.exists() else None
        message = one_error_line(imaging("restore", image, target, check=False))
        assert message == f"imaging: error: target {target} is inside the datastore {store}"
        assert (sha256_of(inside) if inside.exists() else None) == before
    assert Image.open(image).index()  # the image is intact
    assert "intact" in imaging("verify", image).stdout


def test_a_disk_image_file_smaller_than_the_image_is_refused(image, tmp_path):
    small = tmp_path / "small-disk.img"
    write_random(small, 8 * MiB, seed=3)
    before = sha256_of(small)
    message = one_error_line(imaging("restore", image, small, check=False))
    assert message == (f"imaging: error: target disk-image file {small} is too small: "
                       f"{8 * MiB} bytes, the image needs {16 * MiB}")
    assert sha256_of(small) == before


def test_a_new_or_empty_file_is_a_fine_target(image, tmp_path):
    source = image.parent.parent.parent.parent / "source.img"
    empty = tmp_path / "empty.img"
    empty.write_bytes(b"")
    for target in (empty, tmp_path / "new.img"):
        imaging("restore", image, target)
        assert sha256_of(target) == sha256_of(source)


def test_a_target_outside_the_allowed_ones_is_refused(image, tmp_path):
    disk = _target_disk(tmp_path)
    other = tmp_path / "other.img"
    write_random(other, 16 * MiB, seed=4)
    before = sha256_of(disk.path), sha256_of(other)
    with loop_device(disk.path) as device, loop_device(other) as other_device:
        for target, allowed in [(device, [other_device]), (str(other), [str(disk.path)]),
                                (device, [str(disk.path)]),  # the file behind it is not it
                                (device, [])]:
            with pytest.raises(TargetError) as refused:
                restore(str(image), target, allowed_targets=allowed)
            assert str(refused.value) == f"target {target} is not one of the allowed targets"
        assert (sha256_of(disk.path), sha256_of(other)) == before


def test_allowed_targets_match_by_real_path_and_device_number(image, tmp_path):
    source = image.parent.parent.parent.parent / "source.img"
    disk = _target_disk(tmp_path, 16 * MiB)
    with loop_device(disk.path) as device:
        # Another node for the same device, as /dev/disk/by-id/... names one.
        alias = tmp_path / "by-id-disk"
        os.mknod(alias, stat.S_IFBLK | 0o600, os.stat(device).st_rdev)
        restore(str(image), device, allowed_targets=[str(alias)])
    assert sha256_of(disk.path) == sha256_of(source)
    link = tmp_path / "link.img"
    link.symlink_to(tmp_path / "file.img")
    restore(str(image), str(tmp_path / "file.img"), allowed_targets=[str(link)])
    assert sha256_of(tmp_path / "file.img") == sha256_of(source)


def test_unmounted_disk_of_the_same_size_is_accepted(image, tmp_path):
    disk = _target_disk(tmp_path, 16 * MiB)
    with loop_device(disk.path) as device:
        imaging("restore", image, device)
    assert sha256_of(disk.path) == sha256_of(image.parent.parent.parent.parent / "source.img")
