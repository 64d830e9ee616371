"""`used` mode: only the blocks filesystems use are read, and nothing of value is lost.

Restored filesystems must pass their own checkers and hold the same files
(content and metadata) as the source; swap keeps its header, and everything
outside the partitions, or in partitions nobody can map, is byte-identical.
"""
from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from engine import MiB, imaging, last_line, one_error_line, sha256_of
from support.devices import loop_device, mounted, requires_loop, run
from support.disks import DELETED_FILE_MARKER, Disk, PartSpec, build_disk, make_luks

from imaging.datastore.image import Image
from imaging.disks import usedmap
from imaging.disks.device import Source

MTOOLS_ENV = dict(os.environ, MTOOLS_SKIP_CHECK="1")


@pytest.fixture
def loop_available():
    requires_loop()


def _build(folder: Path, label: str) -> Disk:
    specs = {
        "gpt": [PartSpec(40 * MiB, "ext4"), PartSpec(36 * MiB, "fat32", gap_before=2 * MiB),
                PartSpec(16 * MiB, "swap"), PartSpec(4 * MiB, "raw-noise"),
                PartSpec(4 * MiB, "raw-noise", gap_before=MiB)],
        "dos": [PartSpec(8 * MiB, "fat16"), PartSpec(24 * MiB, "ext4", gap_before=3 * MiB),
                PartSpec(8 * MiB, "swap"), PartSpec(34 * MiB, "fat32")],
    }[label]
    disk = build_disk(folder / f"{label}.img", 128 * MiB, label, specs, seed=7)
    if label == "gpt":
        # Partition 4 is encrypted: a LUKS2 header made by cryptsetup over its noise.
        make_luks(disk.path, disk.partitions[3], folder)
    return disk


@pytest.fixture(scope="module", params=["gpt", "dos"])
def restored(request, tmp_path_factory):
    """(disk, manifest, restored image path) of a used-mode backup and restore."""
    requires_loop()
    folder = tmp_path_factory.mktemp(f"used-{request.param}")
    disk = _build(folder, request.param)
    loops_before = _loops_over(disk.path)
    result = imaging("backup", disk.path, "--store", folder / "store", "--mode", "used", "--json")
    assert _loops_over(disk.path) == loops_before, "the backup left loop devices behind"
    summary = json.loads(last_line(result.stdout))
    target = folder / "restored.img"
    imaging("restore", summary["image"], target)
    manifest = Image.open(summary["image"]).manifest.as_dict()
    assert summary["sha256"] == manifest["sha256"] == sha256_of(target)
    return disk, manifest, target


def _loops_over(path: Path) -> str:
    return run("losetup", "--noheadings", "--associated", path)


def test_manifest_records_how_each_partition_was_mapped(restored):
    disk, manifest, _ = restored
    assert manifest["mode"] == "used"
    kinds = {part.number: part.fstype for part in disk.partitions}
    by_number = {entry["number"]: entry for entry in manifest["partitions"]}
    assert set(by_number) == set(kinds)
    expected = {"ext4": ("ext4", "dumpe2fs"), "fat32": ("vfat", "partclone"),
                "fat16": ("vfat", "partclone"), "swap": ("swap", "swap-header")}
    for number, kind in kinds.items():
        entry = by_number[number]
        part = disk.partitions[number - 1]
        assert (entry["start"], entry["size"]) == (part.start, part.size)
        if kind in expected:
            assert (entry["filesystem"], entry["mapped"]) == expected[kind]
            assert 0 < entry["used_bytes"] < part.size
        else:
            assert entry["mapped"].startswith("full: ")
            assert entry["used_bytes"] == part.size
    if disk.label == "gpt":
        assert by_number[4]["mapped"] == \
            "full: encrypted (LUKS2): its files need its passphrase"
        assert by_number[5]["mapped"] == "full: no filesystem recognised"
    swap = next(e for e in manifest["partitions"] if e["filesystem"] == "swap")
    assert swap["used_bytes"] == 4096


def test_read_map_is_merged_and_adds_up(restored):
    disk, manifest, _ = restored
    read_map = manifest["read_map"]
    for (start, size), (next_start, _) in zip(read_map, read_map[1:]):
        assert size > 0 and start + size < next_start, "ranges overlap or touch"
    outside_partitions = disk.size - sum(part.size for part in disk.partitions)
    used = sum(entry["used_bytes"] for entry in manifest["partitions"])
    assert manifest["read_bytes"] == sum(size for _, size in read_map) == outside_partitions + used


def test_everything_outside_the_mapped_partitions_is_byte_identical(restored):
    disk, manifest, target = restored
    mapped = [e for e in manifest["partitions"] if not e["mapped"].startswith("full: ")]
    kept, cursor = [], 0
    for entry in sorted(mapped, key=lambda e: e["start"]):
        kept.append((cursor, entry["start"] - cursor))
        cursor = entry["start"] + entry["size"]
    kept.append((cursor, disk.size - cursor))
    assert any(size for _, size in disk.unpartitioned_data), "the disk has data between partitions"
    with open(disk.path, "rb") as source, open(target, "rb") as copy:
        for start, size in kept:
            source.seek(start)
            copy.seek(start)
            assert source.read(size) == copy.read(size), f"bytes {start}+{size} differ"


def test_free_space_comes_back_as_zeros(restored):
    disk, _, target = restored
    source_bytes, restored_bytes = disk.path.read_bytes(), target.read_bytes()
    for part in disk.partitions:
        if part.fstype in ("ext4", "fat32", "fat16"):
            assert DELETED_FILE_MARKER in source_bytes[part.start:part.end]
            assert DELETED_FILE_MARKER not in restored_bytes[part.start:part.end], (
                f"partition {part.number}: deleted data was read, not skipped")


def test_filesystems_pass_their_checkers_and_hold_the_same_files(restored, tmp_path):
    disk, _, target = restored
    for part in disk.partitions:
        if part.fstype == "ext4":
            with loop_device(target, part.start, part.size, read_only=True) as device:
                fsck = subprocess.run(["e2fsck", "-fn", device], capture_output=True, text=True)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            assert _ext4_files(target, part, tmp_path) == _ext4_files(disk.path, part, tmp_path)
        elif part.fstype in ("fat32", "fat16"):
            with loop_device(target, part.start, part.size, read_only=True) as device:
                fsck = subprocess.run(["fsck.vfat", "-n", device], capture_output=True, text=True)
                assert fsck.returncode == 0, fsck.stdout + fsck.stderr
            assert (_fat_files(target, part, tmp_path / f"p{part.number}-restored")
                    == _fat_files(disk.path, part, tmp_path / f"p{part.number}-source"))


def test_swap_keeps_a_valid_signature(restored):
    disk, _, target = restored
    for part in disk.partitions:
        if part.fstype == "swap":
            probes = [run("blkid", "-p", "-o", "export", "-O", part.start, "--size", part.size, image)
                      for image in (disk.path, target)]
            assert "TYPE=swap" in probes[1]
            assert probes[0].replace(str(disk.path), "") == probes[1].replace(str(target), "")


def _ext4_files(image: Path, part, scratch: Path) -> dict:
    """Every entry's metadata and content digest, from a read-only mount."""
    with loop_device(image, part.start, part.size, read_only=True) as device, \
            mounted(device, scratch / "mnt", read_only=True) as root:
        entries = {}
        for path in sorted(root.rglob("*")):
            info = path.lstat()
            if stat.S_ISREG(info.st_mode):
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            elif stat.S_ISLNK(info.st_mode):
                content = os.readlink(path)
            else:
                content = None
            xattrs = {name: os.getxattr(path, name, follow_symlinks=False)
                      for name in os.listxattr(path, follow_symlinks=False)}
            entries[str(path.relative_to(root))] = (
                info.st_mode, info.st_uid, info.st_gid, info.st_size, info.st_nlink,
                info.st_ino, info.st_mtime_ns, info.st_ctime_ns, xattrs, content)
        assert len(entries) > 10
        return entries


def _fat_files(image: Path, part, scratch: Path) -> tuple[str, dict]:
    """(mtools' recursive listing with names, sizes and times; content digest per file)."""
    drive = f"{image}@@{part.start}"
    listing = subprocess.run(["mdir", "-/", "-a", "-i", drive, "::"], env=MTOOLS_ENV,
                             capture_output=True, text=True, check=True).stdout
    scratch.mkdir(parents=True)
    subprocess.run(["mcopy", "-s", "-m", "-n", "-i", drive, "::*", str(scratch)],
                   env=MTOOLS_ENV, capture_output=True, check=True)
    contents = {str(p.relative_to(scratch)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(scratch.rglob("*")) if p.is_file()}
    assert len(contents) > 10
    return listing, contents


@pytest.mark.parametrize("mkfs", [
    ["mkfs.ext4", "-b", "1024"],
    ["mkfs.ext4", "-b", "4096"],
    ["mkfs.ext4", "-b", "4096", "-O", "bigalloc", "-C", "16384"],
    ["mkfs.ext3"],
    ["mkfs.ext2"],
], ids=["ext4-1k", "ext4-4k", "ext4-bigalloc", "ext3", "ext2"])
def test_dumpe2fs_map_equals_partclones(mkfs, loop_available, tmp_path):
    image = tmp_path / "fs.img"
    with open(image, "wb") as handle:
        handle.truncate(96 * MiB)
    run(*mkfs, "-q", "-F", "-E", "nodiscard", image)
    with loop_device(image) as device, mounted(device, tmp_path / "mnt") as root:
        for number in range(40):
            (root / f"file{number}").write_bytes(os.urandom(number * 37 * 1024))
        for number in range(0, 40, 3):
            (root / f"file{number}").unlink()
    size = image.stat().st_size
    summary = dict(line.split(":", 1) for line in run("dumpe2fs", "-h", image).splitlines()
                   if ":" in line)
    free_bytes = int(summary["Free blocks"]) * int(summary["Block size"])
    with loop_device(image, read_only=True) as device:
        from_dumpe2fs = usedmap.ext_free(device, 0, size)
        assert sum(n for _, n in from_dumpe2fs) == free_bytes > size // 4
        # partclone 0.3 counts bigalloc clusters as blocks and refuses the filesystem.
        if "bigalloc" not in mkfs:
            assert from_dumpe2fs == usedmap.partclone_free("extfs", device, 0, size)


def test_logical_partitions_are_mapped_and_the_extended_one_kept_around_them(
        loop_available, tmp_path):
    disk = tmp_path / "extended.img"
    with open(disk, "wb") as handle:
        handle.write(os.urandom(64 * MiB))
    run("sfdisk", "--quiet", disk, input=b"label: dos\nstart=2048, size=16MiB, type=83\n"
        b"start=34816, type=5\nsize=20MiB, type=83\nsize=8MiB, type=82\n")
    logical = (36864 * 512, 20 * MiB)
    with loop_device(disk, *logical) as device:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard", device)
        with mounted(device, tmp_path / "mnt") as root:
            (root / "file").write_bytes(os.urandom(MiB))
    result = imaging("backup", disk, "--store", tmp_path / "store", "--mode", "used", "--json")
    image = json.loads(last_line(result.stdout))["image"]
    imaging("restore", image, tmp_path / "restored.img")
    mapped = {e["number"]: e["mapped"] for e in Image.open(image).manifest.partitions}
    assert mapped[2] == usedmap.METHOD_EXTENDED and mapped[5] == "dumpe2fs"
    source, restored = disk.read_bytes(), (tmp_path / "restored.img").read_bytes()
    # The EBRs and the noise around them, inside the extended partition.
    assert source[34816 * 512:logical[0]] == restored[34816 * 512:logical[0]]
    assert source[sum(logical):79872 * 512] == restored[sum(logical):79872 * 512]
    assert source[logical[0]:sum(logical)] != restored[logical[0]:sum(logical)]
    with loop_device(tmp_path / "restored.img", *logical, read_only=True) as device:
        run("e2fsck", "-fn", device)


def test_read_write_mounted_disk_is_refused_unless_forced(loop_available, tmp_path):
    disk = build_disk(tmp_path / "disk.img", 32 * MiB, "dos", [PartSpec(24 * MiB, "ext4")])
    ext4 = disk.partitions[0]
    store = tmp_path / "store"
    with loop_device(disk.path, ext4.start, ext4.size) as device, \
            mounted(device, tmp_path / "mnt"):
        refusal = one_error_line(imaging("backup", disk.path, "--store", store, "--mode", "used",
                                         check=False))
        assert "mounted read-write" in refusal and "--force" in refusal
        assert not list(store.glob("images/*/*/manifest.json"))
        forced = json.loads(last_line(imaging("backup", disk.path, "--store", store, "--mode",
                                              "used", "--force", "--json").stdout))
        imaging("backup", disk.path, "--store", store, "--mode", "raw", "--force")
    manifest = Image.open(forced["image"]).manifest.as_dict()
    assert str(tmp_path / "mnt") in manifest["forced_past_mount"]
    # A mounted ext4 has an unreplayed journal: its bitmaps are not trusted.
    assert manifest["partitions"][0]["mapped"].startswith("full: ")


def test_read_only_mount_is_no_obstacle(loop_available, tmp_path):
    disk = build_disk(tmp_path / "disk.img", 32 * MiB, "dos", [PartSpec(24 * MiB, "ext4")])
    ext4 = disk.partitions[0]
    with loop_device(disk.path, ext4.start, ext4.size, read_only=True) as device, \
            mounted(device, tmp_path / "mnt", read_only=True):
        result = imaging("backup", disk.path, "--store", tmp_path / "store", "--mode", "used",
                         "--json")
    manifest = Image.open(json.loads(last_line(result.stdout))["image"]).manifest.as_dict()
    assert manifest["partitions"][0]["mapped"] == "dumpe2fs"


@pytest.mark.parametrize("page_size", [4096, 65536])
def test_swap_keeps_exactly_its_header_page(page_size, tmp_path):
    image = tmp_path / "swap.img"
    with open(image, "wb") as handle:
        handle.write(os.urandom(4 * MiB))
    run("mkswap", "--pagesize", page_size, image)
    with Source.open(str(image)) as source:
        assert usedmap.swap_free(source, 0, source.size) == [(page_size, source.size - page_size)]


def test_plan_slices_its_ranges_per_chunk():
    plan = usedmap.UsedPlan([(0, 10), (20, 5), (40, 30)], [])
    assert plan.wanted(0, 16) == [(0, 10)]
    assert plan.wanted(16, 16) == [(20, 5)]
    assert plan.wanted(32, 16) == [(40, 8)]
    assert plan.wanted(48, 16) == [(48, 16)]
    assert plan.wanted(80, 16) == []


def _part(start, size, free, mapped="partclone"):
    return usedmap.PartitionMap(1, start, size, "vfat", mapped, free)


def test_only_what_a_filesystem_calls_free_and_nobody_needs_is_skipped():
    maps = [
        _part(1024, 4096, [(2048, 1024), (4096, 1024)]),
        # Overlaps the first partition's free block at 4096 and needs it.
        _part(4096, 2048, [], mapped="full: no filesystem recognised"),
        # An extended partition holds others and decides nothing itself.
        _part(6144, 4096, [], mapped=usedmap.METHOD_EXTENDED),
        # Free space that is not sector aligned shrinks to whole sectors.
        _part(7168, 2048, [(7200, 1000)]),
    ]
    assert usedmap.read_ranges(12288, 512, maps) == [(0, 2048), (3072, 4608), (8192, 4096)]


def test_domain_maps_parse_used_and_unused_ranges():
    text = ("# Domain logfile created by partclone\n# current_pos  current_status\n"
            "0x00300000     ?\n#      pos        size  status\n"
            "0x00100000  0x00001000  +\n0x00101000  0x00100000  ?\n0x00201000  0x000FF000  +\n")
    free, used = usedmap.parse_domain(text)
    assert free == [(0x101000, 0x100000)]
    assert used == [(0x100000, 0x1000), (0x201000, 0xFF000)]
