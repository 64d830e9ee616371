"""Changed chunks stored as deltas against the disk's previous image."""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest
from engine import MiB, imaging, sha256_of, text_like

from imaging.backup import backup
from imaging.datastore import codec
from imaging.datastore.chunks import read_chunk
from imaging.datastore.image import Image
from imaging.datastore.store import CONFIG_NAME, Datastore
from imaging.gc import collect
from imaging.recompress import recompress
from imaging.restore import restore
from imaging.verify import verify

CHUNK = 4 * MiB
# Places edited between backups: inside chunks 0, 1 and 3; chunk 2 stays as it was.
EDITS = (100_000, CHUNK + 7, 3 * CHUNK + 123)


def edited(data: bytearray, seed: int, places=EDITS, length: int = 3000) -> bytearray:
    rng = random.Random(seed)
    changed = bytearray(data)
    for offset in places:
        changed[offset:offset + length] = rng.randbytes(length)
    return changed


def entries(image_dir: Path) -> list[tuple[str, str | None]]:
    return [tuple(entry) for entry in Image.open(image_dir).entries()]


@pytest.fixture
def history(tmp_path):
    """Two backups of one disk, the second after small edits in three of its four chunks."""
    disk = tmp_path / "disk.img"
    first_data = text_like(4 * CHUNK, seed=1)
    disk.write_bytes(first_data)
    first = backup(str(disk), tmp_path / "store", disk_id="d")
    second_data = edited(first_data, seed=2)
    disk.write_bytes(second_data)
    second = backup(str(disk), tmp_path / "store", disk_id="d")
    return disk, first, second, bytes(second_data)


def test_a_changed_chunk_costs_its_changes_and_restores_byte_identical(history, tmp_path):
    disk, first, second, data = history
    before, after = entries(first.image), entries(second.image)
    assert [base for _, base in before] == [None] * 4
    # Chunks 0, 1, 3 are deltas against their predecessors; chunk 2 is the same chunk.
    assert after[2] == before[2]
    for position in (0, 1, 3):
        assert after[position][1] == before[position][0]
    whole = sum(len(codec.compress(data[p * CHUNK:(p + 1) * CHUNK])) for p in (0, 1, 3))
    # Three 3000-byte random edits: a few KiB each, not three whole frames of ~1.5 MiB.
    assert second.new_bytes < 3 * 3000 + 3 * 1024, (second.new_bytes, whole)
    assert second.new_bytes * 50 < whole
    manifest = json.loads((second.image / "manifest.json").read_text())
    assert manifest["new_bytes"] == second.new_bytes
    restored = tmp_path / "restored.img"
    restore(str(second.image), str(restored))
    assert sha256_of(restored) == hashlib.sha256(data).hexdigest()


def test_stock_zstd_restores_a_delta_and_names_it(history, tmp_path):
    _, _, second, data = history
    store = second.image.parent.parent.parent
    digest, base = entries(second.image)[0]
    chunk_file = store / "chunks" / digest[:2] / f"{digest}.zst"
    base_raw = tmp_path / "base.raw"
    with open(base_raw, "wb") as out:
        subprocess.run(["zstd", "-dcq", store / "chunks" / base[:2] / f"{base}.zst"],
                       stdout=out, check=True)
    alone = subprocess.run(["zstd", "-dcq", chunk_file], capture_output=True)
    assert alone.returncode != 0  # it needs its base
    named = subprocess.run(f"zstd -dcq -D {base_raw} {chunk_file} | sha256sum", shell=True,
                           capture_output=True, text=True, check=True)
    assert named.stdout.split()[0] == digest == hashlib.sha256(data[:CHUNK]).hexdigest()
    target = tmp_path / "by-recipe.img"
    recipe = subprocess.run(["sh", second.image / "RESTORE.txt", target], capture_output=True,
                            text=True)
    assert recipe.returncode == 0, recipe.stderr
    assert sha256_of(target) == hashlib.sha256(data).hexdigest()


def test_a_base_always_stands_alone(history, tmp_path):
    disk, first, second, data = history
    third_data = edited(bytearray(data), seed=3, places=(200_000, CHUNK + 50_000))
    disk.write_bytes(third_data)
    third = backup(str(disk), tmp_path / "store", disk_id="d")
    store = Datastore.open(tmp_path / "store")
    first_digests = [digest for digest, _ in entries(first.image)]
    for position, (digest, base) in enumerate(entries(third.image)):
        if base is not None:
            # Night three's deltas are against night one's chunks, never against a delta.
            assert base == first_digests[position]
            assert codec.delta_base(store.read_frame(base)) is None
            assert codec.delta_base(store.read_frame(digest)) == base
    assert [base is not None for _, base in entries(third.image)] == [True, True, False, True]
    restored = tmp_path / "restored.img"
    restore(str(third.image), str(restored))
    assert restored.read_bytes() == bytes(third_data)


def test_a_chunk_rewritten_through_is_stored_whole(tmp_path):
    disk = tmp_path / "disk.img"
    data = text_like(2 * CHUNK, seed=1)
    disk.write_bytes(data)
    backup(str(disk), tmp_path / "store", disk_id="d")
    data[CHUNK:] = text_like(CHUNK, seed=9)  # another text entirely
    disk.write_bytes(data)
    second = backup(str(disk), tmp_path / "store", disk_id="d")
    assert [base for _, base in entries(second.image)] == [None, None]
    assert second.new_bytes > 1 * MiB


def test_gc_keeps_the_base_of_a_delta_whose_first_image_is_gone(history, tmp_path):
    _, first, second, data = history
    shutil.rmtree(first.image)
    result = collect(tmp_path / "store", safety_margin=0)
    assert result.removed == 0  # every chunk of the first image is the base of a delta
    assert verify(str(second.image)).ok
    restored = tmp_path / "restored.img"
    restore(str(second.image), str(restored))
    assert sha256_of(restored) == hashlib.sha256(data).hexdigest()
    shutil.rmtree(second.image)
    assert collect(tmp_path / "store", safety_margin=0).removed == 7


def test_another_disk_reusing_a_delta_names_its_base(history, tmp_path):
    disk, _, second, data = history
    twin = backup(str(disk), tmp_path / "store", disk_id="twin")
    assert twin.new_bytes == 0
    assert entries(twin.image) == entries(second.image)


def test_verify_names_a_missing_base_and_sets_aside_only_the_corrupt(history, tmp_path):
    _, _, second, _ = history
    store = Datastore.open(tmp_path / "store")
    (digest0, base0), (digest1, base1), _, (digest3, base3) = entries(second.image)
    store.chunk_path(base0).unlink()
    frame = bytearray(store.read_frame(base1))
    frame[len(frame) // 2] ^= 0xFF
    store.chunk_path(base1).write_bytes(bytes(frame))
    result = verify(str(second.image))
    problems = {problem.digest: problem.reason for problem in result.problems}
    assert set(problems) == {base0, digest0, base1, digest1}
    assert problems[base0] == "missing"
    assert problems[base1].startswith("corrupt")
    for delta, base in ((digest0, base0), (digest1, base1)):
        assert problems[delta].startswith(f"unreadable: its base {base} is missing or corrupt")
        assert store.chunk_path(delta).exists()  # intact: only its base is set aside
    assert not store.chunk_path(base1).exists() and store.quarantined(base1)
    failed = imaging("restore", second.image, tmp_path / "out.img", check=False)
    assert failed.returncode == 1
    assert "2 chunk(s) missing" in failed.stderr
    assert not (tmp_path / "out.img").exists()
    recipe = subprocess.run(["sh", second.image / "RESTORE.txt", tmp_path / "by-recipe.img"],
                            capture_output=True, text=True)
    assert recipe.returncode != 0 and "restored" not in recipe.stdout


def test_a_base_set_aside_as_corrupt_is_stored_again_whole(history, tmp_path):
    disk, first, second, data = history
    store = Datastore.open(tmp_path / "store")
    digest, base = entries(second.image)[0]
    store.quarantine(digest)
    again = backup(str(disk), tmp_path / "store", disk_id="d")
    assert entries(again.image)[0] == (digest, None)
    assert codec.delta_base(store.read_frame(digest)) is None


def test_the_file_names_the_base_gc_keeps_and_restore_reads(history, tmp_path):
    """Another backup stored a chunk as a delta first; an index that says "whole" is outdated."""
    disk, first, second, data = history
    clone = backup(str(disk), tmp_path / "clone-store", disk_id="clone")
    store = Datastore.open(tmp_path / "store")
    digest, base = entries(second.image)[0]
    # The clone's chunk 0 is whole in its own store; copy that store's index
    # into the first store as if its backup had raced the delta's and lost.
    image_dir = store.images_dir / "clone" / clone.image.name
    shutil.copytree(clone.image, image_dir)
    assert entries(image_dir)[0] == (digest, None)
    shutil.rmtree(first.image)
    shutil.rmtree(second.image)
    collect(tmp_path / "store", safety_margin=0)
    assert store.chunk_path(base).exists()
    restored = tmp_path / "restored.img"
    restore(str(image_dir), str(restored))
    assert sha256_of(restored) == hashlib.sha256(data).hexdigest()
    recipe = subprocess.run(["sh", image_dir / "RESTORE.txt", tmp_path / "by-recipe.img"],
                            capture_output=True, text=True)
    assert recipe.returncode == 0, recipe.stderr
    assert sha256_of(tmp_path / "by-recipe.img") == hashlib.sha256(data).hexdigest()


def test_a_chunk_file_that_landed_first_stays(tmp_path):
    store = Datastore.open_or_create(tmp_path / "store")
    data = bytes(text_like(CHUNK, seed=1))
    digest = codec.digest(data)
    store.write_chunk(digest, codec.compress(data, 1))
    first = store.read_frame(digest)
    batch = store.chunk_batch()
    batch.add(digest, codec.compress(data, 19))
    batch.flush()
    assert store.read_frame(digest) == first
    batch.add(digest, codec.compress(data, 19), replace=True)
    batch.flush()
    assert store.read_frame(digest) != first
    assert read_chunk(store, digest, CHUNK) == data
    assert not list(store.chunk_path(digest).parent.glob(".*.tmp"))


def test_chunks_too_large_for_a_zstd_dictionary_get_no_deltas(tmp_path):
    assert Datastore.open_or_create(tmp_path / "small", 32 * MiB).deltas
    assert not Datastore.open_or_create(tmp_path / "large", 64 * MiB).deltas


def test_recompress_keeps_deltas_against_their_bases(history, tmp_path):
    _, _, second, data = history
    store = Datastore.open(tmp_path / "store")
    result = recompress(str(second.image), 9)
    assert result.chunks == 7  # four chunks of the image and three bases
    for digest, base in entries(second.image):
        assert codec.delta_base(store.read_frame(digest)) == base
    restored = tmp_path / "restored.img"
    restore(str(second.image), str(restored))
    assert sha256_of(restored) == hashlib.sha256(data).hexdigest()


def test_a_format_1_datastore_is_read_and_gets_no_deltas(tmp_path):
    store_dir = tmp_path / "store"
    Datastore.open_or_create(store_dir)
    (store_dir / CONFIG_NAME).write_text(json.dumps({"format": 1, "chunk_size": CHUNK}) + "\n")
    disk = tmp_path / "disk.img"
    data = text_like(2 * CHUNK, seed=1)
    disk.write_bytes(data)
    backup(str(disk), store_dir, disk_id="d")
    data = edited(data, seed=2, places=(1000,))
    disk.write_bytes(data)
    second = backup(str(disk), store_dir, disk_id="d")
    assert all(base is None for _, base in entries(second.image))
    assert (second.image / "index").read_text().count(" ") == 0
    assert json.loads((store_dir / CONFIG_NAME).read_text())["format"] == 1
    restored = tmp_path / "restored.img"
    restore(str(second.image), str(restored))
    assert restored.read_bytes() == bytes(data)


def test_a_new_datastore_is_format_2(tmp_path):
    Datastore.open_or_create(tmp_path / "store")
    assert json.loads((tmp_path / "store" / CONFIG_NAME).read_text())["format"] == 2


def test_without_deltas_an_image_needs_nothing_older_images_held(history, tmp_path):
    disk, first, second, data = history
    bases = {base for _, base in entries(second.image) if base}
    whole = imaging("backup", disk, "--store", tmp_path / "store", "--disk", "d", "--no-deltas",
                    "--json", "-q")
    third = Path(json.loads(whole.stdout.splitlines()[-1])["image"])
    assert [base for _, base in entries(third)] == [None] * 4
    store = Datastore.open(tmp_path / "store")
    assert all(codec.delta_base(store.read_frame(digest)) is None for digest, _ in entries(third))
    # The deltas were stored whole again: the second image still reads and verifies.
    assert verify(str(second.image)).ok
    shutil.rmtree(first.image)
    shutil.rmtree(second.image)
    removed = collect(tmp_path / "store", safety_margin=0).removed
    assert removed == len(bases) == 3
    assert all(not store.chunk_path(base).exists() for base in bases)
    restored = tmp_path / "restored.img"
    restore(str(third), str(restored))
    assert sha256_of(restored) == hashlib.sha256(data).hexdigest()
