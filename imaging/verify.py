"""Verify: re-hash every chunk an image needs; set corrupt ones aside.

A chunk whose content no longer matches its name is renamed `<name>.bad`, so
the next backup holding that data stores a healthy copy (self-healing).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
from typing import Optional

import zstandard

from . import codec
from .errors import ImageError
from .image import Image
from .pipeline import ordered_map
from .progress import Progress


@dataclasses.dataclass
class ChunkProblem:
    digest: str
    reason: str


@dataclasses.dataclass
class VerifyResult:
    image: str
    chunks: int
    problems: list[ChunkProblem]

    @property
    def ok(self) -> bool:
        return not self.problems


def check_chunk(image: Image, digest: str) -> Optional[str]:
    """Why the stored chunk is unusable, or None if it is intact."""
    try:
        frame = image.store.read_frame(digest)
    except ImageError:
        return "missing"
    try:
        data = codec.decompress(frame)
    except zstandard.ZstdError as exc:
        return f"corrupt ({exc})"
    if hashlib.sha256(data).hexdigest() != digest:
        return "corrupt (content does not match its name)"
    return None


def verify(image_dir: str, *, progress: Optional[Progress] = None,
           workers: Optional[int] = None) -> VerifyResult:
    image = Image.open(image_dir)
    index = image.index()
    lengths: dict[str, int] = {}
    for position, digest in enumerate(index):
        lengths[digest] = lengths.get(digest, 0) + image.chunk_length(position)
    progress = progress or Progress("verify", image.size)
    progress.start_phase("verify", image.size)
    problems: list[ChunkProblem] = []
    checked = ordered_map(lambda digest: check_chunk(image, digest), lengths, workers=workers,
                          cancelled=progress.cancelled, name="verify")
    with contextlib.closing(checked):
        for digest, reason in checked:
            if reason:
                if reason != "missing":
                    image.store.quarantine(digest)
                problems.append(ChunkProblem(digest, reason))
            progress.advance(lengths[digest])
    progress.finish()
    return VerifyResult(str(image.path), len(lengths), problems)
