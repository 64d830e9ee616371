"""Export as a VM's disk: qcow2, vmdk and vhdx through qemu-img from the image's view, sparse
where the image has zero chunks, each byte for byte the disk, written whole or not at all."""
from __future__ import annotations

import hashlib
import shutil
import subprocess

import pytest
from engine import MiB, imaging, last_line, one_error_line
from support.devices import requires_root_loop_fuse
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)
from support.requirements import requirement_missing

from imaging.datastore.image import Image

DISK_SIZE = 64 * MiB


@pytest.fixture(scope="module")
def imaged(tmp_path_factory):
    """A disk whose last 40 MiB are zeros, and its image."""
    requires_root_loop_fuse()
    if shutil.which("qemu-img") is None:
        requirement_missing("qemu-img is missing: install qemu-utils")
    folder = tmp_path_factory.mktemp("vm-disks")
    disk = build_disk(folder / "disk.img", DISK_SIZE, "gpt", [PartSpec(20 * MiB, "ext4")],
                      seed=8, tail_noise=False)
    result = imaging("backup", disk.path, "--store", folder / "store", "--disk", "sda")
    return disk, Image.open(last_line(result.stdout))


@pytest.mark.parametrize("format", ["qcow2", "vmdk", "vhdx"])
def test_each_format_holds_the_disk_sparsely_with_its_checksum(imaged, tmp_path, format):
    disk, image = imaged
    out = tmp_path / f"sda.{format}"
    printed = imaging("export", image.path, out, "--format", format, "-q").stdout.split()
    assert printed == [str(out), f"{out}.sha256"]
    info = subprocess.run(["qemu-img", "info", "--output=json", out], capture_output=True,
                          text=True, check=True).stdout
    assert f'"format": "{format}"' in info and f'"virtual-size": {DISK_SIZE}' in info
    same = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", format, disk.path, out],
                          capture_output=True, text=True)
    assert same.returncode == 0, same.stdout + same.stderr
    # The zeros take no room: what is allocated is about the 20 MiB partition's data.
    assert out.stat().st_blocks * 512 < 24 * MiB
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    assert (tmp_path / f"sda.{format}.sha256").read_text() == f"{digest}  sda.{format}\n"
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".")] == []


def test_bad_combinations_and_an_existing_file_are_one_clear_line(imaged, tmp_path):
    _, image = imaged
    split = imaging("export", image.path, tmp_path / "a.qcow2", "--format", "qcow2",
                    "--split", "1G", check=False)
    assert one_error_line(split) == ("imaging: error: a qcow2 export is one file of its own "
                                     "format: parts and long-distance matching are for the "
                                     "zstd stream")
    assert imaging("export", image.path, tmp_path / "a.img", "--format", "raw",
                   check=False).returncode == 2
    taken = tmp_path / "b.vmdk"
    taken.write_bytes(b"mine")
    refused = imaging("export", image.path, taken, "--format", "vmdk", check=False)
    assert one_error_line(refused).startswith(f"imaging: error: {taken} already exists")
    assert taken.read_bytes() == b"mine"
