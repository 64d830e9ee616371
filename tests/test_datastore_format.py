"""The datastore's format, as docs/architecture.md ("The datastore") states it.

The reader here is written from that section alone: it uses json, hashlib and
zstandard, never the engine's own readers, so a change to what the engine
writes that the page does not say fails here, and the page must follow.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import stat
from pathlib import Path

import pytest
import zstandard
from engine import text_like

from imaging.backup import backup
from imaging.datastore.store import Datastore
from imaging.verify import verify

CHUNK = 256 * 1024
TAIL = 40 * 1024  # a last chunk shorter than the others
DIGEST = r"[0-9a-f]{64}"
DELTA_HEADER = bytes.fromhex("5e2a4d1820000000")
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ")
UTC_TIME = "%Y-%m-%dT%H:%M:%SZ"


@pytest.fixture
def two_images(tmp_path):
    """Two images of one disk (three text chunks, a zero chunk, a short tail), the second
    after small edits in chunks 0 and 2; and the disk's bytes at the second."""
    disk = tmp_path / "disk.img"
    data = bytearray(text_like(3 * CHUNK, seed=1) + bytes(CHUNK) + text_like(TAIL, seed=2))
    disk.write_bytes(data)
    first = backup(str(disk), tmp_path / "store", disk_id="d", chunk_size=CHUNK)
    for offset in (1000, 2 * CHUNK + 5000):
        data[offset:offset + 300] = bytes(range(44, 244)) + bytes(range(100))
    disk.write_bytes(data)
    second = backup(str(disk), tmp_path / "store", disk_id="d", chunk_size=CHUNK)
    return first.image, second.image, bytes(data)


# --- a reader following the page -----------------------------------------------------

def datastore_settings(root: Path) -> dict:
    settings = json.loads((root / "datastore.json").read_text())
    assert settings["format"] in (1, 2)
    assert settings["chunk_size"] > 0 and settings["chunk_size"] % 4096 == 0
    return settings


def index_lines(image_dir: Path, manifest: dict) -> list[tuple[str, str | None]]:
    raw = (image_dir / "index").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == manifest["index_sha256"]
    text = raw.decode("ascii")
    assert text.endswith("\n")
    lines = text[:-1].split("\n")
    assert len(lines) == manifest["chunks"]
    entries = []
    for line in lines:
        assert re.fullmatch(f"{DIGEST}( {DIGEST})?", line), line
        digest, _, base = line.partition(" ")
        entries.append((digest, base or None))
    return entries


def chunk_file(root: Path, digest: str) -> Path:
    return root / "chunks" / digest[:2] / f"{digest}.zst"


def whole_chunk(frame: bytes) -> bytes:
    parameters = zstandard.get_frame_parameters(frame)
    assert parameters.has_checksum and parameters.content_size > 0
    return zstandard.ZstdDecompressor().decompress(frame)


def read_chunk(root: Path, digest: str, length: int) -> tuple[bytes, str | None]:
    """The chunk's bytes and the base its file names (None: stored whole)."""
    if digest == hashlib.sha256(bytes(length)).hexdigest():
        return bytes(length), None
    stored = chunk_file(root, digest).read_bytes()
    base = None
    if stored[:8] == DELTA_HEADER:
        base = stored[8:40].hex()
        base_file = chunk_file(root, base).read_bytes()
        assert base_file[:8] != DELTA_HEADER, "a base stands alone"
        base_bytes = whole_chunk(base_file)
        assert len(base_bytes) == length and hashlib.sha256(base_bytes).hexdigest() == base
        frame = stored[40:]
        parameters = zstandard.get_frame_parameters(frame)
        assert parameters.has_checksum and parameters.dict_id == 0
        assert parameters.window_size <= 2 ** 26
        dictionary = zstandard.ZstdCompressionDict(base_bytes,
                                                   dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        data = zstandard.ZstdDecompressor(dict_data=dictionary).decompress(frame)
    else:
        data = whole_chunk(stored)
    assert len(data) == length and hashlib.sha256(data).hexdigest() == digest
    return data, base


def read_image(image_dir: Path) -> tuple[bytes, dict, list[str | None]]:
    """The image's bytes, its manifest, and the base each chunk's file names."""
    root = image_dir.parent.parent.parent
    settings = datastore_settings(root)
    manifest = json.loads((image_dir / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["chunk_size"] == settings["chunk_size"]
    size, chunk_size = manifest["size"], manifest["chunk_size"]
    assert manifest["chunks"] == -(-size // chunk_size)
    pieces, bases = [], []
    for position, (digest, _) in enumerate(index_lines(image_dir, manifest)):
        length = min(chunk_size, size - position * chunk_size)
        data, base = read_chunk(root, digest, length)
        pieces.append(data)
        bases.append(base)
    image = b"".join(pieces)
    assert hashlib.sha256(image).hexdigest() == manifest["sha256"]
    return image, manifest, bases


# --- what the engine writes ----------------------------------------------------------

def test_a_reader_written_from_the_page_reads_whole_and_delta_chunks(two_images):
    first, second, data = two_images
    image, manifest, bases = read_image(second)
    assert image == data
    # Chunks 0 and 2 changed: deltas against the first image's chunks, named in the index
    # too; the zero chunk and the unchanged ones stand alone.
    first_entries = index_lines(first, json.loads((first / "manifest.json").read_text()))
    second_entries = index_lines(second, manifest)
    assert [base is not None for base in bases] == [True, False, True, False, False]
    for position in (0, 2):
        assert bases[position] == second_entries[position][1] == first_entries[position][0]
    assert read_image(first)[2] == [None] * 5


def test_the_datastore_layout_and_settings(two_images):
    _, second, _ = two_images
    root = second.parent.parent.parent
    assert json.loads((root / "datastore.json").read_text()) == {"format": 2, "chunk_size": CHUNK}
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert {path.name for path in root.iterdir()} >= {"datastore.json", "chunks", "images", "jobs"}
    for folder in (root / "chunks").iterdir():
        for chunk in folder.iterdir():
            assert re.fullmatch(f"{folder.name}[0-9a-f]{{62}}\\.zst", chunk.name), chunk
    stamps = sorted(path.name for path in (root / "images" / "d").iterdir())
    assert len(stamps) == 2 and all(STAMP.fullmatch(stamp) for stamp in stamps)


def test_the_manifest_fields(two_images):
    _, second, data = two_images
    manifest = json.loads((second / "manifest.json").read_text())
    required = {"format", "disk", "size", "chunk_size", "sector_size", "sha256", "created",
                "seconds", "level", "stored_bytes", "new_bytes", "bad_bytes", "mode", "status",
                "chunks", "index_sha256"}
    optional = {"mounted_rw", "forced_past_mount", "layout_error", "imported", "read_map",
                "read_bytes", "partitions"}
    assert required <= set(manifest) <= required | optional
    assert {"id", "size", "model", "serial", "wwn", "path", "host"} <= set(manifest["disk"])
    assert manifest["disk"]["id"] == "d" and manifest["size"] == len(data)
    assert manifest["sector_size"] == 512 and manifest["mode"] == "raw"
    assert manifest["status"] == "complete" and manifest["bad_bytes"] == 0
    assert 1 <= manifest["level"] <= 22
    dt.datetime.strptime(manifest["created"], UTC_TIME)
    # Written sorted and indented by two.
    assert (second / "manifest.json").read_text() == json.dumps(manifest, indent=2,
                                                                sort_keys=True) + "\n"


def test_the_image_files_beside_the_index(two_images):
    _, second, data = two_images
    assert (second / "mbr.bin").read_bytes() == data[:512]
    assert not (second / "layout.sf").exists()  # text, not a partition table
    lines = [line for line in (second / "badblocks.map").read_text().splitlines()
             if not line.startswith("#")]
    status, *ranges = lines
    assert status.split()[1] == "+"
    assert [line.split() for line in ranges] == [["0x00000000", f"0x{len(data):08X}", "+"]]
    recipe = (second / "RESTORE.txt").read_text()
    assert recipe.startswith("# Restore this disk image with stock tools only")
    assert "zstd -dcq -D" in recipe


def test_verify_json(two_images):
    _, second, _ = two_images
    verify(str(second))
    record = json.loads((second / "verify.json").read_text())
    assert set(record) == {"at", "ok", "chunks", "problems"}
    assert record["ok"] is True and record["problems"] == []
    assert record["chunks"] == 5 + 2  # the distinct chunks, and the two bases
    dt.datetime.strptime(record["at"], UTC_TIME)


def test_a_registration_in_jobs(two_images):
    _, second, _ = two_images
    root = second.parent.parent.parent
    name = f"d/{second.name}"
    store = Datastore.open(root)
    with store.register("restore", "restore for people", images=[name]):
        tokens = [path for path in (root / "jobs").iterdir() if not path.name.startswith(".")]
        assert len(tokens) == 1
        assert re.fullmatch(r".+-\d+-[0-9a-f]{8}", tokens[0].name)
        text = tokens[0].read_text()
        assert text.endswith("\n")
        record = json.loads(text)
        assert set(record) == {"kind", "what", "host", "pid", "started", "images"}
        assert record["kind"] == "restore" and record["images"] == [name]
        assert isinstance(record["pid"], int) and isinstance(record["started"], float)
    assert not tokens[0].exists()
