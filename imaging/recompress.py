"""Recompress: re-encode the chunks an image needs at another zstd level.

Each distinct chunk is read, checked against its name, compressed again and
written back under the same name by write-temporary, fsync, rename, so at any
moment every chunk file holds a complete frame of the right data: killing a
recompress never breaks an image, this one or any other sharing its chunks.
The manifest's `level` and `stored_bytes` are rewritten atomically at the end.
Chunks shared with other images are re-encoded once, and those images read
them as before (their manifests keep their own, now approximate, figures).
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from typing import Optional

from .base.errors import ImageError, StoreError, describe, translated
from .base.pipeline import ordered_map
from .base.progress import Progress
from .datastore import codec
from .datastore.chunks import base_bytes, read_chunk
from .datastore.image import Image
from .datastore.image import reads_image
from .base.syscalls import fsync_dir


@dataclasses.dataclass
class RecompressResult:
    image: str
    level: int
    chunks: int
    before: int  # compressed bytes of the image's distinct chunks, before
    after: int  # and after
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def _recompress_chunk(image: Image, digest: str, length: int, level: int) -> tuple[int, int]:
    """(stored bytes before, after) for one chunk, rewritten in place; a delta stays one,
    against the same base, which other images' indexes name too."""
    try:
        before = image.store.chunk_path(digest).stat().st_size
    except FileNotFoundError:
        raise ImageError(f"chunk {digest} is missing from {image.store.root}: run verify") from None
    except OSError as exc:
        raise StoreError(f"cannot look up chunk {digest}: {describe(exc)}") from None
    data = read_chunk(image.store, digest, length)
    base = image.store.stored_base(digest)
    frame = (codec.compress(data, level) if base is None else
             codec.compress_delta(data, base_bytes(image.store, base, digest), base, level))
    return before, image.store.write_chunk(digest, frame)


@reads_image("recompress")
def recompress(image_dir: os.PathLike | str, level: int, *, progress: Optional[Progress] = None,
               workers: Optional[int] = None) -> RecompressResult:
    started = time.monotonic()
    codec.check_level(level)
    image = Image.open(image_dir)
    lengths: dict[str, int] = {}
    for position, digest in enumerate(image.index()):
        lengths.setdefault(digest, image.chunk_length(position))
    for position, (_, base) in enumerate(image.entries()):
        if base:
            lengths.setdefault(base, image.chunk_length(position))  # a delta's length is its base's
    progress = progress or Progress("recompress", 0)
    progress.start_phase("recompress", sum(lengths.values()))
    before = after = 0
    rewritten = ordered_map(lambda item: _recompress_chunk(image, *item, level), lengths.items(),
                            workers=workers, cancelled=progress.cancelled, name="recompress")
    with contextlib.closing(rewritten):
        for (_, length), (old, new) in rewritten:
            before += old
            after += new
            progress.advance(length, stored=new)
    with translated(StoreError, "cannot update the image's manifest"):
        for folder in {image.store.chunk_path(digest).parent for digest in lengths}:
            fsync_dir(folder)
        manifest = dataclasses.replace(image.manifest, level=level, stored_bytes=after)
        image.write_manifest(manifest)
        fsync_dir(image.path)
    progress.finish()
    return RecompressResult(str(image.path), level, len(lengths), before, after,
                            round(time.monotonic() - started, 3))
