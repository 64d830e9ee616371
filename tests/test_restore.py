"""Restore as a job: its phases and events, cancel, and failures as one clear line."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
from engine import (
    BLOCK,
    REPO,
    MiB,
    cached_blocks,
    imaging,
    one_error_line,
    sha256_of,
    write_random,
)

import imaging.restore as restore_module
from imaging.backup import backup
from imaging.base.errors import Cancelled, ImageError, TargetError
from imaging.base.progress import Progress
from imaging.datastore.image import Image
from imaging.datastore.store import Datastore
from imaging.restore import restore

CHUNK = 64 * 1024
SIZE = 8 * MiB


@pytest.fixture
def image(tmp_path):
    """(image directory, the disk it was taken of), in a store of small chunks."""
    disk = tmp_path / "disk.img"
    write_random(disk, SIZE, seed=5)
    result = backup(str(disk), tmp_path / "store", disk_id="sda", chunk_size=CHUNK)
    return result.image, disk


def no_jobs_left(image_dir) -> bool:
    return not [p for p in Datastore.open(image_dir.parent.parent.parent).jobs_dir.iterdir()
                if not p.name.startswith(".")]


def test_phases_are_restore_then_verify_and_finished_comes_once_at_the_end(image, tmp_path):
    image_dir, disk = image
    events = []
    result = restore(str(image_dir), str(tmp_path / "restored.img"),
                     progress=Progress("restore", 0, events.append, interval=0))
    assert result.verified and sha256_of(tmp_path / "restored.img") == sha256_of(disk)
    phases = [event.phase for event in events]
    assert phases == sorted(phases, key=["restore", "verify"].index)
    assert phases.count("restore") > 1 and phases.count("verify") > 1
    assert [event.finished for event in events] == [False] * (len(events) - 1) + [True]
    last = events[-1]
    assert (last.phase, last.unit, last.done, last.total) == ("verify", "bytes", SIZE, SIZE)
    assert json.loads(json.dumps(result.as_dict()))["verified"] is True


def test_no_verify_restores_the_bytes_and_sends_no_verify_phase(image, tmp_path):
    image_dir, disk = image
    target = tmp_path / "restored.img"
    run = imaging("restore", image_dir, target, "--no-verify", "--json-progress")
    assert sha256_of(target) == sha256_of(disk)
    assert run.stdout.rstrip().endswith("not verified")
    events = [json.loads(line) for line in run.stderr.splitlines()]
    assert events and {event["phase"] for event in events} == {"restore"}
    assert [event["finished"] for event in events].count(True) == 1 and events[-1]["finished"]
    assert events[-1]["done"] == SIZE


@pytest.mark.parametrize("phase", ["restore", "verify"])
def test_cancel_stops_the_restore_in_either_phase(image, tmp_path, phase):
    image_dir, disk = image
    target = tmp_path / "restored.img"
    cancel = threading.Event()
    seen = []

    def cancel_midway(event):
        seen.append(event)
        if event.phase == phase and event.done >= SIZE // 4:
            cancel.set()  # what the CLI's SIGTERM handler does

    with pytest.raises(Cancelled):
        restore(str(image_dir), str(target),
                progress=Progress("restore", 0, cancel_midway, interval=0, cancel=cancel))
    assert seen[-1].phase == phase and seen[-1].done < SIZE and not seen[-1].finished
    if phase == "verify":
        assert sha256_of(target) == sha256_of(disk)  # written in full, then stopped checking
    else:
        assert sha256_of(target) != sha256_of(disk)
    assert no_jobs_left(image_dir)


def test_a_corrupt_chunk_is_one_clear_line(image, tmp_path):
    image_dir, _ = image
    digest = Image.open(image_dir).index()[3]
    chunk = Image.open(image_dir).store.chunk_path(digest)
    frame = bytearray(chunk.read_bytes())
    frame[len(frame) // 2] ^= 0xFF
    chunk.write_bytes(bytes(frame))
    line = one_error_line(imaging("restore", image_dir, tmp_path / "restored.img", check=False))
    assert line.startswith(f"imaging: error: chunk {digest} is corrupt: undecodable zstd frame (")


def test_a_chunk_that_vanishes_midway_is_one_clear_line(image, tmp_path):
    image_dir, _ = image
    store = Image.open(image_dir).store
    last = Image.open(image_dir).index()[-1]

    def delete_a_later_chunk(event):
        if event.done and store.chunk_path(last).exists():
            store.chunk_path(last).unlink()

    with pytest.raises(ImageError) as failed:
        restore(str(image_dir), str(tmp_path / "restored.img"),
                progress=Progress("restore", 0, delete_a_later_chunk, interval=0), workers=1)
    assert str(failed.value) == f"chunk {last} is missing from {store.root}"
    assert no_jobs_left(image_dir)


def test_a_target_that_cannot_be_read_back_is_one_clear_line(image, tmp_path):
    image_dir, _ = image
    target = tmp_path / "restored.img"

    def remove_the_target_before_it_is_read_back(event):
        if event.phase == "verify" and target.exists():
            target.unlink()

    with pytest.raises(TargetError) as failed:
        restore(str(image_dir), str(target),
                progress=Progress("restore", 0, remove_the_target_before_it_is_read_back))
    assert str(failed.value) == (f"cannot read back {target} to verify it: "
                                 f"{target}: no such file or directory")


def test_a_target_file_that_cannot_be_sized_is_one_clear_line(image, tmp_path):
    image_dir, _ = image
    target = tmp_path / "restored.img"
    assert shutil.which("prlimit"), "prlimit comes with util-linux, as losetup does"
    # Files may not grow past 1 MiB for this process (Python ignores SIGXFSZ).
    command = ["prlimit", f"--fsize={MiB}", sys.executable, "-m", "imaging", "restore",
               image_dir, target]
    line = one_error_line(subprocess.run(command, cwd=REPO, capture_output=True, text=True))
    assert line == f"imaging: error: cannot empty the target file {target}: file too large"
    assert os.path.getsize(target) == 0


def test_whole_chunks_go_past_the_page_cache_and_the_rest_through_it(tmp_path):
    """Direct writes for aligned whole chunks, buffered ones for a 1000-byte last chunk."""
    disk = tmp_path / "disk.img"
    write_random(disk, SIZE, seed=6)
    with open(disk, "ab") as tail:
        tail.write(os.urandom(1000))
    image_dir = backup(str(disk), tmp_path / "store", disk_id="odd", chunk_size=CHUNK).image
    target = tmp_path / "restored.img"
    assert not restore(str(image_dir), str(target), verify=False).verified
    assert cached_blocks(target) == {SIZE // BLOCK}
    assert restore(str(image_dir), str(target)).verified
    assert sha256_of(target) == sha256_of(disk) and target.stat().st_size == SIZE + 1000


def test_a_target_that_takes_no_direct_io_is_written_through_the_page_cache(image, tmp_path,
                                                                          monkeypatch):
    image_dir, disk = image
    monkeypatch.setattr(restore_module, "_reopened_direct", lambda fd, flags: None)
    target = tmp_path / "restored.img"
    assert restore(str(image_dir), str(target)).verified
    assert sha256_of(target) == sha256_of(disk)
