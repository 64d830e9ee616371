"""One writer for whole disks and single partitions, wherever a partition starts and ends.

A partition is a byte range of the disk that may start and end anywhere inside
a chunk, at any sector. Its restore writes every whole 4096-byte block of the
target past the page cache, as a whole-disk restore does, and only the blocks
that a chunk boundary or the target's end cuts through the page cache. The
read-back compares every piece with the image's own chunk names, reading the
device itself.
"""
from __future__ import annotations

import errno
import os

import pytest
from engine import BLOCK, MiB, cached_blocks, imaging
from support.devices import loop_device, requires_loop, run
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.base.errors import ImageError, TargetError
from imaging.base.progress import Progress
from imaging.datastore.image import Image
from imaging.restore import restore

CHUNK = 256 * 1024
# Sizes and starts in sectors: partition 1 starts 4096 bytes into a chunk and
# ends mid-block; partition 2 starts and ends mid-block; partition 3 is whole
# chunks; partition 4 is 1536 bytes inside one chunk. The disk itself ends
# mid-block.
DISK_SIZE = 9 * MiB + 3 * 512
LAYOUT = [PartSpec(3 * MiB + 5 * 512, "raw-noise", gap_before=BLOCK),
          PartSpec(2 * MiB + 7 * 512, "raw-noise", gap_before=7 * 512),
          PartSpec(CHUNK * 2, "raw-noise", gap_before=1034752),
          PartSpec(3 * 512, "raw-noise", gap_before=3 * 512)]


@pytest.fixture(scope="module")
def disk(tmp_path_factory):
    requires_loop()
    built = build_disk(tmp_path_factory.mktemp("disk") / "disk.img", DISK_SIZE, "dos", LAYOUT,
                       seed=31)
    starts = [part.start for part in built.partitions]
    assert starts[0] % CHUNK == BLOCK and starts[1] % BLOCK and starts[2] % CHUNK == 0
    assert starts[3] // CHUNK == (built.partitions[3].end - 1) // CHUNK
    return built


@pytest.fixture
def image(disk, tmp_path):
    """A fresh image of the disk, in a store of its own (tests damage their store)."""
    return backup(str(disk.path), tmp_path / "store", disk_id="odd", chunk_size=CHUNK).image


def read_range(path, start: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(start)
        return handle.read(size)


def extent(disk, number):
    """(start, size) of partition `number` on the disk, or of the whole disk for None."""
    if number is None:
        return 0, disk.size
    part = disk.partitions[number - 1]
    return part.start, part.size


def pieces(start: int, size: int) -> list[tuple[int, int]]:
    """The target's (first byte, last byte) for each chunk's share of disk bytes start..+size."""
    cuts = [0, *(boundary - start for boundary in range(start // CHUNK * CHUNK + CHUNK,
                                                         start + size, CHUNK)), size]
    return [(first, end - 1) for first, end in zip(cuts, cuts[1:])]


def cut_blocks(start: int, size: int) -> set[int]:
    """The target's 4096-byte blocks that a chunk boundary or the end cuts."""
    return {last // BLOCK for _, last in pieces(start, size) if (last + 1) % BLOCK}


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_a_partition_restores_byte_for_byte_wherever_it_starts_and_ends(disk, image, tmp_path,
                                                                        number):
    start, size = extent(disk, number)
    target = tmp_path / "part.img"
    done = imaging("restore", image, target, "--partition", number)
    assert done.stdout.strip().endswith("verified: every byte matches")
    assert target.read_bytes() == read_range(disk.path, start, size)


@pytest.mark.parametrize("number", [None, 1, 2, 3, 4])
def test_only_blocks_a_chunk_boundary_or_the_end_cuts_go_through_the_page_cache(
        disk, image, tmp_path, number):
    start, size = extent(disk, number)
    target = tmp_path / "restored.img"
    restore(str(image), str(target), verify=False, partition=number)
    assert cached_blocks(target) == cut_blocks(start, size)
    assert target.read_bytes() == read_range(disk.path, start, size)


def test_the_blocks_cut_are_the_ones_expected(disk):
    """What the test above expects, spelled out for each partition."""
    cut = {number: cut_blocks(*extent(disk, number)) for number in (None, 1, 2, 3, 4)}
    assert cut[None] == {DISK_SIZE // BLOCK}
    assert cut[1] == {disk.partitions[0].size // BLOCK}
    assert len(cut[2]) == len(pieces(*extent(disk, 2))) == 9
    assert cut[3] == set() and cut[4] == {0}


@pytest.fixture
def ramfs(tmp_path):
    """A folder on ramfs, which refuses O_DIRECT; unmounted afterwards."""
    folder = tmp_path / "ramfs"
    folder.mkdir()
    run("mount", "-t", "ramfs", "ramfs", folder)
    try:
        probe = folder / "probe"
        probe.touch()
        with pytest.raises(OSError) as refused:
            os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        assert refused.value.errno == errno.EINVAL
        yield folder
    finally:
        run("umount", folder)


@pytest.mark.parametrize("number", [None, 1, 2, 4])
def test_a_target_that_refuses_direct_io_gets_every_byte_through_the_page_cache(
        disk, image, ramfs, number):
    start, size = extent(disk, number)
    target = ramfs / "restored.img"
    result = restore(str(image), str(target), partition=number)
    assert (result.verified, result.size) == (True, size)
    assert read_range(target, 0, size + 1) == read_range(disk.path, start, size)


def replace_chunk_file(image_dir, position: int, by: int) -> str:
    """Put chunk `by`'s file (a valid frame of other bytes) in place of chunk `position`'s."""
    index = Image.open(image_dir).index()
    store = Image.open(image_dir).store
    copy = store.chunk_path(index[position]).with_suffix(".swapped")
    copy.write_bytes(store.chunk_path(index[by]).read_bytes())
    os.replace(copy, store.chunk_path(index[position]))
    return index[position]


@pytest.mark.parametrize("number", [None, 1, 2])
def test_a_chunk_file_holding_another_chunks_bytes_fails_the_read_back(disk, image, tmp_path,
                                                                        number):
    start, size = extent(disk, number)
    position = start // CHUNK + 5  # a whole chunk of noise inside each of these
    replace_chunk_file(image, position, position + 1)
    target = tmp_path / "restored.img"
    with pytest.raises(TargetError) as failed:
        restore(str(image), str(target), partition=number)
    first, last = position * CHUNK - start, (position + 1) * CHUNK - start - 1
    what = (f"the image in chunk {position}" if number is None
            else f"partition {number} of the image")
    assert str(failed.value) == (f"verification failed: {target} differs from {what} "
                                 f"(bytes {first}-{last})")


@pytest.mark.parametrize("edge", ["first", "last"])
def test_a_partition_is_refused_an_edge_chunk_whose_bytes_do_not_match_its_name(
        disk, image, tmp_path, edge):
    part = disk.partitions[1]
    position = part.start // CHUNK if edge == "first" else (part.end - 1) // CHUNK
    digest = replace_chunk_file(image, position, position - 1)
    for verify in (True, False):
        with pytest.raises(ImageError) as failed:
            restore(str(image), str(tmp_path / "part.img"), partition=2, verify=verify)
        assert str(failed.value) == f"chunk {digest} is corrupt (content does not match its name)"


@pytest.mark.parametrize("where", ["in a block a chunk boundary cuts", "in a block written whole"])
def test_the_read_back_sees_a_byte_changed_on_the_device(disk, image, tmp_path, where):
    part = disk.partitions[1]
    spans = pieces(part.start, part.size)
    boundary = spans[1][0]
    assert boundary % BLOCK
    byte = boundary - 1 if where.endswith("cuts") else boundary + 3 * BLOCK
    first, last = next(span for span in spans if span[0] <= byte <= span[1])
    backing = tmp_path / "device.img"
    backing.write_bytes(b"\x55" * part.size)

    def change_a_byte_beneath_the_device(event):
        if event.phase == "verify" and event.done == 0:
            with open(backing, "r+b") as handle:
                handle.seek(byte)
                old = handle.read(1)
                handle.seek(byte)
                handle.write(bytes([old[0] ^ 0xFF]))

    with loop_device(backing, 0, part.size) as device:
        with pytest.raises(TargetError) as failed:
            restore(str(image), device, partition=2, allowed_targets=[device],
                    progress=Progress("restore", 0, change_a_byte_beneath_the_device,
                                      interval=0))
    assert str(failed.value) == (f"verification failed: {device} differs from partition 2 of "
                                 f"the image (bytes {first}-{last})")
    changed = read_range(backing, 0, part.size)
    assert changed[:byte] + changed[byte + 1:] == \
        read_range(disk.path, part.start, byte) + read_range(disk.path, part.start + byte + 1,
                                                             part.size - byte - 1)
