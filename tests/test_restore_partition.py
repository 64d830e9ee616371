"""Restoring one partition, and restoring onto a larger disk (GPT relocation, --grow)."""
from __future__ import annotations

import json
import os
import subprocess

import pytest
from engine import MiB, imaging, one_error_line, sha256_of

from imaging.backup import backup
from imaging.base.errors import ImagingError, TargetError
from imaging.base.progress import Progress
from imaging.restore import restore
from support.devices import loop_device, requires_loop, run
from support.disks import PartSpec, build_disk

# Not a divisor of the partition starts: partitions begin and end inside chunks.
CHUNK = 768 * 1024


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    """(image directory, disk): GPT with ext4, FAT16 (starting mid-chunk), then ext4 last."""
    requires_loop()
    folder = tmp_path_factory.mktemp("gpt")
    disk = build_disk(folder / "disk.img", 48 * MiB, "gpt",
                      [PartSpec(16 * MiB, "ext4"), PartSpec(8 * MiB, "fat16", gap_before=7 * 512),
                       PartSpec(12 * MiB, "ext4", gap_before=MiB)], seed=21)
    return backup(str(disk.path), folder / "store", disk_id="gpt", chunk_size=CHUNK).image, disk


@pytest.fixture(scope="module")
def dos(tmp_path_factory):
    requires_loop()
    folder = tmp_path_factory.mktemp("dos")
    disk = build_disk(folder / "disk.img", 32 * MiB, "dos",
                      [PartSpec(8 * MiB, "fat16"), PartSpec(16 * MiB, "ext4")], seed=22)
    return backup(str(disk.path), folder / "store", disk_id="dos", chunk_size=CHUNK).image, disk


def read_range(path, start: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(size)


@pytest.mark.parametrize("number", [1, 2, 3])
def test_a_partition_restores_to_a_file_byte_for_byte(gpt, tmp_path, number):
    image_dir, disk = gpt
    part = disk.partitions[number - 1]
    target = tmp_path / "part.img"
    done = imaging("restore", image_dir, target, "--partition", number)
    assert done.stdout.strip().endswith("verified: every byte matches")
    assert os.path.getsize(target) == part.size
    assert target.read_bytes() == read_range(disk.path, part.start, part.size)


def test_a_partition_restores_onto_a_loop_device_over_part_of_a_disk(gpt, tmp_path):
    image_dir, disk = gpt
    part = disk.partitions[0]
    host = tmp_path / "other-disk.img"
    host.write_bytes(b"\xaa" * (part.size + 2 * MiB))
    with loop_device(host, MiB, part.size) as device:
        result = restore(str(image_dir), device, partition=1, allowed_targets=[device])
        assert (result.partition, result.size, result.verified) == (1, part.size, True)
        checked = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stdout
    assert read_range(host, MiB, part.size) == read_range(disk.path, part.start, part.size)
    assert read_range(host, 0, MiB) == b"\xaa" * MiB
    assert read_range(host, MiB + part.size, MiB) == b"\xaa" * MiB


def test_a_partition_restore_has_the_disk_restores_checks(gpt, tmp_path):
    image_dir, disk = gpt
    small = tmp_path / "small.img"
    small.write_bytes(b"x" * (disk.partitions[0].size - 512))
    line = one_error_line(imaging("restore", image_dir, small, "--partition", 1, check=False))
    assert line == (f"imaging: error: target disk-image file {small} is too small: "
                    f"{small.stat().st_size} bytes, the image needs {disk.partitions[0].size}")
    with pytest.raises(TargetError, match="is not one of the allowed targets"):
        restore(str(image_dir), str(tmp_path / "new.img"), partition=1,
                allowed_targets=[str(tmp_path / "other.img")])
    with pytest.raises(TargetError, match="is inside the datastore"):
        restore(str(image_dir), str(image_dir / "part.img"), partition=1)
    line = one_error_line(imaging("restore", image_dir, tmp_path / "t.img", "--partition", 4,
                                  check=False))
    assert line == f"imaging: error: {image_dir} has no partition 4 (its partitions: 1, 2, 3)"
    line = one_error_line(imaging("restore", image_dir, tmp_path / "t.img", "--partition", 1,
                                  "--grow", check=False))
    assert line == ("imaging: error: growing applies to a whole-disk restore, not to one "
                    "partition")
    assert not (tmp_path / "new.img").exists() and not (tmp_path / "t.img").exists()


def test_a_partition_that_differs_after_writing_fails_verification(gpt, tmp_path):
    image_dir, disk = gpt
    target = tmp_path / "part.img"

    def damage_before_the_read_back(event):
        if event.phase == "verify" and event.done == 0:
            with open(target, "r+b") as handle:
                handle.seek(3 * MiB)
                byte = handle.read(1)
                handle.seek(3 * MiB)
                handle.write(bytes([byte[0] ^ 0xFF]))

    with pytest.raises(TargetError) as failed:
        restore(str(image_dir), str(target), partition=2,
                progress=Progress("restore", 0, damage_before_the_read_back, interval=0))
    start = disk.partitions[1].start
    piece_start = (start // CHUNK + 4) * CHUNK - start  # the piece holding byte 3 MiB
    assert str(failed.value) == (f"verification failed: {target} differs from partition 2 of "
                                 f"the image (bytes {piece_start}-{piece_start + CHUNK - 1})")


def blank_disk(path, size: int):
    """An empty disk-image file of `size` bytes (a hole)."""
    with open(path, "wb") as handle:
        handle.truncate(size)
    return path


def verify_table(target) -> subprocess.CompletedProcess:
    return subprocess.run(["sfdisk", "--verify", target], capture_output=True, text=True)


def test_a_gpt_restored_onto_a_larger_disk_gets_its_backup_header_at_the_end(gpt, tmp_path):
    image_dir, disk = gpt
    copied = tmp_path / "copied.img"  # what dd alone leaves
    copied.write_bytes(disk.path.read_bytes())
    os.truncate(copied, disk.size + 16 * MiB)
    assert "The backup GPT table is not on the end of the device" in verify_table(copied).stderr

    target = blank_disk(tmp_path / "larger.img", disk.size + 16 * MiB)
    done = imaging("restore", image_dir, target)
    assert "moved the GPT backup header to the end of the target" in done.stdout
    checked = verify_table(target)
    assert "No errors detected" in checked.stdout and not checked.stderr, checked
    for part in disk.partitions:
        assert read_range(target, part.start, part.size) == \
            read_range(disk.path, part.start, part.size)
    table = json.loads(run("sfdisk", "--json", target))["partitiontable"]
    assert table["lastlba"] == (disk.size + 16 * MiB) // 512 - 34


def test_grow_fills_the_larger_disk_with_the_last_partition_and_its_ext4(gpt, tmp_path):
    image_dir, disk = gpt
    last = disk.partitions[-1]
    extra = 20 * MiB
    target = blank_disk(tmp_path / "larger.img", disk.size + extra)
    result = restore(str(image_dir), str(target), grow=True)
    assert result.relocated
    table = json.loads(run("sfdisk", "--json", target))["partitiontable"]
    grown = table["partitions"][-1]
    assert grown["start"] * 512 == last.start
    assert (grown["start"] + grown["size"] - 1) == table["lastlba"]
    assert result.grown_size == grown["size"] * 512 > last.size + extra - MiB
    checked = verify_table(target)
    assert "No errors detected" in checked.stdout and not checked.stderr, checked
    with loop_device(target, last.start, result.grown_size) as device:
        fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
        assert fsck.returncode == 0, fsck.stdout
        summary = run("dumpe2fs", "-h", device)
    fields = dict(line.split(":", 1) for line in summary.splitlines() if ":" in line)
    blocks, block_size = int(fields["Block count"]), int(fields["Block size"])
    assert result.grown_size - block_size < blocks * block_size <= result.grown_size
    for part in disk.partitions[:-1]:
        assert read_range(target, part.start, part.size) == \
            read_range(disk.path, part.start, part.size)


def test_a_dos_disk_needs_no_relocation_and_grows_too(dos, tmp_path):
    image_dir, disk = dos
    target = blank_disk(tmp_path / "larger.img", disk.size + 8 * MiB)
    result = restore(str(image_dir), str(target))
    assert not result.relocated and result.grown_size is None
    assert sha256_of(target, disk.size) == sha256_of(disk.path)
    assert "No errors detected" in verify_table(target).stdout
    grown = restore(str(image_dir), str(target), grow=True)
    last = disk.partitions[-1]
    assert not grown.relocated and grown.grown_size == disk.size + 8 * MiB - last.start


def test_grow_is_refused_before_writing_when_the_last_partition_is_not_ext(gpt, tmp_path):
    image_dir, disk = gpt
    fat_last = tmp_path / "fat-last.img"
    layout = build_disk(fat_last, 24 * MiB, "gpt", [PartSpec(8 * MiB, "ext4"),
                                                     PartSpec(8 * MiB, "fat16")], seed=23)
    image = backup(str(layout.path), tmp_path / "store", disk_id="f", chunk_size=CHUNK).image
    target = tmp_path / "larger.img"
    target.write_bytes(b"\x55" * (32 * MiB))
    line = one_error_line(imaging("restore", image, target, "--grow", check=False))
    assert line == ("imaging: error: cannot grow partition 2: it holds vfat, and only ext2, "
                    "ext3 and ext4 filesystems are grown")
    assert target.read_bytes() == b"\x55" * (32 * MiB)
    with pytest.raises(ImagingError, match="no GPT or dos partition table"):
        blank = tmp_path / "blank.img"
        blank.write_bytes(os.urandom(MiB))
        restore(str(backup(str(blank), tmp_path / "store", disk_id="b").image),
                str(tmp_path / "t.img"), grow=True)
