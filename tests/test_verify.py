"""Verify re-hashes every chunk, names the bad ones and lets the next backup heal them."""
from __future__ import annotations

from engine import MiB, imaging, write_random

from imaging.backup import backup
from imaging.datastore import codec
from imaging.datastore.image import Image


def test_flipped_byte_is_named_set_aside_and_healed_by_the_next_backup(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 16 * MiB)
    store = tmp_path / "store"
    first = backup(str(source), store, disk_id="d")
    image = Image.open(first.image)
    victim = image.index()[2]
    chunk = image.store.chunk_path(victim)
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))

    failed = imaging("verify", first.image, check=False)
    assert failed.returncode == 1
    assert f"chunk {victim}: corrupt" in failed.stdout
    assert [line for line in failed.stdout.splitlines() if line.startswith("chunk ")] == \
        [line for line in failed.stdout.splitlines() if victim in line]
    assert not chunk.exists() and chunk.with_name(chunk.name + ".bad").exists()

    second = backup(str(source), store, disk_id="d")
    assert second.new_bytes == chunk.stat().st_size  # exactly the healed chunk was stored again
    assert "all 4 distinct chunks intact" in imaging("verify", first.image).stdout
    assert imaging("verify", second.image).returncode == 0


def test_chunk_whose_content_does_not_match_its_name_is_corrupt(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 8 * MiB)
    result = backup(str(source), tmp_path / "store", disk_id="d")
    image = Image.open(result.image)
    first, second = image.index()
    # A valid zstd frame holding the wrong data: only the name check can catch it.
    image.store.chunk_path(first).write_bytes(codec.compress(bytes(4 * MiB)))
    failed = imaging("verify", result.image, check=False)
    assert failed.returncode == 1
    assert f"chunk {first}: corrupt (content does not match its name)" in failed.stdout
    assert second not in failed.stdout


def test_missing_chunk_is_named(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 8 * MiB)
    result = backup(str(source), tmp_path / "store", disk_id="d")
    image = Image.open(result.image)
    gone = image.index()[1]
    image.store.chunk_path(gone).unlink()
    failed = imaging("verify", result.image, check=False)
    assert failed.returncode == 1 and f"chunk {gone}: missing" in failed.stdout
