"""Jobs register in the datastore with a heartbeat; gc and prune spare what they use.

A restore (or any reader) keeps its image from prune and its chunks from
garbage collection for as long as it runs; a writer's heartbeat, never its
process id, tells other hosts and containers that it is alive; a heartbeat that
cannot be written stops its job with one clear line.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from engine import REPO, MiB, imaging, one_error_line, sha256_of, write_random
from support.requirements import requirement_missing

from imaging import prune as prune_module
from imaging.backup import backup
from imaging.base.errors import ImageError, StoreError
from imaging.base.progress import Progress
from imaging.datastore import codec, store as store_module
from imaging.datastore.image import Image
from imaging.datastore.store import JOB_STALE, Datastore
from imaging.disks.inventory import host_name
from imaging.gc import collect
from imaging.prune import Retention, prune
from imaging.restore import restore
from imaging.verify import verify

CHUNK = 64 * 1024
SIZE = 8 * MiB
HOUR = 3600.0


def age(paths, seconds: float = HOUR) -> None:
    moment = time.time() - seconds
    for path in paths:
        os.utime(path, (moment, moment))


def chunk_files(store: Datastore) -> set[str]:
    return {p.name[:-len(".zst")] for p in store.chunks_dir.glob("*/*.zst")}


def stored_chunk(store: Datastore) -> Path:
    data = os.urandom(4096)
    store.write_chunk(codec.digest(data), codec.compress(data))
    return store.chunk_path(codec.digest(data))


def tokens(store: Datastore) -> list[Path]:
    return [p for p in store.jobs_dir.iterdir() if not p.name.startswith(".")]


class Pause:
    """A progress callback that holds its job at the first event `when` picks, until released."""

    def __init__(self, when) -> None:
        self.when = when
        self.reached = threading.Event()
        self.release = threading.Event()

    def __call__(self, event) -> None:
        if not self.reached.is_set() and self.when(event):
            self.reached.set()
            self.release.wait(60)


class Background:
    """A job run in a thread, its result or error kept for the test."""

    def __init__(self, function, *args, **kwargs) -> None:
        self.result = self.error = None

        def run() -> None:
            try:
                self.result = function(*args, **kwargs)
            except BaseException as exc:
                self.error = exc

        self.thread = threading.Thread(target=run)
        self.thread.start()

    def join(self):
        self.thread.join(120)
        assert not self.thread.is_alive(), "the job did not end"
        return self


def paused_restore(image: Path, target: Path) -> tuple[Pause, Background]:
    """A restore of `image` to `target`, held a quarter of the way through its writing."""
    pause = Pause(lambda event: event.phase == "restore" and event.done >= SIZE // 4)
    job = Background(restore, str(image), str(target),
                     progress=Progress("restore", 0, pause, interval=0))
    assert pause.reached.wait(60), "the restore never got going"
    return pause, job


@pytest.fixture
def history(tmp_path):
    """(store, the older disk, its image, a newer image of other data) on one disk id."""
    store = Datastore.open_or_create(tmp_path / "store", CHUNK)
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    write_random(old, SIZE, seed=1)
    write_random(new, SIZE, seed=2)
    older = backup(str(old), store.root, disk_id="sda").image
    newer = backup(str(new), store.root, disk_id="sda").image
    # An hour old: nothing but a registration can spare them now.
    age(store.chunks_dir.glob("*/*.zst"))
    return store, old, older, newer


def test_prune_and_gc_during_a_restore_of_the_pruned_image(history, tmp_path):
    store, disk, pruned, kept = history
    only_pruned = set(Image.open(pruned).index()) - set(Image.open(kept).index())
    assert len(only_pruned) == SIZE // CHUNK
    target = tmp_path / "restored.img"
    pause, job = paused_restore(pruned, target)
    try:
        dry = imaging("prune", "--store", store.root, "--disk", "sda", "--keep-last", "1",
                      "--dry-run").stdout
        assert f"deferred      {pruned.name}  being read by restore sda/{pruned.name}" in dry
        assert "would remove 0 of 2 images of sda, deferred 1 being read" in dry
        result = prune(store.root, "sda", Retention(last=1))
        assert result.removed == [] and result.deferred == [pruned] and pruned.is_dir()
        decision = next(d for d in result.decisions if d.image == pruned)
        assert decision.keep and decision.reason == (
            f"being read by restore sda/{pruned.name} to {target} on {host_name()}")
        assert json.loads(json.dumps(result.as_dict()))["deferred"] == [str(pruned)]
        swept = collect(store.root, safety_margin=0.0)
        assert swept.removed == 0 and only_pruned <= chunk_files(store)
    finally:
        pause.release.set()
    assert job.join().error is None, job.error
    assert job.result.verified and sha256_of(target) == sha256_of(disk)
    assert tokens(store) == []

    later = prune(store.root, "sda", Retention(last=1))
    assert later.removed == [pruned] and later.deferred == [] and not pruned.exists()
    assert collect(store.root, safety_margin=0.0).removed == len(only_pruned)
    assert chunk_files(store) == set(Image.open(kept).index())


def test_gc_keeps_every_chunk_while_a_reader_of_a_vanished_image_runs(history, tmp_path):
    store, disk, image, _ = history
    target = tmp_path / "restored.img"
    pause, job = paused_restore(image, target)
    try:
        # Deleted behind prune's back: by hand, or by a host whose NFS cache hid the reader.
        shutil.rmtree(image)
        swept = collect(store.root, safety_margin=0.0)
        assert swept.removed == 0 and swept.kept_recent == SIZE // CHUNK
    finally:
        pause.release.set()
    assert job.join().error is None, job.error
    assert sha256_of(target) == sha256_of(disk)
    assert collect(store.root, safety_margin=0.0).removed == SIZE // CHUNK


def test_a_reader_that_registers_after_prune_looked_finds_the_image_gone(history, tmp_path,
                                                                        monkeypatch):
    store, _, pruned, _ = history
    target = tmp_path / "restored.img"
    pruned_meanwhile = []
    register = Datastore.register

    def prune_before_the_token_is_written(self, kind, what, **options):
        # The restore has opened the image once; prune comes, looks and deletes (prune's
        # own registration goes through).
        if kind == "restore":
            pruned_meanwhile.append(prune(store.root, "sda", Retention(last=1)))
        return register(self, kind, what, **options)

    monkeypatch.setattr(Datastore, "register", prune_before_the_token_is_written)
    with pytest.raises(ImageError, match=f"{pruned}: no such image directory"):
        restore(str(pruned), str(target))
    assert pruned_meanwhile[0].removed == [pruned]
    assert not target.exists() and tokens(store) == []


def test_a_reader_registered_between_prunes_two_looks_gets_the_image_put_back(history,
                                                                            monkeypatch):
    store, _, pruned, _ = history
    name = f"sda/{pruned.name}"
    look = prune_module.reader_of
    with contextlib.ExitStack() as reading:

        def reader_arrives_after_the_first_look(store_, image):
            if not image.exists():  # hidden: the reader registered just before
                reading.enter_context(store.register("export", f"export {name}", images=[name]))
                return look(store_, image)
            return None

        monkeypatch.setattr(prune_module, "reader_of", reader_arrives_after_the_first_look)
        result = prune(store.root, "sda", Retention(last=1))
    monkeypatch.undo()
    assert result.deferred == [pruned] and result.removed == []
    assert pruned.is_dir() and verify(str(pruned)).ok


def test_a_writer_on_another_host_counts_while_its_heartbeat_is_fresh(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    chunk = stored_chunk(store)
    age([chunk], HOUR / 2)  # touched after the writer started: it may count on it
    token = store.jobs_dir / "nas-client-2-4242-aaaa"
    token.write_text(json.dumps({"kind": "backup", "what": "backup sdb", "host": "nas-client-2",
                                 "pid": 999999999, "started": time.time() - HOUR}))
    assert [job.what for job in store.running_jobs()] == ["backup sdb"]
    kept = collect(store.root, safety_margin=0.0)
    assert kept.removed == 0 and kept.kept_recent == 1 and chunk.exists()

    age([token], JOB_STALE + 10)  # its host died: no heartbeat since
    assert store.running_jobs() == []
    swept = collect(store.root, safety_margin=0.0)
    assert swept.removed == 1 and not chunk.exists()
    assert swept.temp_removed == 1 and not token.exists()


def test_a_token_nobody_can_read_holds_back_every_chunk_until_it_goes_stale(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    chunk = stored_chunk(store)
    age([chunk], 100 * HOUR)
    token = store.jobs_dir / "garbled"
    token.write_bytes(b'{"kind": "backup", "wh')
    assert collect(store.root, safety_margin=0.0).removed == 0 and chunk.exists()
    age([token], JOB_STALE + 10)
    assert collect(store.root, safety_margin=0.0).removed == 1 and not token.exists()


def test_a_job_in_another_pid_namespace_counts_while_its_heartbeat_is_fresh(tmp_path):
    """A live writer whose pid this host cannot see: os.kill(pid, 0) would call it dead."""
    store = Datastore.open_or_create(tmp_path / "store")
    registered = ("import sys\n"
                  "from imaging.datastore.store import Datastore\n"
                  "with Datastore.open(sys.argv[1]).register('backup', 'backup in a container') "
                  "as registration:\n"
                  "    print(registration.job.pid, flush=True)\n"
                  "    sys.stdin.read()\n")
    # In a new PID namespace, pids start over; this one is past this host's pid_max.
    command = ["unshare", "--pid", "--fork", "--kill-child", "--mount-proc", "sh", "-c",
               'echo 999990 > /proc/sys/kernel/ns_last_pid && "$0" -c "$1" "$2"',
               sys.executable, registered, str(store.root)]
    try:
        container = subprocess.Popen(command, cwd=REPO, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    except FileNotFoundError:
        requirement_missing("unshare (util-linux) is missing")
    try:
        line = container.stdout.readline()
        if not line:
            requirement_missing(f"cannot make a PID namespace: {container.stderr.read().strip()}")
        pid = int(line)
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
        [job] = store.running_jobs()
        assert (job.what, job.pid, job.host) == ("backup in a container", pid, host_name())
        chunk = stored_chunk(store)  # written after that backup began: it may use it
        assert collect(store.root, safety_margin=0.0).kept_recent == 1 and chunk.exists()
    finally:
        container.kill()  # with --kill-child, the job dies without removing its token
        container.wait()
    # Dead now, but nothing here can know that before its heartbeat goes stale.
    assert [job.pid for job in store.running_jobs()] == [pid]
    age(tokens(store), JOB_STALE + 10)
    assert store.running_jobs() == []
    assert collect(store.root, safety_margin=0.0).removed == 1 and tokens(store) == []


@pytest.fixture
def quick_heartbeat(monkeypatch):
    monkeypatch.setattr(store_module, "JOB_HEARTBEAT", 0.05)


def test_the_heartbeat_keeps_the_token_fresh(tmp_path, quick_heartbeat):
    store = Datastore.open_or_create(tmp_path / "store")
    with store.register("backup", "backup sda") as registration:
        age([registration.token], HOUR)
        deadline = time.monotonic() + 10
        while time.time() - registration.token.stat().st_mtime > 60:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.02)
        assert [job.what for job in store.running_jobs()] == ["backup sda"]
    assert tokens(store) == []


def test_a_removed_token_stops_the_restore_with_one_line(history, tmp_path, quick_heartbeat):
    store, _, image, _ = history
    pause, job = paused_restore(image, tmp_path / "restored.img")
    try:
        [token] = tokens(store)
        token.unlink()
        time.sleep(0.5)  # several heartbeats
    finally:
        pause.release.set()
    error = job.join().error
    assert isinstance(error, StoreError), error
    assert str(error) == (f"restore sda/{image.name} to {tmp_path / 'restored.img'} stopped: "
                          f"its heartbeat in {store.root} failed (no such file or directory)")


def test_a_job_that_went_without_heartbeats_too_long_stops(tmp_path, quick_heartbeat,
                                                           monkeypatch):
    store = Datastore.open_or_create(tmp_path / "store")
    asleep = threading.Event()
    uptime = store_module._uptime
    # As if the host were suspended for two minutes once the job is under way.
    monkeypatch.setattr(store_module, "_uptime", lambda: uptime() + (
        store_module.JOB_LAPSE + 5 if asleep.is_set() else 0))
    progress = Progress("backup", 0)
    registration = store.register("backup", "backup sda", progress=progress)
    with pytest.raises(StoreError) as on_leaving:
        with registration:
            asleep.set()
            deadline = time.monotonic() + 10
            while registration.error is None:
                assert time.monotonic() < deadline, "the lapse went unnoticed"
                time.sleep(0.02)
            with pytest.raises(StoreError) as polled:
                progress.cancelled()  # what the job polls between chunks
    assert str(polled.value) == str(on_leaving.value) == (
        f"backup sda stopped: its heartbeat in {store.root} failed (no heartbeat for 125 s)")
    assert tokens(store) == []


@contextlib.contextmanager
def tmpfs(mountpoint: Path, size: str):
    if os.geteuid() != 0:
        requirement_missing("mounting a tmpfs needs root")
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mountpoint], check=True)
    try:
        yield mountpoint
    finally:
        if subprocess.run(["umount", mountpoint]).returncode:
            subprocess.run(["umount", "-l", mountpoint], check=True)


def test_a_store_gone_read_only_stops_the_restore_with_one_line(tmp_path, quick_heartbeat):
    disk = tmp_path / "disk.img"
    write_random(disk, SIZE)
    target = tmp_path / "restored.img"
    with tmpfs(tmp_path / "nas", "32m") as nas:
        image = backup(str(disk), nas / "store", disk_id="sda", chunk_size=CHUNK).image
        pause, job = paused_restore(image, target)
        try:
            subprocess.run(["mount", "-o", "remount,ro", nas], check=True)
            time.sleep(0.5)
        finally:
            pause.release.set()
            error = job.join().error
            subprocess.run(["mount", "-o", "remount,rw", nas], check=True)
    assert isinstance(error, StoreError), error
    assert str(error).endswith("its heartbeat in "
                               f"{nas / 'store'} failed (read-only file system)")
    assert "\n" not in str(error)


def test_a_full_store_refuses_to_register_the_restore(tmp_path):
    disk = tmp_path / "disk.img"
    write_random(disk, 1 * MiB)
    target = tmp_path / "restored.img"
    with tmpfs(tmp_path / "nas", "4m") as nas:
        image = backup(str(disk), nas / "store", disk_id="sda").image
        with open(nas / "filler", "wb") as filler, contextlib.suppress(OSError):
            while True:
                filler.write(bytes(MiB))
                filler.flush()
        line = one_error_line(imaging("restore", image, target, check=False))
        assert tokens(Datastore.open(nas / "store")) == []
    assert line.startswith(f"imaging: error: cannot register restore sda/{image.name} to "
                           f"{target} in {nas / 'store'}: ")
    assert line.endswith("no space left on device")
    assert not target.exists()


def test_two_collections_at_once_the_second_fails_clearly(history):
    store, _, _, _ = history
    pause = Pause(lambda event: event.phase == "gc")
    first = Background(collect, store.root, progress=Progress("gc", 0, pause, interval=0))
    assert pause.reached.wait(60)
    try:
        line = one_error_line(imaging("gc", "--store", store.root, check=False))
        assert line == f"imaging: error: another garbage collection is running on {store.root}"
        line = one_error_line(imaging("prune", "--store", store.root, "--disk", "sda",
                                      "--keep-last", "1", check=False))
        assert line == (f"imaging: error: garbage collection is running on {store.root}: "
                        "prune once it is done")
        assert len(list((store.images_dir / "sda").iterdir())) == 2
    finally:
        pause.release.set()
    assert first.join().error is None, first.error
    assert collect(store.root).images == 2


def test_gc_waits_for_a_running_prune(history):
    store, _, pruned, _ = history
    pause = Pause(lambda event: event.phase == "prune" and event.done == 1)  # one removed
    pruning = Background(prune, store.root, "sda", Retention(last=1),
                         progress=Progress("prune", 0, pause, interval=0))
    assert pause.reached.wait(60)
    collecting = Background(collect, store.root, safety_margin=0.0)
    time.sleep(0.5)
    assert collecting.thread.is_alive(), "gc ran while a prune was midway"
    pause.release.set()
    assert pruning.join().error is None and pruning.result.removed == [pruned]
    assert collecting.join().error is None
    assert collecting.result.images == 1 and collecting.result.removed == SIZE // CHUNK
