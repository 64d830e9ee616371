"""Listing and extracting files of an image's partitions with the filesystems' own tools."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from engine import MiB, imaging, one_error_line, write_random
from support.devices import loop_device, mounted, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)

from imaging.backup import backup
from imaging.base.errors import ImagingError
from imaging.datastore import codec
from imaging.datastore.image import Image
from imaging.reading.files import extract, list_files

CHUNK = 1 * MiB


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    """(image directory, disk) of a dos disk: ext4 and FAT16 full of files, then swap."""
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("files")
    disk = build_disk(folder / "disk.img", 40 * MiB, "dos",
                      [PartSpec(20 * MiB, "ext4"), PartSpec(12 * MiB, "fat16"),
                       PartSpec(2 * MiB, "swap")], seed=11)
    return backup(str(disk.path), folder / "store", disk_id="disk", chunk_size=CHUNK).image, disk


def source_tree(disk, number: int):
    """The source partition mounted read-only by the kernel (the test's own disk, trusted)."""
    part = disk.partitions[number - 1]
    loop = loop_device(disk.path, part.start, part.size, read_only=True)
    return loop, part


def snapshot(root: Path) -> dict[str, tuple]:
    """Every path under `root`: (type, permission bits, content hash or link target, mtime ns)."""
    found = {}
    for folder, folders, files in os.walk(root):
        for name in folders + files:
            path = Path(folder, name)
            info = path.lstat()
            if stat.S_ISLNK(info.st_mode):
                what = os.readlink(path)
            elif stat.S_ISREG(info.st_mode):
                what = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                what = None
            found[str(path.relative_to(root))] = (stat.S_IFMT(info.st_mode),
                                                  stat.S_IMODE(info.st_mode), what,
                                                  info.st_mtime_ns)
    return found


def test_an_ext4_listing_shows_what_the_filesystem_holds(standard, tmp_path):
    image_dir, disk = standard
    started = time.monotonic()
    listed = json.loads(imaging("files", image_dir, 1, "--json").stdout)
    seconds = time.monotonic() - started
    assert seconds < 2, f"listing the root took {seconds:.2f} s"
    assert listed["filesystem"] == "ext4" and listed["path"] == "/"
    loop, _ = source_tree(disk, 1)
    with loop as device, mounted(device, tmp_path / "source", read_only=True) as root:
        expected = sorted(os.listdir(root))
        assert sorted(entry["name"] for entry in listed["entries"]) == expected
        for entry in listed["entries"]:
            info = (root / entry["name"]).lstat()
            assert entry["mode"] == stat.S_IMODE(info.st_mode)
            assert entry["type"] == ("directory" if stat.S_ISDIR(info.st_mode) else "file")
            assert entry["size"] == info.st_size
            assert entry["mtime"] == time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                   time.gmtime(info.st_mtime))
        folder = next(entry["name"] for entry in listed["entries"]
                      if entry["type"] == "directory" and entry["name"] != "lost+found")
        inner = list_files(image_dir, 1, f"/{folder}")
        assert sorted(entry.name for entry in inner.entries) == sorted(os.listdir(root / folder))
        table = imaging("files", image_dir, 1, folder).stdout.splitlines()
        assert len(table) == len(inner.entries)
        assert all(line.startswith(("-rw-", "drwx")) for line in table)


def test_extracting_ext4_keeps_contents_modes_and_times(standard, tmp_path):
    image_dir, disk = standard
    result = extract(image_dir, 1, ["/"], tmp_path / "out")
    assert result.skipped == [] and result.filesystem == "ext4"
    loop, _ = source_tree(disk, 1)
    with loop as device, mounted(device, tmp_path / "source", read_only=True) as root:
        expected = snapshot(root)
        assert snapshot(tmp_path / "out") == expected
    assert result.files == sum(kind == stat.S_IFREG for kind, *_ in expected.values())
    assert result.directories == sum(kind == stat.S_IFDIR for kind, *_ in expected.values())


def test_extracting_fat_gives_what_mtools_copies_from_the_source(standard, tmp_path):
    image_dir, disk = standard
    part = disk.partitions[1]
    reference = tmp_path / "reference"
    reference.mkdir()
    subprocess.run(["mcopy", "-s", "-m", "-n", "-i", f"{disk.path}@@{part.start}", "::/*",
                    reference], check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    run_ = imaging("extract", image_dir, 2, "/", "--to", tmp_path / "out")
    assert run_.stdout.splitlines()[-1].startswith("extracted ")
    ours = {path: entry for path, entry in snapshot(tmp_path / "out").items()
            if entry[0] == stat.S_IFREG}
    theirs = {path: entry for path, entry in snapshot(reference).items()
              if entry[0] == stat.S_IFREG}
    assert ours.keys() == theirs.keys() and ours
    for path, (_, _, content, mtime) in ours.items():
        assert content == theirs[path][2]
        assert mtime == theirs[path][3]
    listing = list_files(image_dir, 2, "/")
    assert listing.filesystem == "vfat"
    assert {entry.name for entry in listing.entries} == set(os.listdir(reference))


def test_a_filesystem_without_tools_is_one_clear_line(standard):
    image_dir, _ = standard
    line = one_error_line(imaging("files", image_dir, 3, check=False))
    assert line == ("imaging: error: partition 3 holds swap: files and extract read ext2, "
                    "ext3, ext4, FAT (vfat), NTFS, XFS and Btrfs")
    line = one_error_line(imaging("extract", image_dir, 9, "/x", "--to", "/nonexistent",
                                  check=False))
    assert line == f"imaging: error: {image_dir} has no partition 9 (its partitions: 1, 2, 3)"
    line = one_error_line(imaging("files", image_dir, 1, "/../etc", check=False))
    assert line == "imaging: error: /../etc: a path inside the image may not hold '..'"


def test_an_existing_file_is_replaced_only_with_overwrite(standard, tmp_path):
    image_dir, disk = standard
    folder = next(entry.name for entry in list_files(image_dir, 1).entries
                  if entry.type == "directory" and entry.name != "lost+found")
    name = next(entry.name for entry in list_files(image_dir, 1, folder).entries
                if entry.type == "file")
    first = extract(image_dir, 1, [f"{folder}/{name}"], tmp_path / "out")
    assert (first.files, first.skipped) == (1, [])
    copy = tmp_path / "out" / name
    original = copy.read_bytes()
    copy.write_bytes(b"changed since")
    again = imaging("extract", image_dir, 1, f"/{folder}/{name}", "--to", tmp_path / "out",
                    check=False)
    assert again.returncode == 1
    assert f"not extracted: /{name}: exists (--overwrite replaces it)" in again.stdout
    assert copy.read_bytes() == b"changed since"
    imaging("extract", image_dir, 1, f"/{folder}/{name}", "--to", tmp_path / "out",
            "--overwrite")
    assert copy.read_bytes() == original
    assert [p.name for p in (tmp_path / "out").iterdir()] == [name]  # no temporary file left


# -- a crafted filesystem ----------------------------------------------------------

ODD_NAME = b"odd-\xff\xfe-\x1b[31m-\n-name"


def crafted_disk(path: Path, outside: Path) -> Path:
    """A disk whose ext4 has links out, names that repeat, '..' and one with slashes.

    Made on a kernel mount with innocent names, then the names are patched in
    the raw directory blocks (no metadata checksums, no journal: nothing else
    holds them): q7linl becomes a second q7link (after the symlink q7link),
    q7absp a second q7abso, the folder q7dis a second q7dir (after a symlink to
    `outside`), "@@" becomes "..", and one name becomes an absolute path.
    """
    disk = build_disk(path, 24 * MiB, "dos", [PartSpec(16 * MiB, "empty")], seed=3)
    part = disk.partitions[0]
    absolute = os.fsencode(outside / "absolute")
    flat = absolute.replace(b"/", b"_")
    with loop_device(path, part.start, part.size) as device:
        run("mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^has_journal,^dir_index", device)
        with tempfile.TemporaryDirectory(dir=path.parent) as mountpoint, \
                mounted(device, mountpoint) as root:
            (root / "q7link").symlink_to("../" * 20 + str(outside / "victim").lstrip("/"))
            (root / "q7abso").symlink_to(outside / "victim")
            (root / "q7linl").write_bytes(b"through a relative link\n")
            (root / "q7absp").write_bytes(b"through an absolute link\n")
            (root / "q7dir").symlink_to(outside)
            (root / "q7dis").mkdir()
            (root / "q7dis" / "payload").write_bytes(b"payload\n")
            (root / "@@").write_bytes(b"dot dot\n")
            (root / os.fsdecode(flat)).write_bytes(b"absolute name\n")
            (root / os.fsdecode(ODD_NAME)).write_bytes(b"odd\n")
            os.chmod(root / os.fsdecode(ODD_NAME), 0o4750)
            (root / "plain.txt").write_bytes(b"plain\n")
    patches = {b"q7linl": b"q7link", b"q7absp": b"q7abso", b"q7dis": b"q7dir",
               b"\x02\x01@@": b"\x02\x01..", flat: absolute}
    with open(path, "r+b") as handle:
        handle.seek(part.start)
        data = handle.read(part.size)
        for old, new in patches.items():
            assert data.count(old) == 1, old
            data = data.replace(old, new)
        handle.seek(part.start)
        handle.write(data)
    return path


@pytest.fixture(scope="module")
def crafted(tmp_path_factory):
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("crafted")
    outside = a_folder_outside(folder)
    disk = crafted_disk(folder / "disk.img", outside)
    image = backup(str(disk), folder / "store", disk_id="crafted", chunk_size=CHUNK).image
    return image, outside


def a_folder_outside(folder: Path) -> Path:
    """A folder beside the image holding one file, which no extract may touch."""
    outside = folder / "outside"
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me\n")
    return outside


def outside_is_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["victim"]
    assert (outside / "victim").read_bytes() == b"keep me\n"


def test_crafted_names_and_links_never_write_outside(crafted, tmp_path):
    image_dir, outside = crafted
    to = tmp_path / "to"
    done = imaging("extract", image_dir, 1, "/", "--to", to, check=False)
    assert done.returncode == 1
    outside_is_untouched(outside)
    assert os.readlink(to / "q7abso") == str(outside / "victim")
    assert os.readlink(to / "q7link").startswith("../../")
    assert os.readlink(to / "q7dir") == str(outside)
    odd = Path(os.fsdecode(os.fsencode(to) + b"/" + ODD_NAME))
    assert odd.read_bytes() == b"odd\n"
    assert stat.S_IMODE(odd.stat().st_mode) == 0o750  # no set-user-ID from an image
    assert (to / "plain.txt").read_bytes() == b"plain\n"
    assert sorted(os.listdir(to)) == sorted(["lost+found", "q7link", "q7abso", "q7dir",
                                             os.fsdecode(ODD_NAME), "plain.txt"])
    skipped = [line for line in done.stdout.splitlines() if line.startswith("not extracted")]
    absolute = str(outside / "absolute")
    assert skipped == [
        "not extracted: /q7link: exists (--overwrite replaces it)",
        "not extracted: /q7abso: exists (--overwrite replaces it)",
        "not extracted: /q7dir: exists and is not a folder (--overwrite replaces it)",
        f"not extracted: /{absolute}: a name that would leave its folder",
    ]
    assert not os.path.lexists(absolute)


def test_overwriting_replaces_links_instead_of_writing_through_them(crafted, tmp_path):
    image_dir, outside = crafted
    to = tmp_path / "to"
    result = extract(image_dir, 1, ["/"], to, overwrite=True)
    outside_is_untouched(outside)
    assert (to / "q7link").read_bytes() == b"through a relative link\n"
    assert (to / "q7abso").read_bytes() == b"through an absolute link\n"
    assert not (to / "q7dir").is_symlink()
    assert (to / "q7dir" / "payload").read_bytes() == b"payload\n"
    assert result.skipped == [{"path": f"/{outside / 'absolute'}",
                               "reason": "a name that would leave its folder"}]


def test_a_path_through_a_link_inside_the_image_is_not_followed(crafted, tmp_path):
    image_dir, outside = crafted
    with pytest.raises(ImagingError, match=r"^/q7dir: not a directory in partition 1$"):
        extract(image_dir, 1, ["/q7dir/payload"], tmp_path / "to")
    outside_is_untouched(outside)
    listing = list_files(image_dir, 1)
    links = {entry.name: entry.target for entry in listing.entries if entry.type == "symlink"}
    assert links["q7abso"] == str(outside / "victim")


# -- what an extract reads ----------------------------------------------------------

def test_extracting_a_file_reads_only_the_chunks_that_hold_it(tmp_path):
    requires_root_loop_fuse()
    disk = build_disk(tmp_path / "disk.img", 128 * MiB, "gpt", [PartSpec(120 * MiB, "empty")])
    part = disk.partitions[0]
    with loop_device(disk.path, part.start, part.size) as device:
        run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", device)
        with mounted(device, tmp_path / "mnt") as root:
            write_random(root / "other.bin", 64 * MiB, seed=1)
            (root / "folder").mkdir()
            write_random(root / "folder" / "big.bin", 32 * MiB, seed=2)
            wanted = hashlib.sha256((root / "folder" / "big.bin").read_bytes()).hexdigest()
            with open(root / "folder" / "sparse.bin", "wb") as sparse:
                sparse.write(b"start")
                sparse.seek(5 * MiB)
                sparse.write(b"middle")
                sparse.truncate(9 * MiB)  # ends in a hole
            subprocess.run(["fallocate", "-l", str(MiB), root / "folder" / "allocated.bin"],
                           check=True)  # an unwritten extent: reads as zeros
            (root / "folder" / "empty.bin").touch()
            expected = snapshot(root / "folder")
    image = backup(str(disk.path), tmp_path / "store", disk_id="big").image  # 4 MiB chunks
    started = time.monotonic()
    result = extract(image, 1, ["/folder/big.bin"], tmp_path / "out")
    seconds = time.monotonic() - started
    got = tmp_path / "out" / "big.bin"
    assert hashlib.sha256(got.read_bytes()).hexdigest() == wanted
    assert result.bytes == 32 * MiB
    assert result.chunk_bytes_read <= 2 * 32 * MiB, result.chunk_bytes_read
    print(f"extracting 32 MiB read {result.chunk_bytes_read / MiB:.0f} MiB of chunks "
          f"in {seconds:.2f} s")
    whole = extract(image, 1, ["/folder"], tmp_path / "whole")
    assert whole.skipped == [] and snapshot(tmp_path / "whole" / "folder") == expected
    assert os.stat(tmp_path / "whole" / "folder" / "sparse.bin").st_blocks * 512 < MiB


def test_ntfs_lists_and_extracts_with_ntfs_3g_tools(tmp_path):
    requires_root_loop_fuse()
    disk = build_disk(tmp_path / "disk.img", 24 * MiB, "dos", [PartSpec(20 * MiB, "empty")])
    part = disk.partitions[0]
    source = tmp_path / "source"
    (source / "Docs" / "Sub").mkdir(parents=True)
    (source / "Docs" / "read me.txt").write_bytes(b"hello ntfs\n")
    write_random(source / "Docs" / "Sub" / "blob.bin", 3 * MiB, seed=4)
    os.utime(source / "Docs" / "read me.txt", (1_700_000_000, 1_714_979_289))
    with loop_device(disk.path, part.start, part.size) as device:
        run("mkntfs", "-q", "-f", "-F", device)
        (tmp_path / "mnt").mkdir()
        run("ntfs-3g", device, tmp_path / "mnt")  # the test's own filesystem: trusted
        try:
            subprocess.run(["cp", "-a", source / "Docs", tmp_path / "mnt"], check=True)
        finally:
            run("umount", tmp_path / "mnt")
    image = backup(str(disk.path), tmp_path / "store", disk_id="ntfs", chunk_size=CHUNK).image
    listing = list_files(image, 1, "/Docs")
    assert listing.filesystem == "ntfs"
    assert [(entry.name, entry.type, entry.size) for entry in listing.entries] == [
        ("Sub", "directory", 0), ("read me.txt", "file", 11)]
    assert listing.entries[1].mtime == "2024-05-06T07:08:09Z"
    result = extract(image, 1, ["/Docs"], tmp_path / "out")
    assert (result.files, result.directories, result.skipped) == (2, 2, [])
    out = tmp_path / "out" / "Docs"
    assert (out / "read me.txt").read_bytes() == b"hello ntfs\n"
    assert (out / "read me.txt").stat().st_mtime == 1_714_979_289
    blob = source / "Docs" / "Sub" / "blob.bin"
    assert (out / "Sub" / "blob.bin").read_bytes() == blob.read_bytes()


def test_a_corrupt_chunk_under_the_filesystem_is_named(standard, tmp_path):
    image_dir, disk = standard
    copy = tmp_path / "store"
    shutil.copytree(image_dir.parent.parent.parent, copy)
    image_dir = copy / "images" / "disk" / image_dir.name
    image = Image.open(image_dir)
    superblock = (disk.partitions[0].start + 1024) // CHUNK
    digest = image.index()[superblock]
    image.store.chunk_path(digest).write_bytes(b"not zstd")
    line = one_error_line(imaging("files", image_dir, 1, check=False))
    assert line.startswith(f"imaging: error: chunk {digest} is corrupt: undecodable zstd frame")
    assert list_files(image_dir, 2).filesystem == "vfat"  # the other partition still reads


def test_a_data_chunk_that_is_not_what_its_name_says_fails_the_extract(tmp_path):
    """1 KiB blocks, so the block size the copy uses is not the usual 4 KiB."""
    requires_root_loop_fuse()
    disk = build_disk(tmp_path / "disk.img", 32 * MiB, "dos", [PartSpec(24 * MiB, "empty")])
    part = disk.partitions[0]
    with loop_device(disk.path, part.start, part.size) as device:
        run("mkfs.ext4", "-q", "-F", "-b", "1024", device)
        with mounted(device, tmp_path / "mnt") as root:
            write_random(root / "data.bin", 6 * MiB, seed=5)
            wanted = hashlib.sha256((root / "data.bin").read_bytes()).hexdigest()
        # Where the file's fourth MiB lies: debugfs's bmap gives its first block.
        block = int(run("debugfs", "-R", f"bmap /data.bin {3 * 1024}", device).split()[-1])
    image = backup(str(disk.path), tmp_path / "store", disk_id="k1", chunk_size=CHUNK).image
    result = extract(image, 1, ["/data.bin"], tmp_path / "out")
    assert hashlib.sha256((tmp_path / "out" / "data.bin").read_bytes()).hexdigest() == wanted
    assert result.chunk_bytes_read <= 2 * 6 * MiB, result.chunk_bytes_read

    opened = Image.open(image)
    digest = opened.index()[(part.start + block * 1024) // CHUNK]
    # A well-formed frame (zstd's own checksum holds) of other bytes of the same length.
    opened.store.chunk_path(digest).write_bytes(codec.compress(os.urandom(CHUNK)))
    with pytest.raises(ImagingError, match=f"chunk {digest} is corrupt"):
        extract(image, 1, ["/data.bin"], tmp_path / "again")
    assert os.listdir(tmp_path / "again") == []  # no partial copy passes for the file
