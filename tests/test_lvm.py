"""LVM2 inside a disk, as Debian's and Ubuntu's installers lay it out: a /boot partition,
then a PV whose volume group holds an ext4 root LV and a FAT home LV, with stale data in
the free extents. The engine reads the PV's metadata itself (no device-mapper here); used
mode maps each LV's filesystem and skips the free extents."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import subprocess

import pytest
from engine import imaging, one_error_line
from support.devices import loop_device, mounted, requires_root_loop_fuse, run
from support.disks import Part, PartSpec, _fill_partition, build_disk
from support.lvm import EXTENT, PE_START, Volume, make_physical_volume
from test_files_kernel_mounted import XFS_SMALL, kernel_mounted

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
SRV = Volume("srv", 29, 16)  # XFS
DISK_SIZE = 264 * MiB


@pytest.fixture(scope="module")
def lvm_disk(tmp_path_factory):
    requires_root_loop_fuse()
    return build_lvm_disk(tmp_path_factory.mktemp("lvm"))


def build_lvm_disk(folder):
    """A /boot partition, then a PV of vg0 holding root (ext4), home (FAT) and srv (XFS),
    its free extents full of stale random bytes."""
    disk = build_disk(folder / "disk.img", DISK_SIZE, "gpt",
                      [PartSpec(32 * MiB, "ext4"), PartSpec(224 * MiB, "empty")], seed=21,
                      tail_noise=False)
    pv = disk.partitions[1]
    rng = random.Random(21)
    with open(disk.path, "r+b") as image:  # stale data everywhere first, free extents too
        image.seek(pv.start)
        image.write(rng.randbytes(pv.size))
    make_physical_volume(disk.path, pv.start, pv.size, "vg0", [ROOT, HOME, SRV], folder)
    _fill_partition(disk.path, Part(10, ROOT.offset(pv.start), ROOT.size, "ext4"), rng)
    _fill_partition(disk.path, Part(11, HOME.offset(pv.start), HOME.size, "fat32"), rng)
    with loop_device(disk.path, SRV.offset(pv.start), SRV.size) as device:
        subprocess.run(["mkfs.xfs", "-q", "-f", device], check=True, env=XFS_SMALL,
                       capture_output=True)
        point = kernel_mounted(device, "xfs", folder / "srv")
        try:
            (point / "www").mkdir()
            (point / "www" / "index.html").write_bytes(rng.randbytes(300_000))
        finally:
            run("umount", point)
    return disk


def test_the_engine_reads_the_volume_group_from_the_pv_itself(lvm_disk):
    pv = lvm_disk.partitions[1]
    with open(lvm_disk.path, "rb") as image:
        found = lvm.read_pv(lambda offset, length: os.pread(image.fileno(), length,
                                                             pv.start + offset), pv.size)
    assert found.group == "vg0" and found.extent_size == EXTENT and found.data_start == PE_START
    volumes = {volume.name: volume for volume in found.volumes}
    assert volumes.keys() == {"vg0/root", "vg0/home", "vg0/srv"}
    assert (volumes["vg0/root"].start, volumes["vg0/root"].size) == (PE_START, ROOT.size)
    assert (volumes["vg0/home"].start, volumes["vg0/home"].size) == \
        (PE_START + HOME.first_extent * EXTENT, HOME.size)
    assert all(volume.contiguous for volume in found.volumes)
    assert found.free() == [(PE_START + 16 * EXTENT, 4 * EXTENT),
                            (PE_START + 45 * EXTENT, (found.extents - 45) * EXTENT)]


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
    assert (volumes["vg0/srv"]["filesystem"], volumes["vg0/srv"]["mapped"]) == \
        ("xfs", METHOD_PARTCLONE)
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
    # The XFS volume too, mapped by partclone and skipped where free.
    contents = []
    for disk, name in ((lvm_disk.path, "a-srv"), (target, "b-srv")):
        with loop_device(disk, SRV.offset(pv.start), SRV.size, read_only=True) as device:
            point = kernel_mounted(device, "xfs", tmp_path / name, read_only=True)
            try:
                contents.append((point / "www" / "index.html").read_bytes())
            finally:
                run("umount", point)
    assert contents[0] == contents[1] and len(contents[0]) == 300_000


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
    with loop_device(lvm_disk.path, SRV.offset(pv.start), SRV.size, read_only=True) as device:
        point = kernel_mounted(device, "xfs", tmp_path / "srv", read_only=True)
        try:
            original = (point / "www" / "index.html").read_bytes()
        finally:
            run("umount", point)
    imaging("extract", lvm_image, "vg0/srv", "/www/index.html", "--to", tmp_path / "srv-out")
    assert (tmp_path / "srv-out" / "index.html").read_bytes() == original
    missing = imaging("files", lvm_image, "vg0/swap", "/", check=False)
    assert one_error_line(missing) == (
        f"imaging: error: {lvm_image} has no logical volume vg0/swap that is linear on the "
        "disk (its volumes: vg0/home, vg0/root, vg0/srv)")
    nowhere = imaging("files", lvm_image, "vg0/root", "/no/such", check=False)
    assert one_error_line(nowhere) == \
        "imaging: error: /no: no such file or directory in volume vg0/root"


def test_the_image_s_read_only_view_shows_each_volume_as_a_file(lvm_disk, lvm_image):
    pv = lvm_disk.partitions[1]
    image = Image.open(lvm_image)
    with privately_mounted(image) as exposure:
        assert sorted(path.name for path in exposure.root.iterdir()) == \
            ["disk", "p1", "p2", "vg0-home", "vg0-root", "vg0-srv"]
        for volume in (ROOT, HOME, SRV):
            view = (exposure.root / f"vg0-{volume.name}").read_bytes()
            assert hashlib.sha256(view).hexdigest() == \
                sha256_of_range(lvm_disk.path, volume.offset(pv.start), volume.size)


GROUP_TEXT = """
vg1 {
    extent_size = 8192   # 4 MiB
    physical_volumes {
        pv0 { id = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa" pe_start = 2048 pe_count = 100 }
        pv1 { id = "bbbbbb-bbbb-bbbb-bbbb-bbbb-bbbb-bbbbbb" pe_start = 2048 pe_count = 100 }
    }
    logical_volumes {
        plain { status = ["READ", "WRITE", "VISIBLE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 10 type = "striped" stripe_count = 1
                       stripes = ["pv0", 5] } }
        split { status = ["READ", "WRITE", "VISIBLE"] segment_count = 2
            segment1 { start_extent = 0 extent_count = 2 type = "striped" stripe_count = 1
                       stripes = ["pv0", 20] }
            segment2 { start_extent = 2 extent_count = 2 type = "striped" stripe_count = 1
                       stripes = ["pv0", 30] } }
        wide { status = ["READ", "WRITE", "VISIBLE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 8 type = "striped" stripe_count = 2
                       stripe_size = 128 stripes = ["pv0", 40, "pv1", 0] } }
        pool_tdata { status = ["READ", "WRITE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 6 type = "striped" stripe_count = 1
                       stripes = ["pv0", 50] } }
        pool { status = ["READ", "WRITE", "VISIBLE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 6 type = "thin-pool"
                       data = "pool_tdata" } }
        thin { status = ["READ", "WRITE", "VISIBLE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 25 type = "thin" thin_pool = "pool" } }
        pvmove0 { status = ["READ", "WRITE", "PVMOVE"] segment_count = 1
            segment1 { start_extent = 0 extent_count = 3 type = "mirror" mirror_count = 2
                       mirrors = ["pv1", 10, "pv0", 60] } }
    }
}
"""
PV_SIZE = MiB + 100 * EXTENT


def test_volumes_that_are_not_one_range_are_named_for_what_they_are():
    pv = lvm.described(GROUP_TEXT, "a" * 32, PV_SIZE)
    layouts = {volume.name: volume.layout for volume in pv.volumes}
    assert layouts == {"vg1/plain": "linear", "vg1/split": "linear in 2 segments",
                       "vg1/wide": "striped over 2 PVs",
                       "vg1/pool_tdata": "part of thin-pool volume pool",
                       "vg1/pvmove0": "a hidden volume"}
    volumes = {volume.name: volume for volume in pv.volumes}
    assert (volumes["vg1/plain"].pieces, volumes["vg1/plain"].size) == \
        (((MiB + 5 * EXTENT, 10 * EXTENT),), 10 * EXTENT)
    assert volumes["vg1/split"].pieces == ((MiB + 20 * EXTENT, 2 * EXTENT),
                                           (MiB + 30 * EXTENT, 2 * EXTENT))
    assert not volumes["vg1/split"].contiguous and volumes["vg1/plain"].contiguous
    assert volumes["vg1/wide"].pieces == ()
    # Extents any volume holds (a pvmove's too) are never skipped.
    assert pv.free() == [(MiB + first * EXTENT, count * EXTENT)
                         for first, count in ((0, 5), (15, 5), (22, 8), (32, 8), (44, 6),
                                              (56, 4), (63, 37))]
    with pytest.raises(lvm.LvmError, match="does not describe this PV"):
        lvm.described(GROUP_TEXT, "c" * 32, PV_SIZE)


@pytest.mark.parametrize("change, problem", [
    (("pe_start = 2048 pe_count = 100 }\n        pv1", "pe_start = 0 pe_count = 100 }\n        pv1"),
     "do not fit in it"),
    (("pe_count = 100 }\n        pv1", "pe_count = 101 }\n        pv1"), "do not fit in it"),
    (('stripes = ["pv0", 5]', 'stripes = ["pv0", 95]'), "past the PV's last extent"),
    (('stripes = ["pv0", 20]', 'stripes = ["pv0", 8]'), "claim the same extents"),
    (('type = "thin" ', 'type = "shiny" '), "segment of type 'shiny'"),
    (('stripes = ["pv0", 5]', 'stripes = 5'), "does not describe this PV"),
    (('extent_count = 10', 'extent_count = "ten"'), "does not describe this PV"),
    (('extent_count = 10', 'extent_count = 0'), "does not describe this PV"),
    (("start_extent = 2 extent_count = 2", "start_extent = 3 extent_count = 2"),
     "do not follow one another"),
    (("extent_size = 8192", "extent_size = -8192"), "does not describe this PV"),
    (("extent_size = 8192", "extent_size = 1" + "0" * 30), "unreadable metadata"),
    (("vg1 {", "x { " * 20 + "vg1 {"), "nests deeper"),
    (('status = ["READ", "WRITE", "VISIBLE"] segment_count = 2', '[1] segment_count = 2'),
     "a list without a name"),
])
def test_metadata_that_does_not_add_up_is_one_error_never_a_crash(change, problem):
    old, new = change
    assert old in GROUP_TEXT
    with pytest.raises(lvm.LvmError, match=re.escape(problem)):
        lvm.described(GROUP_TEXT.replace(old, new, 1), "a" * 32, PV_SIZE)


# 48 MiB whose second half lies before its first, as an lvextend after another volume took
# the extents that followed leaves it.
VAR = Volume("var", 8, 6, more=((0, 6),))
# Larger than either half: it has to cross from the first segment into the second.
BIG_FILE = 25 * MiB


@pytest.fixture(scope="module")
def extended_disk(tmp_path_factory):
    """A PV of vg0 holding var (ext4) in two segments, stale random bytes around them; and
    var's filesystem as one file."""
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("lvm-extended")
    disk = build_disk(folder / "disk.img", 80 * MiB, "gpt", [PartSpec(72 * MiB, "empty")],
                      seed=22, tail_noise=False)
    pv = disk.partitions[0]
    rng = random.Random(22)
    with open(disk.path, "r+b") as image:
        image.seek(pv.start)
        image.write(rng.randbytes(pv.size))
    make_physical_volume(disk.path, pv.start, pv.size, "vg0", [VAR], folder)
    volume = folder / "var.ext4"
    volume.write_bytes(b"")
    os.truncate(volume, VAR.size)
    _fill_partition(volume, Part(1, 0, VAR.size, "ext4"), rng)
    with loop_device(volume) as device, mounted(device, folder / "var") as root:
        (root / "big.bin").write_bytes(rng.randbytes(BIG_FILE))
    content = volume.read_bytes()
    with open(disk.path, "r+b") as image:
        done = 0
        for start, length in VAR.pieces(pv.start):
            image.seek(start)
            image.write(content[done:done + length])
            done += length
    return disk, volume


def test_a_volume_in_two_segments_is_read_with_its_segments_in_order(extended_disk, tmp_path):
    disk, volume = extended_disk
    raw = backup(str(disk.path), tmp_path / "raw", disk_id="d").image
    with privately_mounted(Image.open(raw)) as exposure:
        assert (exposure.root / "vg0-var").read_bytes() == volume.read_bytes()
    listing = json.loads(imaging("files", raw, "vg0/var", "/", "--json").stdout)
    with loop_device(volume, read_only=True) as device, \
            mounted(device, tmp_path / "var", read_only=True) as original:
        assert sorted(entry["name"] for entry in listing["entries"]) == \
            sorted(path.name for path in original.iterdir())
        imaging("extract", raw, "vg0/var", "/big.bin", "--to", tmp_path / "out")
        assert (tmp_path / "out" / "big.bin").read_bytes() == \
            (original / "big.bin").read_bytes()
    # Used mode stores it in full, saying why; the restore puts each segment back.
    used = backup(str(disk.path), tmp_path / "used", disk_id="d", mode="used")
    entry, = read_manifest(Datastore.open(tmp_path / "used"), used.image).partitions[0]["volumes"]
    assert (entry["name"], entry["mapped"], entry["linear"]) == \
        ("vg0/var", "full: linear in 2 segments", True)
    target = tmp_path / "restored.img"
    target.write_bytes(b"")
    os.truncate(target, disk.path.stat().st_size)
    restore(used.image, str(target), allowed_targets=[str(target)])
    for start, length in VAR.pieces(disk.partitions[0].start):
        assert sha256_of_range(target, start, length) == sha256_of_range(disk.path, start, length)
