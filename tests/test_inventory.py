"""The disks of this host: lsblk's block devices plus configured disk-image files."""
from __future__ import annotations

import json
import os
import subprocess

from engine import MiB, imaging


def test_disks_lists_block_disks_and_configured_files(tmp_path):
    disk_file = tmp_path / "vm-disk.img"
    disk_file.write_bytes(b"")
    os.truncate(disk_file, 8 * MiB)
    env = dict(os.environ, IMAGING_DISK_FILES=f"{disk_file}:{tmp_path / 'absent.img'}", HOST_NAME="node7")
    disks = json.loads(imaging("disks", env=env).stdout)
    files = [d for d in disks if d["type"] == "file"]
    assert [(d["id"], d["path"], d["size"], d["host"]) for d in files] == \
        [("file-node7-vm-disk.img", str(disk_file), 8 * MiB, "node7")]
    lsblk = json.loads(subprocess.run(["lsblk", "--json", "--bytes", "-d", "-o", "PATH,TYPE,SIZE"],
                                      capture_output=True, text=True, check=True).stdout)
    expected = {d["path"]: int(d["size"]) for d in lsblk["blockdevices"]
                if d["type"] == "disk" and int(d["size"]) > 0 and "zram" not in d["path"]}
    block = {d["path"]: d for d in disks if d["type"] == "disk"}
    assert {path: d["size"] for path, d in block.items()} == expected
    for entry in block.values():
        assert entry["id"] and "/" not in entry["id"] and not entry["id"].startswith("sd")
        assert set(entry) >= {"model", "serial", "wwn", "mounted", "mountpoints", "sector_size"}
    ids = [d["id"] for d in disks]
    assert len(ids) == len(set(ids))
