"""Proof that the shared test support does what the other tests rely on."""

import errno
import json
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from support.devices import (
    detach_leaked_loops,
    loop_device,
    loops_attached_to,
    mounted,
    requires_loop,
    requires_root_loop_fuse,
    run,
)
from support.disks import DELETED_FILE_MARKER, MiB, PartSpec, build_disk
from support.faulty import (
    SECTOR,
    ddrescue_bad_ranges,
    faulty_disk,
    merge_ranges,
    round_out_to_sectors,
)


def noise_file(path, size, seed=0):
    data = random.Random(seed).randbytes(size)
    path.write_bytes(data)
    return data


def read_device(device):
    with open(device, "rb") as block_device:
        return block_device.read()


def mounted_on(mountpoint):
    with open("/proc/self/mountinfo") as mountinfo:
        return any(line.split()[4] == str(mountpoint) for line in mountinfo)


# --- loop devices and mounts ---------------------------------------------------


def test_loop_device_exposes_exactly_the_requested_byte_range(workdir):
    requires_loop()
    image = workdir / "noise.img"
    data = noise_file(image, 4 * MiB)
    with loop_device(image, offset=MiB, sizelimit=2 * MiB) as device:
        assert device.startswith("/dev/loop")
        assert loops_attached_to(image) == [device]
        assert read_device(device) == data[MiB : 3 * MiB]
    assert loops_attached_to(image) == []


def test_read_only_loop_device_refuses_writes(workdir):
    requires_loop()
    image = workdir / "noise.img"
    data = noise_file(image, MiB)
    with loop_device(image, read_only=True) as device:
        descriptor = os.open(device, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as refused:
                os.write(descriptor, b"\0" * SECTOR)
            assert refused.value.errno == errno.EPERM
        finally:
            os.close(descriptor)
    assert image.read_bytes() == data


def test_loop_device_is_detached_when_the_body_raises(workdir):
    requires_loop()
    image = workdir / "noise.img"
    noise_file(image, MiB)
    with pytest.raises(ZeroDivisionError):
        with loop_device(image):
            assert len(loops_attached_to(image)) == 1
            1 / 0
    assert loops_attached_to(image) == []


def test_detach_leaked_loops_detaches_ours_and_leaves_others_alone(workdir):
    requires_loop()
    ours, foreign = workdir / "ours.img", workdir / "foreign.img"
    noise_file(ours, MiB)
    noise_file(foreign, MiB)
    # Keep the context manager referenced: collecting it would run its cleanup.
    leaked = loop_device(ours)
    leaked_device = leaked.__enter__()
    foreign_device = run("losetup", "-f", "--show", foreign).strip()
    try:
        assert detach_leaked_loops() == [leaked_device]
        assert loops_attached_to(ours) == []
        assert loops_attached_to(foreign) == [foreign_device]
        assert detach_leaked_loops() == []
    finally:
        run("losetup", "-d", foreign_device)


def test_detach_leaked_loops_skips_a_device_number_now_serving_someone_else(workdir):
    requires_loop()
    ours, foreign = workdir / "ours.img", workdir / "foreign.img"
    noise_file(ours, MiB)
    noise_file(foreign, MiB)
    leaked = loop_device(ours)
    leaked_device = leaked.__enter__()
    run("losetup", "-d", leaked_device)
    # Reattach under the very same number, as another process might.
    run("losetup", leaked_device, foreign)
    try:
        assert detach_leaked_loops() == []
        assert loops_attached_to(foreign) == [leaked_device]
    finally:
        run("losetup", "-d", leaked_device)


def test_mounted_ext4_is_writable_then_read_only_and_always_unmounted(workdir):
    requires_loop()
    image = workdir / "ext4.img"
    image.write_bytes(b"")
    os.truncate(image, 16 * MiB)
    run("mkfs.ext4", "-q", "-F", image)
    mountpoint = workdir / "mnt"
    with loop_device(image) as device:
        with mounted(device, mountpoint) as root:
            assert mounted_on(mountpoint)
            (root / "hello.txt").write_text("hello")
        assert not mounted_on(mountpoint)
        with pytest.raises(RuntimeError, match="boom"):
            with mounted(device, mountpoint, read_only=True) as root:
                assert (root / "hello.txt").read_text() == "hello"
                with pytest.raises(OSError) as refused:
                    (root / "other.txt").write_text("x")
                assert refused.value.errno == errno.EROFS
                raise RuntimeError("boom")
        assert not mounted_on(mountpoint)


# --- disk images -----------------------------------------------------------------

MIXED_LAYOUT = [
    PartSpec(24 * MiB, "ext4"),
    PartSpec(34 * MiB, "fat32", gap_before=MiB),
    PartSpec(8 * MiB, "fat16"),
    PartSpec(8 * MiB, "swap", gap_before=512 * 1024),
]
EXPECTED_TYPES = {
    "dos": ["83", "C", "E", "82"],
    "gpt": [
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F",
    ],
}


@pytest.fixture(scope="module", params=["dos", "gpt"])
def mixed_disk(request, tmp_path_factory):
    requires_loop()
    label = request.param
    path = tmp_path_factory.mktemp("disks") / f"mixed-{label}.img"
    return build_disk(path, 96 * MiB, label, MIXED_LAYOUT)


def blkid(device, tag):
    return run("blkid", "-p", "-s", tag, "-o", "value", device).strip()


def looks_random(data):
    return len(set(data[:4096])) > 200 and data.count(0) < len(data) // 100


def test_partition_table_is_what_build_disk_reports(mixed_disk):
    table = json.loads(run("sfdisk", "--json", mixed_disk.path))["partitiontable"]
    assert table["label"] == mixed_disk.label
    assert [(p["start"] * SECTOR, p["size"] * SECTOR) for p in table["partitions"]] == [
        (p.start, p.size) for p in mixed_disk.partitions
    ]
    assert [p["type"].upper() for p in table["partitions"]] == EXPECTED_TYPES[mixed_disk.label]
    assert [p.number for p in mixed_disk.partitions] == [1, 2, 3, 4]
    assert [p.fstype for p in mixed_disk.partitions] == ["ext4", "fat32", "fat16", "swap"]
    assert os.path.getsize(mixed_disk.path) == mixed_disk.size == 96 * MiB


def test_ext4_partition_holds_real_files_and_deleted_data(mixed_disk, workdir):
    ext4 = mixed_disk.partitions[0]
    with loop_device(mixed_disk.path, ext4.start, ext4.size, read_only=True) as device:
        assert blkid(device, "TYPE") == "ext4"
        subprocess.run(["e2fsck", "-fn", device], check=True, capture_output=True)
        with mounted(device, workdir / "mnt", read_only=True) as root:
            files = [p for p in root.rglob("*.py") if p.is_file()]
            assert len(files) > 50
            assert sum(p.stat().st_size for p in files) > ext4.size // 8
            assert not (root / "deleted.bin").exists()
        assert read_device(device).count(DELETED_FILE_MARKER) >= 100


@pytest.mark.parametrize("index, version", [(1, "FAT32"), (2, "FAT16")])
def test_fat_partitions_hold_real_files_and_deleted_data(mixed_disk, index, version):
    fat = mixed_disk.partitions[index]
    with loop_device(mixed_disk.path, fat.start, fat.size, read_only=True) as device:
        assert blkid(device, "VERSION") == version
        subprocess.run(["fsck.fat", "-n", device], check=True, capture_output=True)
        content = read_device(device)
    listing = run("env", "MTOOLS_SKIP_CHECK=1", "mdir", "-/", "-b",
                  "-i", f"{mixed_disk.path}@@{fat.start}", "::/").split()
    assert sum(name.endswith(".py") for name in listing) > 20
    assert not any(name.endswith("deleted.bin") for name in listing)
    assert content.count(DELETED_FILE_MARKER) >= 100


def test_swap_partition_has_a_valid_header_and_noise_after_it(mixed_disk):
    swap = mixed_disk.partitions[3]
    page_size = os.sysconf("SC_PAGE_SIZE")
    with loop_device(mixed_disk.path, swap.start, swap.size, read_only=True) as device:
        assert blkid(device, "TYPE") == "swap"
        content = read_device(device)
    assert content[page_size - 10 : page_size] == b"SWAPSPACE2"
    assert looks_random(content[page_size:])


def test_gaps_and_tail_hold_random_data_and_the_backup_gpt_survives(mixed_disk):
    image = mixed_disk.path.read_bytes()
    gaps = mixed_disk.unpartitioned_data
    parts = mixed_disk.partitions
    assert gaps[:2] == [(parts[1].start - MiB, MiB), (parts[3].start - 512 * 1024, 512 * 1024)]
    tail_start, tail_size = gaps[2]
    assert tail_start == parts[3].end
    for start, size in gaps:
        assert looks_random(image[start : start + size])
    if mixed_disk.label == "gpt":
        assert tail_start + tail_size == mixed_disk.size - 33 * SECTOR
        assert image[-SECTOR : -SECTOR + 8] == b"EFI PART"
    else:
        assert tail_start + tail_size == mixed_disk.size
    assert image[510:512] == b"\x55\xaa"


def test_same_seed_builds_identical_noise_disks(disk_factory):
    layout = [PartSpec(4 * MiB, "raw-noise"), PartSpec(4 * MiB, "empty", gap_before=MiB)]
    first = disk_factory("first.img", 32 * MiB, "gpt", layout, seed=7)
    again = disk_factory("again.img", 32 * MiB, "gpt", layout, seed=7)
    other = disk_factory("other.img", 32 * MiB, "gpt", layout, seed=8)
    assert first.path.read_bytes() == again.path.read_bytes()
    noise, empty = first.partitions
    content = first.path.read_bytes()
    assert looks_random(content[noise.start : noise.end])
    assert content[empty.start : empty.end] == bytes(empty.size)
    other_content = other.path.read_bytes()
    assert other_content[noise.start : noise.end] != content[noise.start : noise.end]


def test_empty_tail_when_tail_noise_is_off(disk_factory):
    disk = disk_factory("plain.img", 32 * MiB, "dos", [PartSpec(8 * MiB, "raw-noise")],
                        tail_noise=False)
    assert disk.unpartitioned_data == []
    assert disk.path.read_bytes()[disk.partitions[0].end :] == bytes(23 * MiB)


@pytest.mark.parametrize(
    "size, label, partitions, complaint",
    [
        (32 * MiB + 1, "dos", [], "multiple of 512"),
        (32 * MiB, "dos", [PartSpec(MiB, "empty")] * 5, "at most 4"),
        (32 * MiB, "dos", [PartSpec(16 * MiB, "fat32")], "fat32 needs"),
        (32 * MiB, "gpt", [PartSpec(MiB, "btrfs")], "unknown partition kind"),
        (32 * MiB, "gpt", [PartSpec(1000, "empty")], "multiples of 512"),
        (32 * MiB, "gpt", [PartSpec(31 * MiB, "empty")], "past the usable end"),
    ],
)
def test_build_disk_rejects_impossible_layouts(workdir, size, label, partitions, complaint):
    with pytest.raises(ValueError, match=complaint):
        build_disk(workdir / "bad.img", size, label, partitions)
    assert not (workdir / "bad.img").exists()


# --- faulty disk -------------------------------------------------------------------

# Sector-aligned, multi-sector, inside one sector, and straddling two sectors.
BAD_RANGES = [(MiB, 512), (2 * MiB, 4096), (3 * MiB + 100, 10), (5 * MiB - 256, 512)]
EXPECTED_BAD_SECTORS = [(MiB, 512), (2 * MiB, 4096), (3 * MiB, 512), (5 * MiB - 512, 1024)]


def direct_read(descriptor, buffer, offset):
    """One O_DIRECT read into the (page-aligned) mmap buffer; returns the bytes."""
    view = memoryview(buffer)
    try:
        count = os.preadv(descriptor, [view], offset)
        return bytes(view[:count])
    finally:
        view.release()


def test_faulty_disk_fails_direct_reads_exactly_on_bad_sectors(workdir):
    requires_root_loop_fuse()
    image = workdir / "image.img"
    data = noise_file(image, 8 * MiB)
    chunk_size = 64 * 1024
    bad_sectors = []
    with faulty_disk(image, BAD_RANGES, workdir) as device:
        descriptor = os.open(device, os.O_RDONLY | os.O_DIRECT)
        chunk, sector = mmap.mmap(-1, chunk_size), mmap.mmap(-1, SECTOR)
        try:
            for chunk_offset in range(0, len(data), chunk_size):
                try:
                    got = direct_read(descriptor, chunk, chunk_offset)
                    assert got == data[chunk_offset : chunk_offset + chunk_size]
                    continue
                except OSError as failure:
                    assert failure.errno == errno.EIO
                for offset in range(chunk_offset, chunk_offset + chunk_size, SECTOR):
                    try:
                        assert direct_read(descriptor, sector, offset) == data[offset : offset + SECTOR]
                    except OSError as failure:
                        assert failure.errno == errno.EIO
                        bad_sectors.append((offset, SECTOR))
        finally:
            os.close(descriptor)
    assert merge_ranges(bad_sectors) == EXPECTED_BAD_SECTORS


def test_faulty_disk_fails_a_buffered_read_over_a_bad_range(workdir):
    requires_root_loop_fuse()
    image = workdir / "image.img"
    noise_file(image, 8 * MiB)
    with faulty_disk(image, BAD_RANGES, workdir) as device:
        descriptor = os.open(device, os.O_RDONLY)
        try:
            with pytest.raises(OSError) as failure:
                # A buffered read returns the good part first; the next one hits the bad page.
                done = 0
                while done < 4 * MiB:
                    done += len(os.pread(descriptor, 4 * MiB - done, done))
            assert failure.value.errno == errno.EIO
        finally:
            os.close(descriptor)


def test_ddrescue_maps_exactly_the_bad_sectors(workdir):
    requires_root_loop_fuse()
    image = workdir / "image.img"
    data = noise_file(image, 8 * MiB)
    rescued, mapfile = workdir / "rescued.img", workdir / "rescued.map"
    with faulty_disk(image, BAD_RANGES, workdir) as device:
        run("ddrescue", "-d", "-b", str(SECTOR), device, rescued, mapfile)
    bad = ddrescue_bad_ranges(mapfile)
    assert bad == round_out_to_sectors(BAD_RANGES) == EXPECTED_BAD_SECTORS
    copy = rescued.read_bytes()
    good_start = 0
    for position, size in bad:
        assert copy[good_start:position] == data[good_start:position]
        good_start = position + size
    assert copy[good_start:] == data[good_start:]


def test_faulty_disk_cleans_up_even_when_the_body_raises(workdir):
    requires_root_loop_fuse()
    image = workdir / "image.img"
    noise_file(image, MiB)
    with pytest.raises(ZeroDivisionError):
        with faulty_disk(image, [(0, SECTOR)], workdir) as device:
            exposed_file = run("losetup", "--noheadings", "--output", "BACK-FILE", device).strip()
            mountpoint = Path(exposed_file).parent
            assert mounted_on(mountpoint)
            1 / 0
    assert not mounted_on(mountpoint)
    assert not mountpoint.exists()
    assert run("losetup", "--noheadings", "--output", "BACK-FILE", device).strip() != exposed_file


def test_faulty_disk_reports_a_program_that_cannot_start(workdir):
    requires_root_loop_fuse()
    image = workdir / "image.img"
    noise_file(image, MiB)
    with pytest.raises(RuntimeError, match="bad ranges must look like"):
        with faulty_disk(image, [(0, "lots")], workdir):
            pass
    assert [p for p in workdir.glob("faulty-*") if p.is_dir()] == []


# --- range helpers -----------------------------------------------------------------


def test_ddrescue_bad_ranges_parses_and_merges_a_mapfile(workdir):
    mapfile = workdir / "hand.map"
    mapfile.write_text(
        "# Mapfile. Created by GNU ddrescue version 1.27\n"
        "# Command line: ddrescue -d /dev/loop0 out.img out.map\n"
        "# current_pos  current_status  current_pass\n"
        "0x00200000     +               1\n"
        "#      pos        size  status\n"
        "0x00000000  0x00100000  +\n"
        "0x00100000  0x00000200  -\n"
        "1049088     512         -\n"
        "0x00100400  0x00000200  /\n"
        "0x00100600  0x000FFA00  +\n"
        "020000000   01000       -\n"
    )
    assert ddrescue_bad_ranges(mapfile) == [(MiB, 1024), (4 * MiB, 512)]


def test_round_out_to_sectors_covers_every_touched_sector():
    assert round_out_to_sectors([(100, 10), (511, 2), (2048, 512), (2560, 1)]) == [
        (0, 1024),
        (2048, 1024),
    ]


# --- missing requirements: skipped here, failed under CI --------------------------

NEEDS_A_FROBNICATOR = '''
from support.requirements import requirement_missing

def test_needs_a_frobnicator():
    requirement_missing("no frobnicator on this machine")
'''


@pytest.mark.parametrize(
    "ci, outcome",
    [(None, "skipped"), ("", "skipped"), ("false", "skipped"), ("0", "skipped"),
     ("true", "failed"), ("1", "failed"), ("yes", "failed")],
)
def test_a_missing_requirement_skips_but_fails_under_ci(workdir, ci, outcome):
    (workdir / "test_frobnicator.py").write_text(NEEDS_A_FROBNICATOR)
    env = {name: value for name, value in os.environ.items() if name != "CI"}
    if ci is not None:
        env["CI"] = ci
    env["PYTHONPATH"] = str(Path(__file__).resolve().parent)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-rsf", "-p", "no:cacheprovider", "-p", "no:django",
         "--rootdir", workdir, workdir / "test_frobnicator.py"],
        cwd=workdir, env=env, capture_output=True, text=True)
    assert f"1 {outcome}" in result.stdout, result.stdout
    assert result.returncode == (1 if outcome == "failed" else 0), result.stdout
    assert "no frobnicator on this machine" in result.stdout
