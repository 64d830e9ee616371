"""A file session: one partition of an image opened once (the reader's registration in
the datastore, one private mount, blkid's probe) for any number of lookups, listings,
reads and extracts, on a real backup of real ext4, FAT and NTFS filesystems."""
from __future__ import annotations

import contextlib
import gc
import itertools
import os
import signal
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
from engine import REPO, MiB, write_random
from support.devices import loop_device, mounted, requires_root_loop_fuse, run
from support.disks import PartSpec, build_disk
from support.fuse import image_mounts, no_mount_left_behind, own_image_mounts  # noqa: F401

import imaging.reading.files
import imaging.base.tools
from imaging.backup import backup
from imaging.base.errors import ImagingError
from imaging.datastore.image import Image
from imaging.reading.files import FileSession, list_files

CHUNK = 1 * MiB
EXT4_START, EXT4_SIZE = MiB, 24 * MiB
SIBLINGS = 300


def sibling_text(number: int) -> bytes:
    return f"sibling {number}\n".encode() * (number + 1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """(image directory, {path: bytes} of the ext4's files, the FAT partition's files as
    mtools copies them from the disk itself) of a dos disk: ext4, then FAT16."""
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("session")
    disk = build_disk(folder / "disk.img", 40 * MiB, "dos",
                      [PartSpec(EXT4_SIZE, "empty"), PartSpec(12 * MiB, "fat16")], seed=5)
    files = {f"many/file-{number:03d}.txt": sibling_text(number) for number in range(SIBLINGS)}
    with loop_device(disk.path, EXT4_START, EXT4_SIZE) as device:
        run("mkfs.ext4", "-q", "-F", "-E", "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
            device)
        with mounted(device, folder / "mnt") as root:
            for name, data in files.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                (root / name).write_bytes(data)
            (root / "docs" / "deep").mkdir(parents=True)
            write_random(root / "many" / "wanted.bin", 3 * MiB, seed=8)
            (root / "docs" / "deep" / "notes.txt").write_bytes(b"deep notes\n")
            (root / "docs" / "empty").touch()
            with open(root / "docs" / "sparse.bin", "wb") as sparse:
                sparse.write(b"start")
                sparse.seek(2 * MiB + 5)
                sparse.write(b"middle")
                sparse.truncate(5 * MiB)  # ends in a hole
            (root / "link").symlink_to("docs/deep/notes.txt")
            for path in root.rglob("*"):
                if path.is_file() and not path.is_symlink():
                    files[str(path.relative_to(root))] = path.read_bytes()
    fat = folder / "fat"
    fat.mkdir()
    subprocess.run(["mcopy", "-s", "-m", "-n", "-i", f"{disk.path}@@{disk.partitions[1].start}",
                    "::/*", fat], check=True, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    image = backup(str(disk.path), folder / "store", disk_id="session", chunk_size=CHUNK).image
    return image, files, fat


def readers(image_dir: Path) -> list[str]:
    """What each reader the image's datastore has registered says it does."""
    return [job.what for job in Image.open(image_dir).store.running_jobs()]


def files_under(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in root.rglob("*")
            if path.is_file() and not path.is_symlink()}


def deleted_files_open() -> set[str]:
    """What this process's descriptors open that has no name any more (an unnamed
    temporary file, or a copy deleted once opened)."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.endswith(" (deleted)"):
                found.add(target)
    return found


def test_one_session_serves_every_call_on_one_mount_and_one_registration(lab, tmp_path):
    image_dir, files, _ = lab
    with FileSession(image_dir, 1) as session:
        mounts = own_image_mounts(tmp_path)
        assert len(mounts) == 1
        assert readers(image_dir) == [f"mount session/{image_dir.name} to read files of "
                                      "partition 1"]
        assert session.filesystem == "ext4"
        root = session.lookup("/")
        assert {entry.name for entry in session.entries(root)} == {
            "docs", "many", "link", "lost+found"}
        wanted = session.lookup("/many/wanted.bin")
        assert (wanted.kind, wanted.size) == (imaging.reading.files.FILE, 3 * MiB)
        assert b"".join(session.read(wanted)) == files["many/wanted.bin"]
        listing = session.listing("/many")
        assert len(listing.entries) == SIBLINGS + 1 and listing.path == "/many"
        result = session.extract(["/docs", "/link"], tmp_path / "out")
        assert (result.files, result.directories, result.symlinks, result.skipped) == \
            (3, 2, 1, [])
        assert files_under(tmp_path / "out") == {
            name: data for name, data in files.items() if name.startswith("docs/")}
        assert os.readlink(tmp_path / "out" / "link") == "docs/deep/notes.txt"
        # Nothing more was opened for any of it.
        assert own_image_mounts(tmp_path) == mounts
        assert len(readers(image_dir)) == 1
    assert own_image_mounts(tmp_path) == set()
    assert readers(image_dir) == []


def test_a_file_is_told_from_a_folder_without_reading_its_siblings(lab):
    """debugfs reads one folder's names to find an entry there, and stats only that entry."""
    image_dir, files, _ = lab
    with FileSession(image_dir, 1) as session:
        session.lookup("/")  # blkid has answered
        with mock.patch.object(imaging.base.tools, "run", wraps=imaging.base.tools.run) as tool:
            file = session.lookup("/many/file-007.txt")
            folder = session.lookup("/docs/deep")
        stats = [line for call in tool.call_args_list
                 for line in (call.kwargs.get("input") or b"").decode().splitlines()
                 if line.startswith("stat ")]
        assert (file.kind, file.size) == (imaging.reading.files.FILE, len(files["many/file-007.txt"]))
        assert folder.kind == imaging.reading.files.DIRECTORY
        assert len(stats) == 2, stats
        with pytest.raises(ImagingError, match=r"^/many/nothing: no such file or directory in "
                                               r"partition 1$"):
            session.lookup("/many/nothing")
        with pytest.raises(ImagingError, match=r"^deep is a directory, not a file$"):
            session.read(folder)


def test_reading_an_ext4_file_writes_nothing_anywhere(lab):
    """Its extents are read from the image's chunks: holes and the hole at its end are zeros."""
    image_dir, files, _ = lab
    before = deleted_files_open()
    with FileSession(image_dir, 1) as session:
        pieces = session.read(session.lookup("/docs/sparse.bin"))
        read = [next(pieces)]
        assert deleted_files_open() == before
        read.extend(pieces)
    assert b"".join(read) == files["docs/sparse.bin"]
    assert max(len(piece) for piece in read) <= imaging.reading.files.STREAM_STEP


def test_reading_a_fat_file_gives_what_mtools_copies(lab):
    image_dir, _, fat = lab
    expected = files_under(fat)
    name = max(expected, key=lambda name: len(expected[name]))
    before = deleted_files_open()
    with FileSession(image_dir, 2) as session:
        assert session.filesystem == "vfat"
        assert b"".join(session.read(session.lookup(name))) == expected[name]
        assert deleted_files_open() == before  # the tool's copy is gone once read


def test_a_walk_gives_every_entry_once_folders_first_with_each_files_contents(lab):
    image_dir, files, _ = lab
    with FileSession(image_dir, 1) as session:
        walked, seen = {}, set()
        for names, node, contents in session.walk(session.lookup("/")):
            path = "/".join(os.fsdecode(name) for name in names)
            assert path not in walked
            assert len(names) == 1 or "/".join(path.split("/")[:-1]) in seen
            if node.kind == imaging.reading.files.DIRECTORY:
                seen.add(path)
            walked[path] = b"".join(contents) if contents is not None else node.kind
    assert {path: data for path, data in walked.items() if isinstance(data, bytes)} == files
    assert walked["link"] == imaging.reading.files.SYMLINK
    assert {path for path, data in walked.items() if data == imaging.reading.files.DIRECTORY} == {
        "docs", "docs/deep", "many", "lost+found"}


def test_a_session_dropped_unclosed_ends_at_once(lab, tmp_path):
    """As a web response dropped unsent: the last reference gone, without the cycle
    collector, the mount and the registration go too."""
    image_dir, files, _ = lab
    gc.disable()
    try:
        session = FileSession(image_dir, 1)
        pieces = session.read(session.lookup("/many/wanted.bin"))
        first = next(pieces)
        del session
        assert len(own_image_mounts(tmp_path)) == 1  # the contents being read hold it
        assert first + b"".join(pieces) == files["many/wanted.bin"]
        del pieces
        assert own_image_mounts(tmp_path) == set()
        assert readers(image_dir) == []
    finally:
        gc.enable()


def test_a_mount_left_by_a_killed_process_is_undone_by_the_next_one(lab, tmp_path):
    """Killed while it served a private mount, a process cannot undo it: the next
    private mount on the machine does."""
    image_dir, _, _ = lab
    script = ("import sys, time\n"
              "from imaging.datastore.image import Image\n"
              "from imaging.reading.mount import exposed\n"
              "with exposed(Image.open(sys.argv[1])) as exposure:\n"
              "    print(exposure.root, flush=True)\n"
              "    time.sleep(600)\n")
    process = subprocess.Popen([sys.executable, "-c", script, str(image_dir)], cwd=REPO,
                               stdout=subprocess.PIPE, text=True,
                               env=dict(os.environ, TMPDIR=str(tmp_path)))
    try:
        left = process.stdout.readline().strip()
        assert left.startswith(str(tmp_path)), left
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
        process.stdout.close()
    assert left in image_mounts()  # nothing undid it
    listing = list_files(image_dir, 1, "/docs")
    assert [entry.name for entry in listing.entries] == ["deep", "empty", "sparse.bin"]
    assert left not in image_mounts()
    assert not os.path.lexists(left)


def test_ntfs_looks_up_an_entry_without_the_times_of_its_siblings(tmp_path):
    requires_root_loop_fuse()
    disk = build_disk(tmp_path / "disk.img", 24 * MiB, "dos", [PartSpec(20 * MiB, "empty")])
    part = disk.partitions[0]
    source = tmp_path / "source" / "Docs"
    source.mkdir(parents=True)
    for number in range(40):
        (source / f"note {number}.txt").write_bytes(sibling_text(number))
    os.utime(source / "note 7.txt", (1_700_000_000, 1_714_979_289))
    with loop_device(disk.path, part.start, part.size) as device:
        run("mkntfs", "-q", "-f", "-F", device)
        (tmp_path / "mnt").mkdir()
        run("ntfs-3g", device, tmp_path / "mnt")  # the test's own filesystem: trusted
        try:
            subprocess.run(["cp", "-a", source, tmp_path / "mnt"], check=True)
        finally:
            run("umount", tmp_path / "mnt")
    image = backup(str(disk.path), tmp_path / "store", disk_id="ntfs", chunk_size=CHUNK).image
    with FileSession(image, 1) as session:
        session.lookup("/")
        with mock.patch.object(imaging.base.tools, "run", wraps=imaging.base.tools.run) as tool:
            note = session.lookup("/Docs/NOTE 7.TXT")  # NTFS names: any case
        assert [call.args[0] for call in tool.call_args_list].count("ntfsinfo") == 1
        assert (note.name, note.size) == (b"note 7.txt", len(sibling_text(7)))
        assert session.entry(note).mtime == "2024-05-06T07:08:09Z"
        assert b"".join(session.read(note)) == sibling_text(7)


def test_a_walk_enters_no_folder_twice_nor_one_whose_name_would_leave_its_parent(tmp_path):
    """A crafted ext4: a folder holds an entry back to the root (a loop), and the root an
    entry whose name holds a slash; the walk ends, and names every entry as stored."""
    requires_root_loop_fuse()
    disk = build_disk(tmp_path / "disk.img", 16 * MiB, "dos", [PartSpec(12 * MiB, "empty")])
    part = disk.partitions[0]
    with loop_device(disk.path, part.start, part.size) as device:
        run("mkfs.ext4", "-q", "-F", "-O", "^metadata_csum,^has_journal,^dir_index", device)
        with mounted(device, tmp_path / "mnt") as root:
            (root / "sub").mkdir()
            (root / "sub" / "file.txt").write_bytes(b"inside\n")
            (root / "a_b").mkdir()
        run("debugfs", "-w", "-R", "ln <2> /sub/back-to-root", device)
    with open(disk.path, "r+b") as handle:  # "a_b" becomes "a/b" in the root's directory block
        handle.seek(part.start)
        data = handle.read(part.size)
        assert data.count(b"a_b") == 1
        handle.seek(part.start + data.index(b"a_b"))
        handle.write(b"a/b")
    image = backup(str(disk.path), tmp_path / "store", disk_id="loop", chunk_size=CHUNK).image
    with FileSession(image, 1) as session:
        # Bounded: a walk that followed the loop would never end.
        walked = {b"/".join(names): (node.kind, contents and b"".join(contents))
                  for names, node, contents in itertools.islice(
                      session.walk(session.lookup("/")), 100)}
    assert walked == {b"lost+found": (imaging.reading.files.DIRECTORY, None),
                      b"sub": (imaging.reading.files.DIRECTORY, None),
                      b"a/b": (imaging.reading.files.DIRECTORY, None),
                      b"sub/file.txt": (imaging.reading.files.FILE, b"inside\n"),
                      b"sub/back-to-root": (imaging.reading.files.DIRECTORY, None)}
