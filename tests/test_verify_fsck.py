"""Restore drills: verify --fsck checks each partition's filesystem read-only, and records it."""
from __future__ import annotations

import json
import re
import shutil

import pytest
from engine import MiB, imaging
from support.devices import loop_device, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)

from imaging.backup import backup
from imaging.datastore.catalog import list_images
from imaging.datastore.image import Image
from imaging.verify import verify

CHUNK = 1 * MiB


def drill_disk(path, damage_ext4: bool):
    """A dos disk: ext4, FAT16, swap and NTFS; its ext4 with a wrong link count if `damage_ext4`."""
    disk = build_disk(path, 48 * MiB, "dos",
                      [PartSpec(16 * MiB, "ext4"), PartSpec(12 * MiB, "fat16"),
                       PartSpec(2 * MiB, "swap"), PartSpec(12 * MiB, "empty")], seed=31)
    ntfs = disk.partitions[3]
    with loop_device(path, ntfs.start, ntfs.size) as device:
        run("mkntfs", "-q", "-f", "-F", device)
    if damage_ext4:
        ext4 = disk.partitions[0]
        with loop_device(path, ext4.start, ext4.size) as device:
            run("debugfs", "-w", "-R", "sif <12> links_count 7", device)
    return disk


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """{"clean": image directory, "damaged": image directory}, one store."""
    requires_root_loop_fuse()
    if shutil.which("mkntfs") is None:
        pytest.fail("mkntfs is missing: install the ntfs-3g package (make install does)")
    folder = tmp_path_factory.mktemp("drill")
    found = {}
    for name in ("clean", "damaged"):
        disk = drill_disk(folder / f"{name}.img", damage_ext4=name == "damaged")
        found[name] = backup(str(disk.path), folder / "store", disk_id=name,
                             chunk_size=CHUNK).image
    return found


def recorded(image_dir) -> list[dict]:
    return json.loads((image_dir / "verify.json").read_text())["filesystems"]


def catalogued(image_dir) -> list[dict]:
    (record,) = list_images(image_dir.parent.parent.parent, image_dir.parent.name)
    return record.filesystems


def test_a_clean_disk_is_reported_clean_partition_by_partition(images):
    image_dir = images["clean"]
    done = imaging("verify", image_dir, "--fsck")
    lines = done.stdout.splitlines()
    assert re.fullmatch(r"partition 1 \(ext4\): clean: part1: \d+/\d+ files .*blocks", lines[0])
    assert lines[1].startswith("partition 2 (vfat): clean: p2: ")
    assert lines[2] == "partition 3 (swap): not checked: no checker for swap"
    assert lines[3].startswith("partition 4 (ntfs): clean: ")
    found = recorded(image_dir)
    assert [(fs["number"], fs["type"], fs["result"]) for fs in found] == [
        (1, "ext4", "clean"), (2, "vfat", "clean"), (3, "swap", "not checked"),
        (4, "ntfs", "clean")]
    assert found[1]["detail"].startswith("p2: ") and "files" in found[1]["detail"]
    assert catalogued(image_dir) == found


def test_an_ext4_damaged_before_the_backup_is_reported_dirty(images):
    image_dir = images["damaged"]
    done = imaging("verify", image_dir, "--fsck", check=False)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == \
        f"{image_dir}: filesystem check failed on partition 1"
    found = recorded(image_dir)
    assert (found[0]["number"], found[0]["type"], found[0]["result"]) == (1, "ext4", "dirty")
    assert found[1]["result"] == "clean"
    assert catalogued(image_dir)[0]["result"] == "dirty"
    result = verify(str(image_dir), fsck=True)
    assert result.ok and result.filesystems_clean is False


def test_an_image_with_bad_chunks_is_not_checked_and_a_plain_verify_records_no_drill(images,
                                                                                     tmp_path):
    copy = tmp_path / "store"
    shutil.copytree(images["clean"].parent.parent.parent, copy)
    image_dir = copy / "images" / "clean" / images["clean"].name
    plain = verify(str(image_dir))
    assert plain.filesystems is None and "filesystems" not in json.loads(
        (image_dir / "verify.json").read_text())
    assert catalogued(image_dir) is None
    image = Image.open(image_dir)
    image.store.chunk_path(image.index()[2]).write_bytes(b"damaged")
    done = imaging("verify", image_dir, "--fsck", check=False)
    assert done.returncode == 1
    assert {(fs["result"], fs["detail"]) for fs in recorded(image_dir)} == \
        {("not checked", "the image has bad chunks")}
