"""Garbage collection: frees what no image references, never what a running backup uses.

How it spares the images running restores and other readers need, and how it
judges jobs alive across hosts, is tested in test_job_registry.py.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

from engine import MiB, imaging, one_error_line, sha256_of, write_random

from imaging.backup import backup
from imaging.base.progress import Progress
from imaging.datastore import codec
from imaging.datastore.image import Image
from imaging.datastore.store import JOB_STALE, Datastore
from imaging.gc import collect, sweep_chunk
from imaging.restore import restore
from imaging.verify import verify

HOUR = 3600.0


def age(paths, seconds: float = HOUR) -> None:
    moment = time.time() - seconds
    for path in paths:
        os.utime(path, (moment, moment))


def chunk_files(store: Datastore) -> set[str]:
    return {p.name[:-len(".zst")] for p in store.chunks_dir.glob("*/*.zst")}


def stored_chunk(store: Datastore, data: bytes) -> tuple[str, os.PathLike]:
    digest = codec.digest(data)
    store.write_chunk(digest, codec.compress(data))
    return digest, store.chunk_path(digest)


def test_gc_running_alongside_a_backup_that_reuses_garbage(tmp_path):
    chunk = 64 * 1024
    store = Datastore.open_or_create(tmp_path / "store", chunk)
    old_disk, new_disk = tmp_path / "old.img", tmp_path / "new.img"
    write_random(old_disk, 16 * MiB, seed=1)
    pruned = backup(str(old_disk), store.root, disk_id="sda")
    shutil.rmtree(pruned.image)  # every chunk of it is garbage now, and an hour old
    age(store.chunks_dir.glob("*/*.zst"))
    garbage = chunk_files(store)
    # The new disk keeps every other chunk of the old one: the backup reuses half the garbage.
    shutil.copyfile(old_disk, new_disk)
    with open(new_disk, "r+b") as handle:
        for offset in range(0, 16 * MiB, 2 * chunk):
            handle.seek(offset)
            handle.write(os.urandom(chunk))

    outcome = {}

    def run_backup():
        slow = Progress("backup", 0, lambda event: time.sleep(0.01), interval=0)
        try:
            outcome["result"] = backup(str(new_disk), store.root, disk_id="sda", progress=slow)
        except BaseException as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run_backup)
    worker.start()
    runs = freed_meanwhile = 0
    while worker.is_alive():
        freed_meanwhile += collect(store.root, safety_margin=0.2).removed
        runs += 1
    worker.join()
    assert "error" not in outcome, outcome.get("error")
    assert runs >= 3 and freed_meanwhile > 0, (runs, freed_meanwhile)

    collect(store.root, safety_margin=0.0)
    image = Image.open(outcome["result"].image)
    index = set(image.index())
    assert chunk_files(store) == index, "exactly the chunks the image needs remain"
    assert len(index & garbage) == len(index) // 2, "half of them were garbage when it started"
    assert verify(str(image.path)).ok
    restore(str(image.path), str(tmp_path / "restored.img"))
    assert sha256_of(tmp_path / "restored.img") == sha256_of(new_disk)


def test_a_touch_between_gcs_look_and_its_unlink_saves_the_chunk(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    digest, path = stored_chunk(store, os.urandom(4096))
    age([path])
    cutoff = time.time() - 60
    # gc has seen an hour-old unreferenced chunk; then a backup touches it to reuse it.
    assert store.touch_chunk(digest)
    assert sweep_chunk(path, cutoff) == 0
    assert path.exists() and sorted(os.listdir(path.parent)) == [path.name]
    age([path])
    size = path.stat().st_size
    assert sweep_chunk(path, cutoff) == size  # untouched: deleted
    assert not path.exists()


def test_a_touch_after_gc_set_the_chunk_aside_makes_the_backup_store_it_again(tmp_path, monkeypatch):
    store = Datastore.open_or_create(tmp_path / "store")
    data = os.urandom(4096)
    digest, path = stored_chunk(store, data)
    age([path])
    rename = os.rename

    def backup_arrives_just_after(source, destination):
        rename(source, destination)
        if str(destination).endswith(".sweeping"):
            assert not store.touch_chunk(digest), "the chunk is gone: the backup must write it"
            store.write_chunk(digest, codec.compress(data))

    monkeypatch.setattr(os, "rename", backup_arrives_just_after)
    assert sweep_chunk(path, time.time() - 60) > 0  # the old copy went
    monkeypatch.undo()
    assert codec.decompress(path.read_bytes()) == data  # the backup's copy stayed
    assert sorted(os.listdir(path.parent)) == [path.name]


def test_a_running_writer_holds_back_the_cutoff(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    with store.register("backup", "backup sda"):
        time.sleep(0.05)
        _, path = stored_chunk(store, os.urandom(4096))  # not in any image yet
        time.sleep(0.05)
        result = collect(store.root, safety_margin=0.0)
        assert path.exists() and result.kept_recent == 1 and result.removed == 0
    assert collect(store.root, safety_margin=0.0).removed == 1
    assert not path.exists()


def test_gc_removes_bad_chunks_and_stale_leftovers_but_not_fresh_ones(tmp_path):
    disk = tmp_path / "disk.img"
    write_random(disk, 4 * MiB)
    result = backup(str(disk), tmp_path / "store", disk_id="sda")
    store = Datastore.open(tmp_path / "store")
    folder = store.chunk_path(Image.open(result.image).index()[0]).parent
    bad = folder / f"{'ab' * 32}.zst.bad"
    stale_tmp, fresh_tmp = folder / ".x.zst.0001.tmp", folder / ".y.zst.0002.tmp"
    images = store.images_dir / "sda"
    dead_image, live_image = images / ".2020-01-01T00-00-00Z.tmp", images / ".2026-01-01T00-00-00Z.tmp"
    interrupted_prune = images / ".2019-01-01T00-00-00Z.deleting"
    for path in (bad, stale_tmp, fresh_tmp):
        path.write_bytes(b"x" * 100)
    for path in (dead_image, live_image, interrupted_prune):
        path.mkdir()
        (path / "index").write_text("")
    # A crashed job's registration, silent for longer than a live job ever is, goes too.
    dead_job = store.jobs_dir / "host-b-4242-0001"
    dead_job.write_text(json.dumps({"kind": "backup", "what": "backup sdb", "host": "host-b",
                                    "pid": 4242, "started": 0.0}))
    age([stale_tmp, dead_image, interrupted_prune, dead_job], 2 * HOUR)
    assert 2 * HOUR > JOB_STALE

    output = imaging("gc", "--store", store.root).stdout
    assert "1 corrupt (.bad) chunks, 4 leftovers of interrupted jobs" in output
    assert not bad.exists() and not stale_tmp.exists() and fresh_tmp.exists()
    assert not dead_image.exists() and not interrupted_prune.exists() and live_image.exists()
    assert not dead_job.exists()
    assert verify(str(result.image)).ok


def test_gc_stops_without_deleting_anything_when_an_image_is_unreadable(tmp_path):
    disk = tmp_path / "disk.img"
    write_random(disk, 4 * MiB)
    store = Datastore.open_or_create(tmp_path / "store")
    _, garbage = stored_chunk(store, os.urandom(4096))
    age([garbage])
    result = backup(str(disk), store.root, disk_id="sda")
    (result.image / "index").write_text("not an index\n")
    line = one_error_line(imaging("gc", "--store", store.root, check=False))
    assert "nothing deleted" in line and str(result.image) in line
    assert garbage.exists()
    assert "not a datastore" in one_error_line(imaging("gc", "--store", tmp_path / "nowhere",
                                                       check=False))


def test_a_negative_safety_margin_is_refused_before_anything_is_deleted(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    _, garbage = stored_chunk(store, os.urandom(4096))
    age([garbage])
    line = one_error_line(imaging("gc", "--store", store.root, "--safety-margin", "-5",
                                  check=False))
    assert "safety margin must not be negative (-5 s)" in line and "--" not in line
    assert garbage.exists()


def test_gc_counts_its_progress_in_chunks(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    digests = [stored_chunk(store, os.urandom(4096))[0] for _ in range(5)]
    age(store.chunk_path(digest) for digest in digests)
    events = []
    collect(store.root, safety_margin=0.0, progress=Progress("gc", 0, events.append, interval=0))
    assert {(event.phase, event.unit) for event in events} == {("gc", "chunks")}
    assert events[-1].finished and events[-1].done == events[-1].total == 5
    assert [event.finished for event in events].count(True) == 1
    assert chunk_files(store) == set()
