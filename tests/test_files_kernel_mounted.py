"""Files of XFS and Btrfs partitions (RHEL's and Fedora's defaults): read through the
kernel's read-only mount in a mount namespace of its own, with the guarantees of the other
filesystems' readers: nothing written outside --to, links recreated and never followed,
modes (without set-user-ID) and times kept, nothing left mounted or attached."""
from __future__ import annotations

import json
import os
import stat
import subprocess

import pytest
from engine import MiB, imaging, one_error_line
from support.devices import loop_device, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)
from test_files import a_folder_outside, outside_is_untouched, snapshot

from imaging.backup import backup
from imaging.reading.files import list_files

# mkfs.xfs makes a filesystem under 300 MB only for its own test suite's sake.
XFS_SMALL = dict(os.environ, TEST_DIR="1", TEST_DEV="1", QA_CHECK_FS="1")
KINDS = {1: "xfs", 2: "btrfs"}


def kernel_mounted(device: str, kind: str, point, read_only: bool = False):
    point.mkdir(parents=True, exist_ok=True)
    options = "ro,norecovery,nouuid" if read_only and kind == "xfs" else \
        ("ro" if read_only else "rw")
    run("mount", "-t", kind, "-o", options, device, point)
    return point


def fill(root, outside) -> None:
    (root / "etc").mkdir()
    (root / "etc" / "hostname").write_bytes(b"lab\n")
    os.chmod(root / "etc" / "hostname", 0o644)
    (root / "etc" / "secret").write_bytes(b"only root\n")
    os.chmod(root / "etc" / "secret", 0o640)
    (root / "data.bin").write_bytes(os.urandom(3 * MiB + 123))
    (root / "suid").write_bytes(b"#!/bin/sh\n")
    os.chmod(root / "suid", 0o4755)
    (root / "to-victim").symlink_to(outside / "victim")
    (root / "climb").symlink_to("../" * 12 + "etc/passwd")
    for path in (root / "etc" / "hostname", root / "data.bin"):
        os.utime(path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))


@pytest.fixture(scope="module")
def disk_and_image(tmp_path_factory):
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("kernel-mounted")
    outside = a_folder_outside(folder)
    disk = build_disk(folder / "disk.img", 208 * MiB, "gpt",
                      [PartSpec(64 * MiB, "empty"), PartSpec(128 * MiB, "empty")], seed=3,
                      tail_noise=False)
    for number, kind in KINDS.items():
        part = disk.partitions[number - 1]
        with loop_device(disk.path, part.start, part.size) as device:
            subprocess.run([f"mkfs.{kind}", "-q", "-f", device], check=True,
                           env=XFS_SMALL, capture_output=True)
            point = kernel_mounted(device, kind, folder / kind)
            try:
                fill(point, outside)
            finally:
                run("umount", point)
    image = backup(str(disk.path), folder / "store", disk_id="disk", chunk_size=MiB).image
    return disk, image, outside


def source_snapshot(disk, number: int, tmp_path) -> dict:
    part = disk.partitions[number - 1]
    with loop_device(disk.path, part.start, part.size, read_only=True) as device:
        point = kernel_mounted(device, KINDS[number], tmp_path / "source", read_only=True)
        try:
            return snapshot(point)
        finally:
            run("umount", point)


@pytest.mark.parametrize("number", sorted(KINDS))
def test_a_listing_shows_what_the_filesystem_holds(disk_and_image, number, tmp_path):
    disk, image, outside = disk_and_image
    listed = json.loads(imaging("files", image, number, "/etc", "--json").stdout)
    assert listed["filesystem"] == KINDS[number]
    assert {entry["name"]: entry["mode"] for entry in listed["entries"]} == \
        {"hostname": 0o644, "secret": 0o640}
    root = {entry.name: entry for entry in list_files(image, number).entries}
    assert root["data.bin"].size == 3 * MiB + 123
    assert root["data.bin"].mtime == "2020-09-13T12:26:40Z"
    assert root["to-victim"].type == "symlink" and root["to-victim"].target == \
        str(outside / "victim")
    assert root["etc"].type == "directory"


@pytest.mark.parametrize("number", sorted(KINDS))
def test_extracting_keeps_contents_modes_and_times_and_never_writes_outside(
        disk_and_image, number, tmp_path):
    disk, image, outside = disk_and_image
    done = imaging("extract", image, number, "/", "--to", tmp_path / "out")
    assert done.stdout.splitlines()[-1].startswith("extracted ")
    expected = source_snapshot(disk, number, tmp_path)
    kind, mode, content, mtime = expected.pop("suid")
    got = snapshot(tmp_path / "out")
    assert got.pop("suid") == (kind, mode & ~stat.S_ISUID, content, mtime)
    assert got == expected
    assert os.readlink(tmp_path / "out" / "to-victim") == str(outside / "victim")
    outside_is_untouched(outside)
    # Neither the namespace's mount nor its loop device outlives the session.
    assert not [line for line in run("losetup", "--list", "--noheadings").splitlines()
                if "imaging-mount-" in line]


def test_a_path_through_a_link_is_not_followed_and_a_missing_one_is_one_line(
        disk_and_image):
    _, image, _ = disk_and_image
    line = one_error_line(imaging("files", image, 1, "/climb/x", check=False))
    assert line == "imaging: error: /climb: not a directory in partition 1"
    line = one_error_line(imaging("files", image, 2, "/nothing", check=False))
    assert line == "imaging: error: /nothing: no such file or directory in partition 2"


def test_verify_fsck_checks_xfs_and_btrfs_with_their_own_checkers(disk_and_image):
    _, image, _ = disk_and_image
    lines = imaging("verify", image, "--fsck").stdout.splitlines()
    assert any(line.startswith("partition 1 (xfs): clean") for line in lines), lines
    assert any(line.startswith("partition 2 (btrfs): clean") for line in lines), lines
