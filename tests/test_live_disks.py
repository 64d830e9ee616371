"""A disk in use: a backup of a disk with a partition mounted read-write is
refused unless forced, and a forced image says so in its manifest, its
result and the listing."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from engine import MiB, imaging, last_line, one_error_line
from support.devices import loop_device, mounted, requires_loop
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.base.errors import SourceInUse
from imaging.datastore.catalog import list_images


@pytest.fixture
def disk(tmp_path):
    requires_loop()
    return build_disk(tmp_path / "disk.img", 32 * MiB, "dos", [PartSpec(24 * MiB, "ext4")])


def _manifest(image) -> dict:
    return json.loads((image / "manifest.json").read_text())


def test_raw_backup_of_a_disk_mounted_read_write_needs_force_and_is_marked(disk, tmp_path):
    ext4 = disk.partitions[0]
    store = tmp_path / "store"
    mountpoint = tmp_path / "mnt"
    with loop_device(disk.path, ext4.start, ext4.size) as device, mounted(device, mountpoint):
        (mountpoint / "busy.txt").write_text("written while mounted\n")
        refusal = one_error_line(imaging("backup", disk.path, "--store", store, "--disk", "live",
                                         check=False))
        assert f"{disk.path} is mounted read-write ({device} at {mountpoint})" in refusal
        assert "--force" in refusal
        assert not list(store.glob("images/*/*")), "a refused backup leaves no image"
        with pytest.raises(SourceInUse, match="mounted read-write"):
            backup(str(disk.path), store, disk_id="live")

        forced = json.loads(last_line(imaging("backup", disk.path, "--store", store, "--disk",
                                              "live", "--force", "--json").stdout))
        used = backup(str(disk.path), store, disk_id="live", mode="used", force=True)
    assert forced["mounted_rw"] is True and used.mounted_rw is True
    for image in (forced["image"], used.image):
        manifest = _manifest(Path(image))
        assert manifest["mounted_rw"] is True
        assert manifest["forced_past_mount"] == f"{device} at {mountpoint}"

    after = backup(str(disk.path), store, disk_id="live")
    assert after.mounted_rw is False and _manifest(after.image)["mounted_rw"] is False
    assert [record.mounted_rw for record in list_images(store)] == [True, True, False]
    table = [re.split(r"\s{2,}", line) for line in
             imaging("list", "--store", store).stdout.splitlines()]
    assert [row[6] for row in table] == ["MOUNTED RW", "yes", "yes", "no"]
    listed = json.loads(imaging("list", "--store", store, "--json").stdout)
    assert [record["mounted_rw"] for record in listed] == [True, True, False]


def test_read_only_mount_needs_no_force(disk, tmp_path):
    ext4 = disk.partitions[0]
    with loop_device(disk.path, ext4.start, ext4.size, read_only=True) as device, \
            mounted(device, tmp_path / "mnt", read_only=True):
        result = backup(str(disk.path), tmp_path / "store", disk_id="live")
    assert result.mounted_rw is False
    manifest = _manifest(result.image)
    assert manifest["mounted_rw"] is False and "forced_past_mount" not in manifest
