"""Verify: re-hash every chunk an image needs; set corrupt ones aside.

A chunk whose content no longer matches its name is renamed `<name>.bad`, so
the next backup holding that data stores a healthy copy (self-healing). The
outcome is recorded in the image directory as verify.json (imaging.datastore.verification).
A restore drill (`fsck`) also checks every partition's filesystem through a
read-only mount of the image, which only a verification that found every chunk
intact attempts.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
from typing import Optional

import zstandard

from .base.errors import ImageError, StoreError, translated
from .base.pipeline import ordered_map
from .base.progress import Progress
from .datastore import codec
from .datastore.chunks import base_bytes, bases_named_by_files
from .datastore.image import Image, reads_image
from .datastore.sealing import Tampered
from .datastore.manifest import utc_text
from .datastore.store import write_atomically
from .datastore.verification import NOT_CHECKED, RECORD_NAME, ChunkProblem, FilesystemCheck, VerifyResult
from .reading.filesystems import check_image
from .reading.mount import partitions

BASE_PROBLEM = "unreadable: its base"
MISSING = "missing"


def check_chunk(image: Image, digest: str) -> Optional[str]:
    """Why the stored chunk is unusable, or None if it is intact.

    A delta whose base is missing or corrupt is reported as such, the base
    being the chunk to set aside (its own check says so).
    """
    try:
        frame = image.store.read_frame(digest)
    except Tampered as exc:
        return exc.problem
    except ImageError:
        return MISSING
    needs = codec.delta_base(frame)
    try:
        base = None if needs is None else base_bytes(image.store, needs, digest)
    except ImageError as exc:
        return f"{BASE_PROBLEM} {needs} is missing or corrupt ({exc})"
    try:
        data = codec.decompress(frame, digest, base)
    except zstandard.ZstdError as exc:
        return f"corrupt ({exc})"
    if image.store.name(data) != digest:
        return "corrupt (content does not match its name)"
    return None


def present(image: Image, digest: str) -> Optional[str]:
    """Why the chunk is unusable, if its file is missing or empty; its contents unread."""
    try:
        return None if image.store.chunk_path(digest).stat().st_size else "empty"
    except FileNotFoundError:
        return MISSING


@reads_image("verify")
def verify(image_dir: str, *, fsck: bool = False, read_data: bool = True,
           progress: Optional[Progress] = None, workers: Optional[int] = None) -> VerifyResult:
    """Re-hash every chunk the image needs; with `fsck`, then check its filesystems too.
    Without `read_data` (a remote's quick check), only see that each chunk's file is there."""
    image = Image.open(image_dir)
    check = check_chunk if read_data else present
    lengths: dict[str, int] = {}
    for position, digest in enumerate(image.index()):
        lengths[digest] = lengths.get(digest, 0) + image.chunk_length(position)
    for base in bases_named_by_files(image.store, set(lengths)):
        lengths.setdefault(base, 0)  # stored for the deltas' sake: no disk bytes of its own
    progress = progress or Progress("verify", image.size)
    progress.start_phase("verify", image.size)
    problems: list[ChunkProblem] = []
    checked = ordered_map(lambda digest: check(image, digest), lengths,
                          workers=workers, cancelled=progress.cancelled, name="verify")
    with contextlib.closing(checked):
        for digest, reason in checked:
            if reason:
                if reason != MISSING and not reason.startswith(BASE_PROBLEM) \
                        and not image.store.read_only:
                    image.store.quarantine(digest)
                problems.append(ChunkProblem(digest, reason))
            progress.advance(lengths[digest])
    filesystems = None
    if fsck:
        filesystems = (check_image(image, progress) if not problems else
                       [FilesystemCheck(part.number, None, NOT_CHECKED, "the image has bad chunks")
                        for part in partitions(image)])
    result = VerifyResult(str(image.path), len(lengths), problems,
                          utc_text(dt.datetime.now(dt.timezone.utc)), filesystems)
    if not image.store.read_only:
        with translated(StoreError, "cannot record the verification"):
            write_atomically(image.path / RECORD_NAME,
                             json.dumps(result.record()).encode() + b"\n")
    progress.finish()
    return result
