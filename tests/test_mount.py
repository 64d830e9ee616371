"""An image as a read-only disk: FUSE files with the disk's exact bytes, and ImageReader."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys

import pytest
from engine import REPO, MiB, imaging, one_error_line, sha256_of
from support.devices import requires_root_loop_fuse
from support.disks import PartSpec, build_disk
from support.fuse import mount_process
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)
from support.services import wait_for

from imaging.backup import backup
from imaging.base.errors import ImageError
from imaging.datastore.image import Image
from imaging.datastore.store import Datastore
from imaging.prune import Retention, prune
from imaging.reading.mount import READ_AHEAD, ImageReader

CHUNK = 1 * MiB


@pytest.fixture(scope="module")
def imaged(tmp_path_factory):
    """(image directory, disk) of a GPT disk with ext4, FAT16 and noise, in 1 MiB chunks."""
    requires_root_loop_fuse()
    folder = tmp_path_factory.mktemp("mount")
    disk = build_disk(folder / "disk.img", 40 * MiB, "gpt",
                      [PartSpec(20 * MiB, "ext4"), PartSpec(12 * MiB, "fat16", gap_before=MiB),
                       PartSpec(3 * MiB, "raw-noise")], seed=7)
    result = backup(str(disk.path), folder / "store", disk_id="disk", chunk_size=CHUNK)
    return result.image, disk


def source_bytes(disk, start: int, size: int) -> bytes:
    with open(disk.path, "rb") as handle:
        handle.seek(start)
        return handle.read(size)


def test_disk_and_partitions_hold_the_original_bytes_and_pass_fsck(imaged, tmp_path):
    image_dir, disk = imaged
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(image_dir, mountpoint):
        assert sorted(os.listdir(mountpoint)) == ["disk", "p1", "p2", "p3"]
        assert sha256_of(mountpoint / "disk") == sha256_of(disk.path)
        assert subprocess.run(["cmp", mountpoint / "disk", disk.path]).returncode == 0
        for part in disk.partitions:
            exposed = mountpoint / f"p{part.number}"
            assert os.path.getsize(exposed) == part.size
            assert exposed.read_bytes() == source_bytes(disk, part.start, part.size)
        ext4 = subprocess.run(["e2fsck", "-fn", mountpoint / "p1"], capture_output=True, text=True)
        assert ext4.returncode == 0, ext4.stdout + ext4.stderr
        fat = subprocess.run(["fsck.vfat", "-n", mountpoint / "p2"], capture_output=True,
                             text=True)
        assert fat.returncode == 0, fat.stdout + fat.stderr


def test_nothing_can_write_through_it(imaged, tmp_path):
    image_dir, disk = imaged
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(image_dir, mountpoint):
        for flags in (os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC):
            with pytest.raises(OSError) as refused:
                os.open(mountpoint / "p1", flags)
            assert refused.value.errno == errno.EROFS
        with pytest.raises(OSError) as refused:
            os.open(mountpoint / "new", os.O_WRONLY | os.O_CREAT, 0o644)
        assert refused.value.errno == errno.EROFS
        for change in (lambda: os.chmod(mountpoint / "disk", 0o666),
                       lambda: os.truncate(mountpoint / "disk", 0),
                       lambda: os.unlink(mountpoint / "p2"),
                       lambda: os.mkdir(mountpoint / "dir")):
            with pytest.raises(OSError) as refused:
                change()
            assert refused.value.errno == errno.EROFS
        dd = subprocess.run(["dd", "if=/dev/zero", f"of={mountpoint / 'disk'}", "bs=4096",
                             "count=1", "conv=notrunc"], capture_output=True, text=True)
        assert dd.returncode != 0 and "Read-only file system" in dd.stderr
        assert sha256_of(mountpoint / "disk") == sha256_of(disk.path)
        assert "ro" in next(line for line in open("/proc/self/mounts")
                            if f" {mountpoint} " in line).split()[3].split(",")


@pytest.mark.parametrize("ending", ["umount", "fusermount3", "ctrl-c", "sigterm"])
def test_it_ends_cleanly_and_leaves_no_registration(imaged, tmp_path, ending):
    image_dir, _ = imaged
    store = Datastore.open(image_dir.parent.parent.parent)
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(image_dir, mountpoint) as process:
        (job,) = store.running_jobs()
        assert (job.kind, job.images) == ("mount", (f"disk/{image_dir.name}",))
        assert not job.writes
        if ending == "umount":
            subprocess.run(["umount", mountpoint], check=True)
        elif ending == "fusermount3":
            subprocess.run(["fusermount3", "-u", mountpoint], check=True)
        else:
            process.send_signal(signal.SIGINT if ending == "ctrl-c" else signal.SIGTERM)
        out, err = process.communicate(timeout=30)
        assert process.returncode == 0, err
        assert out.splitlines()[0].startswith(f"{image_dir} mounted read-only at {mountpoint}: "
                                              "disk, p1, p2, p3")
        assert out.splitlines()[-1].startswith(f"unmounted {mountpoint} after ")
        assert not os.path.ismount(mountpoint)
    assert store.running_jobs() == []


def test_a_process_that_mounted_privately_still_ignores_sigpipe(imaged):
    """libfuse, when it stops serving, sets an ignored SIGPIPE back to death: a process that
    mounts in a thread (the web server, a worker) must outlive a write its peer hung up on."""
    image_dir, _ = imaged
    script = ("import os, sys, imaging.reading.files\n"
              "imaging.reading.files.list_files(sys.argv[1], 1, '/')\n"
              "reader, writer = os.pipe()\n"
              "os.close(reader)\n"
              "try:\n"
              "    os.write(writer, b'x')\n"
              "except BrokenPipeError:\n"
              "    print('the write failed with EPIPE')\n")
    done = subprocess.run([sys.executable, "-c", script, str(image_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, "the write failed with EPIPE\n"), done.stderr


def test_prune_defers_a_mounted_image(tmp_path):
    requires_root_loop_fuse()
    source = tmp_path / "disk.img"
    source.write_bytes(os.urandom(2 * MiB))
    store = tmp_path / "store"
    older = backup(str(source), store, disk_id="d", chunk_size=CHUNK).image
    newer = backup(str(source), store, disk_id="d", chunk_size=CHUNK).image
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(older, mountpoint):
        result = prune(store, "d", Retention(last=1))
        assert result.deferred == [older] and result.removed == [] and older.is_dir()
        assert (mountpoint / "disk").read_bytes() == source.read_bytes()
    assert prune(store, "d", Retention(last=1)).removed == [older]
    assert newer.is_dir()


def test_an_existing_mount_point_or_a_missing_directory_is_one_clear_line(imaged, tmp_path):
    image_dir, _ = imaged
    missing = tmp_path / "absent"
    line = one_error_line(imaging("mount", image_dir, missing, check=False))
    assert line == f"imaging: error: cannot mount at {missing}: not a directory"
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(image_dir, mountpoint):
        line = one_error_line(imaging("mount", image_dir, mountpoint, check=False))
        assert line == (f"imaging: error: cannot mount at {mountpoint}: something is already "
                        "mounted there")


def test_reader_serves_any_range_and_decompresses_only_the_chunks_it_touches(imaged):
    image_dir, disk = imaged
    reader = ImageReader(Image.open(image_dir), cache_chunks=2)
    original = source_bytes(disk, 0, disk.size)
    gap, noise = 21 * CHUNK, 35 * CHUNK  # random bytes: never an all-zero chunk
    # Across a chunk boundary: two chunks.
    assert reader.pread(gap + CHUNK - 100, 200) == original[gap + CHUNK - 100:gap + CHUNK + 100]
    assert (reader.chunks_read, reader.chunk_bytes_read) == (2, 2 * CHUNK)
    # Both cached now.
    assert reader.pread(gap + 5, 10) == original[gap + 5:gap + 15]
    assert reader.chunks_read == 2
    # A third chunk pushes the least recently used out of the two-chunk cache.
    assert reader.pread(noise, 1) == original[noise:noise + 1]
    assert reader.pread(gap + CHUNK, 1) == original[gap + CHUNK:gap + CHUNK + 1]
    assert reader.chunks_read == 4
    # Past the end: only what there is.
    assert reader.pread(disk.size - 3, 100) == original[-3:]
    assert reader.pread(disk.size, 10) == b""
    assert reader.pread(0, disk.size) == original


def test_reader_loads_ahead_the_chunks_it_is_told_come_next(imaged):
    """In the order given, not the disk's: the first few at once, then, as each is read,
    those after it; a chunk loaded ahead is not decompressed again when it is read."""
    image_dir, disk = imaged
    reader = ImageReader(Image.open(image_dir))
    noise = [34, 21, 36, 35]  # random bytes: never an all-zero chunk
    try:
        reader.read_ahead(noise)
        wait_for(lambda: reader.chunks_read == READ_AHEAD, f"{READ_AHEAD} chunks loaded")
        assert reader.pread(21 * CHUNK, 10) == source_bytes(disk, 21 * CHUNK, 10)
        wait_for(lambda: reader.chunks_read == 4, "the last chunk loaded once 21 was read")
        for position in noise:
            assert reader.chunk(position) == source_bytes(disk, position * CHUNK, CHUNK)
        assert reader.chunks_read == 4
    finally:
        reader.stop_reading_ahead()


def test_reader_names_a_corrupt_chunk(imaged, tmp_path):
    image_dir, _ = imaged
    copy = tmp_path / "store"
    shutil.copytree(image_dir.parent.parent.parent, copy)
    image = Image.open(copy / "images" / "disk" / image_dir.name)
    digest = image.index()[21]  # the noise between partitions 1 and 2
    image.store.chunk_path(digest).write_bytes(b"not zstd")
    reader = ImageReader(image)
    with pytest.raises(ImageError, match=f"chunk {digest} is corrupt"):
        reader.pread(21 * CHUNK, 10)
    assert reader.pread(0, 10)  # the others still read
    mountpoint = tmp_path / "mnt"
    mountpoint.mkdir()
    with mount_process(image.path, mountpoint) as process:
        with open(mountpoint / "disk", "rb") as disk:
            disk.seek(21 * CHUNK)
            with pytest.raises(OSError) as failed:
                disk.read(10)
            assert failed.value.errno == errno.EIO
        subprocess.run(["fusermount3", "-u", mountpoint], check=True)
        _, err = process.communicate(timeout=30)
    assert err.startswith(f"imaging: error: chunk {digest} is corrupt: undecodable zstd frame")
    assert err.strip().endswith("(the reading program got an I/O error)")
