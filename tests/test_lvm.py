"""LVM2 inside a disk, as Debian's and Ubuntu's installers lay it out: a /boot partition,
then a PV whose volume group holds an ext4 root LV and a FAT home LV, with stale data in
the free extents. The engine reads the PV's metadata itself (no device-mapper here); used
mode maps each LV's filesystem and skips the free extents."""
from __future__ import annotations

import hashlib
import json
import os
import random

import pytest
from engine import imaging, one_error_line
from support.devices import loop_device, mounted, requires_root_loop_fuse
from support.disks import Part, PartSpec, _fill_partition, build_disk
from support.lvm import EXTENT, PE_START, Volume, make_physical_volume

from imaging.backup import backup
from imaging.datastore.image import Image, read_manifest
from imaging.datastore.store import Datastore
from imaging.disks import lvm
from imaging.disks.usedmap import METHOD_DUMPE2FS, METHOD_LVM, METHOD_PARTCLONE
from imaging.reading.mount import privately_mounted
from imaging.restore import restore

MiB = 1024 * 1024
ROOT = Volume("root", 0, 16)  # 64 MiB from the first extent
HOME = Volume("home", 20, 9)  # 36 MiB after a gap of 4 free extents
DISK_SIZE = 200 * MiB


@pytest.fixture(scope="module")
def lvm_disk(tmp_path_factory):
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("lvm")
    disk = build_disk(folder / "disk.img", DISK_SIZE, "gpt",
                      [PartSpec(32 * MiB, "ext4"), PartSpec(160 * MiB, "empty")], seed=21,
                      tail_noise=False)
    pv = disk.partitions[1]
    rng = random.Random(21)
    with open(disk.path, "r+b") as image:  # stale data everywhere first, free extents too
        image.seek(pv.start)
        image.write(rng.randbytes(pv.size))
    make_physical_volume(disk.path, pv.start, pv.size, "vg0", [ROOT, HOME], folder)
    _fill_partition(disk.path, Part(10, ROOT.offset(pv.start), ROOT.size, "ext4"), rng)
    _fill_partition(disk.path, Part(11, HOME.offset(pv.start), HOME.size, "fat32"), rng)
    return disk


def test_the_engine_reads_the_volume_group_from_the_pv_itself(lvm_disk):
    pv = lvm_disk.partitions[1]
    with open(lvm_disk.path, "rb") as image:
        found = lvm.read_pv(lambda offset, length: os.pread(image.fileno(), length,
                                                             pv.start + offset), pv.size)
    assert found.group == "vg0" and found.extent_size == EXTENT and found.data_start == PE_START
    volumes = {volume.name: volume for volume in found.volumes}
    assert volumes.keys() == {"vg0/root", "vg0/home"}
    assert (volumes["vg0/root"].start, volumes["vg0/root"].size) == (PE_START, ROOT.size)
    assert (volumes["vg0/home"].start, volumes["vg0/home"].size) == \
        (PE_START + HOME.first_extent * EXTENT, HOME.size)
    assert all(volume.contiguous for volume in found.volumes)
    assert found.free() == [(PE_START + 16 * EXTENT, 4 * EXTENT),
                            (PE_START + 29 * EXTENT, (found.extents - 29) * EXTENT)]


def stored(store) -> int:
    return sum(path.stat().st_size for path in (store / "chunks").rglob("*.zst"))


def sha256_of_range(path, start: int, size: int) -> str:
    with open(path, "rb") as handle:
        handle.seek(start)
        return hashlib.sha256(handle.read(size)).hexdigest()


def test_used_mode_maps_each_volume_skips_free_extents_and_restores_its_files(
        lvm_disk, tmp_path):
    raw = backup(str(lvm_disk.path), tmp_path / "raw", disk_id="d")
    used = backup(str(lvm_disk.path), tmp_path / "used", disk_id="d", mode="used")
    assert stored(tmp_path / "used") <= 0.6 * stored(tmp_path / "raw"), \
        (stored(tmp_path / "used"), stored(tmp_path / "raw"))
    manifest = read_manifest(Datastore.open(tmp_path / "used"), used.image)
    pv_entry = manifest.partitions[1]
    assert (pv_entry["filesystem"], pv_entry["mapped"]) == ("LVM2_member", METHOD_LVM)
    volumes = {volume["name"]: volume for volume in pv_entry["volumes"]}
    assert (volumes["vg0/root"]["filesystem"], volumes["vg0/root"]["mapped"]) == \
        ("ext4", METHOD_DUMPE2FS)
    assert (volumes["vg0/home"]["filesystem"], volumes["vg0/home"]["mapped"]) == \
        ("vfat", METHOD_PARTCLONE)
    for volume in volumes.values():
        assert 0 < volume["used_bytes"] < volume["size"]
    assert json.dumps(manifest.partitions)  # as it is written
    assert raw.image.exists()

    target = tmp_path / "restored.img"
    target.write_bytes(b"")
    os.truncate(target, DISK_SIZE)
    restore(used.image, str(target), allowed_targets=[str(target)])
    pv = lvm_disk.partitions[1]
    # The PV's label and metadata come back as they were: LVM would find its group.
    assert sha256_of_range(target, pv.start, PE_START) == \
        sha256_of_range(lvm_disk.path, pv.start, PE_START)
    with loop_device(lvm_disk.path, ROOT.offset(pv.start), ROOT.size, read_only=True) as a, \
            loop_device(target, ROOT.offset(pv.start), ROOT.size, read_only=True) as b, \
            mounted(a, tmp_path / "a", read_only=True) as original, \
            mounted(b, tmp_path / "b", read_only=True) as copy:
        files = sorted(path.relative_to(original) for path in original.rglob("*")
                       if path.is_file())
        assert files
        for relative in files:
            assert (copy / relative).read_bytes() == (original / relative).read_bytes()


@pytest.fixture(scope="module")
def lvm_image(lvm_disk, tmp_path_factory):
    """A raw image of the LVM disk: its volumes are read from the PV inside the image."""
    store = tmp_path_factory.mktemp("lvm-store")
    return backup(str(lvm_disk.path), store, disk_id="d").image


def test_files_and_extract_address_a_logical_volume_as_vg_lv(lvm_disk, lvm_image, tmp_path):
    pv = lvm_disk.partitions[1]
    listing = json.loads(imaging("files", lvm_image, "vg0/root", "/", "--json").stdout)
    with loop_device(lvm_disk.path, ROOT.offset(pv.start), ROOT.size, read_only=True) as device, \
            mounted(device, tmp_path / "root", read_only=True) as original:
        assert sorted(entry["name"] for entry in listing["entries"]) == \
            sorted(path.name for path in original.iterdir())
        wanted = next(path for path in sorted(original.rglob("*"))
                      if path.is_file() and path.stat().st_size > 4096)
        relative = wanted.relative_to(original)
        imaging("extract", lvm_image, "vg0/root", f"/{relative}", "--to", tmp_path / "out")
        assert (tmp_path / "out" / wanted.name).read_bytes() == wanted.read_bytes()
    home = json.loads(imaging("files", lvm_image, "vg0/home", "/", "--json").stdout)
    assert home["filesystem"] == "vfat" and home["entries"]
    missing = imaging("files", lvm_image, "vg0/swap", "/", check=False)
    assert one_error_line(missing) == (
        f"imaging: error: {lvm_image} has no logical volume vg0/swap that is one range of the "
        "disk (its volumes: vg0/home, vg0/root)")
    nowhere = imaging("files", lvm_image, "vg0/root", "/no/such", check=False)
    assert one_error_line(nowhere) == \
        "imaging: error: /no: no such file or directory in volume vg0/root"


def test_the_image_s_read_only_view_shows_each_volume_as_a_file(lvm_disk, lvm_image):
    pv = lvm_disk.partitions[1]
    image = Image.open(lvm_image)
    with privately_mounted(image) as exposure:
        assert sorted(path.name for path in exposure.root.iterdir()) == \
            ["disk", "p1", "p2", "vg0-home", "vg0-root"]
        for volume in (ROOT, HOME):
            view = (exposure.root / f"vg0-{volume.name}").read_bytes()
            assert hashlib.sha256(view).hexdigest() == \
                sha256_of_range(lvm_disk.path, volume.offset(pv.start), volume.size)
