"""Recompress: re-encode an image's chunks at another level, crash-safely."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys

import pytest
from engine import REPO, MiB, imaging, last_line, one_error_line, sha256_of
from support.disks import PartSpec, build_disk

from imaging.datastore.image import Image
from imaging.datastore.store import Datastore

# Small chunks: many of them, so a kill lands between chunk writes.
CHUNK_SIZE = 256 * 1024


@pytest.fixture
def two_images(tmp_path):
    """Two images of one disk sharing most chunks: before and after a change."""
    disk = build_disk(tmp_path / "disk.img", 16 * MiB, "dos",
                      [PartSpec(10 * MiB, "fat16"), PartSpec(3 * MiB, "raw-noise")], seed=7)
    store = tmp_path / "store"
    Datastore.open_or_create(store, CHUNK_SIZE)
    first = Image.open(last_line(imaging("backup", disk.path, "--store", store, "--disk", "sda",
                                         "--level", "1").stdout))
    with open(disk.path, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(os.urandom(MiB))
    second = Image.open(last_line(imaging("backup", disk.path, "--store", store, "--disk", "sda",
                                          "--level", "1").stdout))
    return disk, first, second


def stored_size(image: Image) -> int:
    return sum(image.store.chunk_path(d).stat().st_size for d in set(image.index()))


def test_recompress_shrinks_updates_the_manifest_and_keeps_every_image(two_images, tmp_path):
    disk, first, second = two_images
    before = stored_size(second)
    result = imaging("recompress", second.path, "--level", "9")
    after = stored_size(second)
    assert after < before
    assert f"{len(set(second.index()))} chunks re-encoded at level 9" in result.stdout
    manifest = json.loads((second.path / "manifest.json").read_text())
    assert manifest["level"] == 9 and manifest["stored_bytes"] == after
    assert manifest["sha256"] == second.manifest.sha256
    # Each chunk is still a standard frame whose content hashes to its name.
    for digest in sorted(set(second.index()))[:3]:
        data = subprocess.run(["zstd", "-dc", second.store.chunk_path(digest)],
                              capture_output=True, check=True).stdout
        assert hashlib.sha256(data).hexdigest() == digest
    for image in (first, second):
        assert "intact" in imaging("verify", image.path).stdout
    imaging("restore", second.path, tmp_path / "restored.img")
    assert sha256_of(tmp_path / "restored.img") == sha256_of(disk.path)


def test_sigkill_midway_leaves_every_image_verifiable(two_images):
    _, first, second = two_images
    digests = sorted(set(second.index()))
    frames = {d: second.store.chunk_path(d).read_bytes() for d in digests}
    process = subprocess.Popen(
        [sys.executable, "-m", "imaging", "recompress", second.path, "--level", "19",
         "--json-progress"], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for line in process.stderr:
            if json.loads(line)["done"] > 0:
                break
        assert process.poll() is None, "recompress finished before it could be killed"
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    changed = sum(second.store.chunk_path(d).read_bytes() != frames[d] for d in digests)
    assert 0 < changed < len(digests), "killed midway"
    assert json.loads((second.path / "manifest.json").read_text())["level"] == 1
    for image in (first, second):
        assert "intact" in imaging("verify", image.path).stdout


def test_bad_input_is_one_clear_line(two_images, tmp_path):
    _, _, second = two_images
    for arguments, words in [([second.path, "--level", "23"], "level 23"),
                             ([tmp_path / "nowhere", "--level", "5"], "no such image directory"),
                             ([tmp_path, "--level", "5"], "not an image")]:
        line = one_error_line(imaging("recompress", *arguments, check=False))
        assert words in line, line
    victim = sorted(set(second.index()))[0]
    second.store.chunk_path(victim).unlink()
    line = one_error_line(imaging("recompress", second.path, "--level", "5", check=False))
    assert victim in line and "missing" in line
