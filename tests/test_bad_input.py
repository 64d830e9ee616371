"""Bad input gets one clear line on stderr, exit 1, and loses nothing."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading

import pytest
from engine import REPO, MiB, imaging, one_error_line, sha256_of, write_random
from support.devices import loop_device, mounted, requires_loop, run

from imaging.backup import backup
from imaging.errors import Cancelled
from imaging.progress import Progress


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "disk.img"
    write_random(path, 16 * MiB)
    return path


def test_usage_errors_exit_2(tmp_path):
    assert imaging("backup", check=False).returncode == 2
    assert imaging("backup", tmp_path, "--store", tmp_path, "--level", "99", check=False).returncode == 2


def test_missing_source(tmp_path):
    message = one_error_line(imaging("backup", tmp_path / "nope", "--store", tmp_path / "s", check=False))
    assert "nope" in message and "no such file or directory" in message


def test_directory_is_not_a_source(tmp_path):
    message = one_error_line(imaging("backup", tmp_path, "--store", tmp_path / "s", check=False))
    assert "not a block device or a regular file" in message


def test_forged_disk_id_is_refused(source, tmp_path):
    message = one_error_line(imaging("backup", source, "--store", tmp_path / "s", "--disk", "../../etc", check=False))
    assert "invalid disk id" in message
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda index: index.write_text(index.read_text().splitlines()[0] + "\n"), "corrupt or truncated index"),
    (lambda index: index.write_text(index.read_text().replace("a", "b", 1)), "corrupt index"),
    (lambda index: index.unlink(), "missing index"),
])
def test_damaged_index_is_refused_without_touching_the_target(source, tmp_path, damage, expected):
    result = backup(str(source), tmp_path / "store", disk_id="d")
    damage(result.image / "index")
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    for command in (("restore", result.image, target), ("verify", result.image)):
        assert expected in one_error_line(imaging(*command, check=False))
    assert target.read_bytes() == b"precious"


def test_missing_chunk_is_refused_before_the_target_is_written(source, tmp_path):
    result = backup(str(source), tmp_path / "store", disk_id="d")
    digest = (result.image / "index").read_text().split()[3]
    chunk = tmp_path / "store" / "chunks" / digest[:2] / f"{digest}.zst"
    chunk.unlink()
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    message = one_error_line(imaging("restore", result.image, target, check=False))
    assert "1 chunk(s) missing" in message and digest in message
    assert target.read_bytes() == b"precious"


def test_full_datastore_fails_cleanly_and_lists_nothing(source, tmp_path):
    requires_loop()
    fs = tmp_path / "small-store.img"
    fs.write_bytes(b"")
    os.truncate(fs, 12 * MiB)
    run("mkfs.ext4", "-q", "-m", "0", fs)
    with loop_device(fs) as device, mounted(device, tmp_path / "store") as store:
        message = one_error_line(imaging("backup", source, "--store", store, "--disk", "d", check=False))
        assert "no space left on device" in message
        assert "no images" in imaging("list", "--store", store).stdout
        assert not list(store.glob("images/d/.*.tmp")), "the unfinished image was removed"
        smaller = tmp_path / "small.img"
        write_random(smaller, 4 * MiB, seed=3)
        # Once there is room, the same store takes a backup that verifies.
        for leftover in store.glob("chunks/*/*.zst"):
            leftover.unlink()
        out = imaging("backup", smaller, "--store", store, "--disk", "d")
        assert imaging("verify", out.stdout.splitlines()[-1]).returncode == 0


def test_sigkill_mid_backup_leaves_nothing_that_looks_complete(tmp_path):
    source = tmp_path / "big.img"
    write_random(source, 256 * MiB)
    store = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-m", "imaging", "backup", source, "--store", store, "--disk", "d",
         "--level", "19", "--json-progress"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if json.loads(line)["done"] >= 8 * MiB:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert "no images" in imaging("list", "--store", store).stdout
    assert not any(p.name.endswith(".zst") and p.stat().st_size == 0 for p in store.rglob("*.zst"))
    again = imaging("backup", source, "--store", store, "--disk", "d", "--level", "1")
    image = again.stdout.splitlines()[-1]
    assert imaging("verify", image).returncode == 0
    assert len(imaging("list", "--store", store).stdout.splitlines()) == 2


def test_cancel_between_chunks_leaves_no_image(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 64 * MiB)
    cancel = threading.Event()

    def stop_after_first_event(event):
        cancel.set()

    progress = Progress("backup", 0, stop_after_first_event, interval=0, cancel=cancel)
    with pytest.raises(Cancelled):
        backup(str(source), tmp_path / "store", disk_id="d", progress=progress)
    assert 0 < progress.done < 64 * MiB
    assert list((tmp_path / "store" / "images" / "d").iterdir()) == []
    assert not list((tmp_path / "store" / "writers").iterdir())
    assert sha256_of(source)  # the source is untouched and readable
