"""Cancel: every long job stops when asked, leaves nothing half-written, spares what was there.

Each test cancels its job from the job's own progress callback once the work
is under way (as the web worker does when someone presses Cancel), then
checks that Cancelled was raised midway, that no new image, export file or
temporary file remains, and that the images already in the datastore are
byte for byte what they were. Used-mode planning has no progress of its own
yet: there the cancel comes while partclone is running, and must kill it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import os
import random
import threading
import time
from pathlib import Path

import pytest
from engine import MiB, sha256_of
from support.devices import requires_loop, run
from support.disks import PartSpec, build_disk

from imaging.backup import backup
from imaging.base.errors import Cancelled
from imaging.base.progress import Progress
from imaging.datastore import codec
from imaging.datastore.image import Image
from imaging.datastore.store import Datastore
from imaging.disks import usedmap
from imaging.disks.device import Source
from imaging.export import export
from imaging.gc import collect
from imaging.importer import import_archive
from imaging.prune import Retention, prune
from imaging.recompress import recompress
from imaging.restore import restore
from imaging.verify import verify

# Small chunks: many of them, so a cancel lands with most of the work still to do.
CHUNK_SIZE = 64 * 1024
DISK_SIZE = 8 * MiB
# A cancel is honoured within a chunk; a killed partclone within a poll or two.
PROMPTLY = 0.5


def random_disk(path: Path, seed: int, size: int = DISK_SIZE) -> Path:
    path.write_bytes(random.Random(seed).randbytes(size))
    return path


def cancelling(phase: str, *, after: int = 1) -> Progress:
    """A Progress that cancels its job once `phase` has done `after` units."""
    cancel = threading.Event()

    def callback(event):
        if event.phase == phase and event.done >= after:
            cancel.set()

    return Progress(phase, 0, callback, interval=0, cancel=cancel)


def snapshot(root: Path) -> dict[str, str]:
    """Every file under `root` by relative path, with its content's SHA-256."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


# Hidden names of work in progress: files and image folders being written, chunks
# gc has set aside, images prune is deleting.
UNFINISHED = (".tmp", ".sweeping", ".deleting")


def leftovers(root: Path) -> list[str]:
    """Every name under `root` that only a job still running may leave."""
    return [str(path.relative_to(root)) for path in root.rglob("*")
            if path.name.startswith(".") and path.name.endswith(UNFINISHED)]


@pytest.fixture
def store(tmp_path) -> tuple[Path, Path]:
    """A datastore holding one image, and that image."""
    root = tmp_path / "store"
    Datastore.open_or_create(root, CHUNK_SIZE)
    first = backup(str(random_disk(tmp_path / "first.img", seed=1)), root, disk_id="sda")
    return root, first.image


def assert_untouched(root: Path, before: dict[str, str]) -> None:
    assert leftovers(root) == []
    assert snapshot(root) == before


def test_backup(store, tmp_path):
    root, first = store
    before = snapshot(root)
    progress = cancelling("backup")
    with pytest.raises(Cancelled):
        backup(str(random_disk(tmp_path / "second.img", seed=2)), root, disk_id="sdb",
               progress=progress)
    assert 0 < progress.done < DISK_SIZE
    assert not (root / "images" / "sdb").exists() or not list((root / "images" / "sdb").iterdir())
    assert leftovers(root) == []
    # Chunks stored before the cancel stay for gc; the first image is as it was.
    assert {path: digest for path, digest in snapshot(root).items() if path in before} == before
    assert verify(str(first)).ok


def test_import(store, tmp_path):
    root, _ = store
    before = snapshot(root)
    archive = random_disk(tmp_path / "classic.img", seed=3)
    progress = cancelling("import")
    with pytest.raises(Cancelled):
        import_archive([archive], root, disk_id="sdc", progress=progress)
    assert 0 < progress.done < DISK_SIZE
    assert not (root / "images" / "sdc").exists() or not list((root / "images" / "sdc").iterdir())
    assert leftovers(root) == []
    assert {path: digest for path, digest in snapshot(root).items() if path in before} == before


@pytest.mark.parametrize("phase", ["restore", "verify"])
def test_restore(store, tmp_path, phase):
    root, image = store
    before = snapshot(root)
    target = tmp_path / "target.img"
    progress = cancelling(phase)
    with pytest.raises(Cancelled):
        restore(str(image), str(target), progress=progress)
    assert progress.phase == phase and 0 < progress.done < DISK_SIZE
    assert_untouched(root, before)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_verify(store):
    root, image = store
    before = snapshot(root)
    progress = cancelling("verify")
    with pytest.raises(Cancelled):
        verify(str(image), progress=progress)
    assert 0 < progress.done < DISK_SIZE
    # Nothing set aside, and no verification recorded for a check that did not finish.
    assert_untouched(root, before)


def test_export(store, tmp_path):
    root, image = store
    before = snapshot(root)
    out = tmp_path / "out"
    out.mkdir()
    progress = cancelling("export")
    with pytest.raises(Cancelled):
        export(image, out / "sda.zst", split_size=MiB, progress=progress)
    assert 0 < progress.done < DISK_SIZE
    assert os.listdir(out) == []
    assert_untouched(root, before)


def test_recompress(store):
    root, image = store
    manifest = (image / "manifest.json").read_bytes()
    progress = cancelling("recompress")
    with pytest.raises(Cancelled):
        recompress(image, 9, progress=progress)
    assert 0 < progress.done < DISK_SIZE
    assert (image / "manifest.json").read_bytes() == manifest
    assert leftovers(root) == []
    # Some chunks are re-encoded, the rest not: every one still decodes to its name.
    opened = Image.open(image)
    for digest in set(opened.index()):
        data = codec.decompress(opened.store.chunk_path(digest).read_bytes())
        assert hashlib.sha256(data).hexdigest() == digest


def test_prune(tmp_path):
    root = tmp_path / "store"
    Datastore.open_or_create(root, CHUNK_SIZE)
    images = []
    for day in range(1, 5):
        archive = random_disk(tmp_path / f"day{day}.img", seed=day, size=MiB)
        moment = dt.datetime(2026, 2, day, 12, tzinfo=dt.timezone.utc).timestamp()
        os.utime(archive, (moment, moment))
        images.append(import_archive([archive], root, disk_id="sda").image)
    progress = cancelling("prune")
    with pytest.raises(Cancelled):
        prune(root, "sda", Retention(last=1), progress=progress)
    # The newest of the three doomed images went, then it stopped.
    assert progress.done == 1
    kept = [images[0], images[1], images[3]]
    assert sorted(p.name for p in (root / "images" / "sda").iterdir()) == [i.name for i in kept]
    assert leftovers(root) == []
    for image in kept:
        assert verify(str(image)).ok


def test_gc(store, tmp_path):
    root, image = store
    # Garbage in many chunk folders: an image removed an hour ago.
    doomed = backup(str(random_disk(tmp_path / "old.img", seed=4)), root, disk_id="old").image
    for path in doomed.iterdir():
        path.unlink()
    doomed.rmdir()
    hour_ago = time.time() - 3600
    for chunk in root.glob("chunks/*/*.zst"):
        os.utime(chunk, (hour_ago, hour_ago))
    folders = len(list(root.glob("chunks/*")))
    progress = cancelling("gc")
    with pytest.raises(Cancelled):
        collect(root, safety_margin=0, progress=progress)
    assert 0 < progress.done < folders
    assert leftovers(root) == []
    assert verify(str(image)).ok


# --- used-mode planning: the partclone runs ---------------------------------

def _partclone_children() -> list[int]:
    """Our own child processes that are partclone."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            status = Path(entry.path, "status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
        if fields.get("PPid", "").strip() == str(os.getpid()) and \
                fields.get("Name", "").startswith("partclone"):
            found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def fat_disk(tmp_path_factory):
    """A disk whose one partition partclone maps (it takes seconds: a progress thread sleeps)."""
    requires_loop()
    folder = tmp_path_factory.mktemp("fat")
    return build_disk(folder / "fat.img", 128 * MiB, "dos", [PartSpec(120 * MiB, "fat32")])


def _loops_over(path: Path) -> str:
    return run("losetup", "--noheadings", "--associated", path)


def test_planning_kills_the_running_partclone(fat_disk):
    asked_at = []

    def cancelled() -> bool:
        if not asked_at and _partclone_children():
            asked_at.append(time.monotonic())
        return bool(asked_at)

    with Source.open(str(fat_disk.path)) as source, pytest.raises(Cancelled):
        usedmap.plan(source, cancelled=cancelled)
    assert asked_at, "partclone never ran"
    assert time.monotonic() - asked_at[0] < PROMPTLY
    assert _partclone_children() == []
    assert _loops_over(fat_disk.path) == ""


def test_used_backup_cancelled_while_planning(fat_disk, tmp_path):
    before = sha256_of(fat_disk.path)
    progress = Progress("backup", 0)
    asked_at = []

    def cancel_once_partclone_runs() -> None:
        deadline = time.monotonic() + 30
        while not _partclone_children() and time.monotonic() < deadline:
            time.sleep(0.01)
        asked_at.append(time.monotonic())
        progress.cancel.set()

    watcher = threading.Thread(target=cancel_once_partclone_runs)
    watcher.start()
    try:
        with pytest.raises(Cancelled):
            backup(str(fat_disk.path), tmp_path / "store", disk_id="fat", mode="used",
                   progress=progress)
        stopped = time.monotonic()
    finally:
        watcher.join()
    assert stopped - asked_at[0] < PROMPTLY, "the backup went on after the cancel"
    assert progress.done == 0
    assert _partclone_children() == [] and _loops_over(fat_disk.path) == ""
    images = tmp_path / "store" / "images" / "fat"
    assert not images.exists() or not list(images.iterdir())
    assert sha256_of(fat_disk.path) == before
