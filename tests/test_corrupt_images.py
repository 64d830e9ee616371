"""A damaged image or datastore: every command says what is wrong in one line, exit 1.

Each case damages a copy of one small datastore in one way (the manifest, the
index, a chunk, the datastore's own settings), then runs restore, export,
verify and, where it reads the damaged file, list. None may print a
traceback, write the restore target or leave an export file behind.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from engine import MiB, imaging, one_error_line

from imaging.backup import backup
from imaging.datastore import codec

CHUNK_SIZE = 256 * 1024
DISK_SIZE = MiB  # four chunks
# What the restore target holds before: a disk of the image's size.
PRECIOUS = b"what the target held before\n" * (DISK_SIZE // 28) + bytes(DISK_SIZE % 28)


@dataclass
class Damaged:
    image: Path
    store: Path
    index: list[str]

    @property
    def manifest(self) -> Path:
        return self.image / "manifest.json"

    def chunk(self, position: int) -> Path:
        digest = self.index[position]
        return self.store / "chunks" / digest[:2] / f"{digest}.zst"

    def edit_manifest(self, **changes) -> None:
        manifest = json.loads(self.manifest.read_text())
        manifest.update(changes)
        self.manifest.write_text(json.dumps(manifest))

    def drop_from_manifest(self, key: str) -> None:
        manifest = json.loads(self.manifest.read_text())
        del manifest[key]
        self.manifest.write_text(json.dumps(manifest))

    def write_index(self, lines: list[str]) -> None:
        (self.image / "index").write_text("".join(f"{line}\n" for line in lines))


@dataclass
class Case:
    name: str
    damage: Callable[[Damaged], None]
    # What the one error line must say (a regular expression, given the damaged copy).
    expected: Callable[[Damaged], str]
    # list reads manifests and the datastore's settings, not indexes or chunks.
    listed: bool = False
    # Found before restore opens its target; a bad chunk may be found only later.
    target_untouched: bool = True


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _swap_first_two(lines: list[str]) -> list[str]:
    return [lines[1], lines[0], *lines[2:]]


def _not_zstd(damaged: Damaged) -> None:
    damaged.chunk(1).write_bytes(random.Random(2).randbytes(4096))


def _wrong_content(damaged: Damaged) -> None:
    # A valid frame of the right length holding other data: only the name check can tell.
    damaged.chunk(1).write_bytes(codec.compress(random.Random(3).randbytes(CHUNK_SIZE)))


CASES = [
    Case("truncated manifest", lambda d: _truncate(d.manifest), lambda d: "manifest", listed=True),
    Case("manifest not JSON", lambda d: d.manifest.write_text("format: 1\nsize: 1048576\n"),
         lambda d: "manifest", listed=True),
    Case("manifest a JSON list", lambda d: d.manifest.write_text("[1, 2, 3]\n"),
         lambda d: "manifest", listed=True),
    Case("manifest missing", lambda d: d.manifest.unlink(), lambda d: "manifest", listed=True),
    Case("size a string", lambda d: d.edit_manifest(size=str(DISK_SIZE)), lambda d: r"\bsize\b",
         listed=True),
    Case("size negative", lambda d: d.edit_manifest(size=-DISK_SIZE), lambda d: r"\bsize\b",
         listed=True),
    Case("unknown format", lambda d: d.edit_manifest(format=99), lambda d: r"format.*\b99\b",
         listed=True),
    Case("sha256 not hex", lambda d: d.edit_manifest(sha256="not-a-digest" * 5),
         lambda d: "sha256", listed=True),
    Case("chunk_size missing", lambda d: d.drop_from_manifest("chunk_size"),
         lambda d: "chunk_size", listed=True),
    Case("chunk_size not the datastore's",
         lambda d: d.edit_manifest(chunk_size=CHUNK_SIZE * 2, chunks=len(d.index) // 2),
         lambda d: "chunk.size", listed=True),
    Case("unknown mode", lambda d: d.edit_manifest(mode="sparkly"), lambda d: r"mode.*sparkly",
         listed=True),
    Case("index one chunk short", lambda d: d.write_index(d.index[:-1]),
         lambda d: "truncated index"),
    Case("index line not hex", lambda d: d.write_index([d.index[0], "z" * 64, *d.index[2:]]),
         lambda d: "line 2 is not a SHA-256"),
    Case("index checksum mismatch", lambda d: d.write_index(_swap_first_two(d.index)),
         lambda d: "checksum"),
    Case("index missing", lambda d: (d.image / "index").unlink(), lambda d: "missing index"),
    Case("chunk missing", lambda d: d.chunk(1).unlink(), lambda d: d.index[1]),
    Case("chunk not zstd", _not_zstd, lambda d: d.index[1], target_untouched=False),
    Case("chunk of wrong content", _wrong_content,
         lambda d: rf"{d.index[1]}|chunk 1 \(bytes {CHUNK_SIZE}-", target_untouched=False),
    Case("datastore.json missing", lambda d: (d.store / "datastore.json").unlink(),
         lambda d: "not a datastore", listed=True),
    Case("datastore chunk_size not a number",
         lambda d: (d.store / "datastore.json").write_text('{"format": 1, "chunk_size": "4M"}'),
         lambda d: "chunk_size", listed=True),
]


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> tuple[Path, Path]:
    """(datastore, image) of a four-chunk disk of random data."""
    folder = tmp_path_factory.mktemp("pristine")
    disk = folder / "disk.img"
    disk.write_bytes(random.Random(1).randbytes(DISK_SIZE))
    result = backup(str(disk), folder / "store", disk_id="sda", chunk_size=CHUNK_SIZE)
    return folder / "store", result.image


def each(cases: list[Case]):
    """Run the test once per case, on a freshly damaged copy of the datastore."""
    return pytest.mark.parametrize("damaged", cases, indirect=True, ids=[c.name for c in cases])


@pytest.fixture
def damaged(request, pristine, tmp_path) -> tuple[Case, Damaged]:
    store, image = pristine
    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    image_copy = copy / image.relative_to(store)
    index = (image_copy / "index").read_text().split()
    assert len(set(index)) == DISK_SIZE // CHUNK_SIZE and codec.zero_digest(CHUNK_SIZE) not in index
    case = request.param
    subject = Damaged(image_copy, copy, index)
    case.damage(subject)
    return case, subject


def _says(line: str, pattern: str) -> None:
    assert re.search(pattern, line), f"{line!r} does not match {pattern!r}"


@each(CASES)
def test_restore_names_the_damage_and_spares_the_target(damaged, tmp_path):
    case, subject = damaged
    target = tmp_path / "target.img"
    target.write_bytes(PRECIOUS)
    _says(one_error_line(imaging("restore", subject.image, target, check=False)),
          case.expected(subject))
    if case.target_untouched:
        assert target.read_bytes() == PRECIOUS


@each(CASES)
def test_export_names_the_damage_and_leaves_no_file(damaged, tmp_path):
    case, subject = damaged
    out = tmp_path / "out"
    out.mkdir()
    _says(one_error_line(imaging("export", subject.image, out / "sda.zst", check=False)),
          case.expected(subject))
    assert os.listdir(out) == []


@each(CASES)
def test_verify_names_the_damage(damaged):
    case, subject = damaged
    result = imaging("verify", subject.image, check=False)
    line = one_error_line(result)
    # A bad chunk is named on stdout, one line each; the error line sums them up.
    _says(result.stdout + line, case.expected(subject))


@each([case for case in CASES if case.listed])
def test_list_names_the_damaged_image(damaged):
    case, subject = damaged
    _says(one_error_line(imaging("list", "--store", subject.store, check=False)),
          case.expected(subject))
