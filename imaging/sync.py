"""sync: copies of a datastore's images in a second datastore (docs/architecture.md, "Sync").

Only what the destination lacks travels: the images it does not hold (by disk id and
stamp), and of their chunks those it has not stored, a delta chunk's base before it. Each
chunk is checked before it is written (decoded, and its content named as its name says),
so a corrupt source chunk never becomes a good-looking copy. An image appears at the
destination only once all it needs is there: its files go into a hidden folder, the
manifest last, and the folder is renamed into place, as a backup publishes an image. A sync
killed at any point and run again sends again at most the chunks that were in flight and
never lists half an image. The destination keeps its own retention: the source's prune and
gc never reach it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import time
from pathlib import Path
from typing import Iterable, Optional

from .base.errors import Cancelled, ImageError, StoreError, translated
from .base.progress import UNIT_CHUNKS, Progress
from .datastore import codec
from .datastore.chunks import base_bytes, bases_named_by_files
from .datastore.image import Image
from .datastore.manifest import NAME as MANIFEST_NAME
from .datastore.store import Datastore, fsync_dir, write_atomically
from .datastore.verification import RECORD_NAME

# The source is only read; at the destination a sync writes chunks no image names yet.
READING = "sync-out"
WRITING = "sync-in"


@dataclasses.dataclass
class SyncResult:
    source: str
    destination: str
    copied: list[str]  # "<disk>/<stamp>" of each image copied
    present: list[str]  # ... of each image the destination held already
    chunks_sent: int
    bytes_sent: int
    chunks_present: int
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sync(source: os.PathLike | str, destination: os.PathLike | str, *,
         disks: Optional[Iterable[str]] = None, last: Optional[int] = None,
         progress: Optional[Progress] = None) -> SyncResult:
    """Copy the images of `source` (of `disks`, the `last` N of each) that `destination`
    lacks; the destination is created, with the source's chunk size, if absent."""
    started = time.monotonic()
    progress = progress or Progress("sync", 0)
    src = Datastore.open(source)
    if Path(destination).resolve() == src.root.resolve():
        raise StoreError(f"{destination} is the source datastore itself")
    dst = Datastore.open_or_create(destination, chunk_size=src.chunk_size)
    if dst.chunk_size != src.chunk_size:
        raise StoreError(f"{dst.root} stores chunks of {dst.chunk_size} bytes, {src.root} of "
                         f"{src.chunk_size}: a copy needs the same chunk size")
    if dst.format < src.format:
        raise StoreError(f"{dst.root} is a datastore of format {dst.format}, older than the "
                         f"source's {src.format}: it cannot hold its delta chunks")
    wanted = _images(src, disks, last)
    result = SyncResult(str(src.root), str(dst.root), [], [], 0, 0, 0, 0.0)
    names = [f"{path.parent.name}/{path.name}" for path in wanted]
    with src.register(READING, f"sync to {dst.root}", images=names, progress=progress), \
            dst.register(WRITING, f"sync from {src.root}", progress=progress):
        missing = [path for path in wanted if not (dst.images_dir / path.parent.name /
                                                   path.name).is_dir()]
        result.present = [name for path, name in zip(wanted, names) if path not in missing]
        images = [Image.open(path, src) for path in missing]
        lengths = {entry.digest: image.chunk_length(position)
                   for image in images for position, entry in enumerate(image.entries())}
        bases = bases_named_by_files(src, lengths)
        order = sorted(bases) + sorted(set(lengths) - bases)
        progress.start_phase("sync", len(order), UNIT_CHUNKS)
        for digest in order:
            if progress.cancelled():
                raise Cancelled()
            sent = _copy_chunk(src, dst, digest, lengths.get(digest))
            if sent is None:
                result.chunks_present += 1
            else:
                result.chunks_sent += 1
                result.bytes_sent += sent
            progress.advance(1)
        for image in images:
            _copy_image_files(image, dst)
            result.copied.append(f"{image.disk_id}/{image.stamp}")
    progress.finish()
    result.seconds = time.monotonic() - started
    return result


def _images(store: Datastore, disks: Optional[Iterable[str]], last: Optional[int]) -> list[Path]:
    if last is not None and last < 1:
        raise StoreError(f"--last {last}: copy at least one image per disk")
    chosen = []
    for disk in (list(disks) if disks else store.disk_ids()):
        found = store.image_dirs(disk)
        if disks and not found:
            raise StoreError(f"{store.root} holds no image of disk {disk}")
        chosen += found[-last:] if last else found
    return sorted(chosen, key=lambda path: path.name)  # oldest first: bases go before deltas


def _copy_chunk(src: Datastore, dst: Datastore, digest: str,
                length: Optional[int]) -> Optional[int]:
    """Send chunk `digest` unless the destination has it (then it is marked in use, and None
    returned); returns the bytes sent. The frame is checked before it is written."""
    if dst.touch_chunk(digest):
        return None
    try:
        frame = src.read_frame(digest)
    except ImageError:
        if length is not None and digest == codec.zero_digest(length):
            return None  # all zeros: read as zeros whether stored or not
        raise
    base = codec.delta_base(frame)
    data = codec.decompress(frame, digest, None if base is None else
                            base_bytes(src, base, digest, checked=False))
    if codec.digest(data) != digest:
        raise ImageError(f"chunk {digest} in {src.root} is corrupt (content does not match its "
                         "name): not copied; verify the source")
    dst.write_chunk(digest, frame)
    return len(frame)


def _copy_image_files(image: Image, dst: Datastore) -> None:
    """The image's files at the destination, under the same disk id and stamp, the folder
    renamed into place once complete (a leftover of a killed sync is replaced). Its verify
    record stays behind: the copy is verified where it lies."""
    folder = dst.images_dir / image.disk_id
    final, tmp = folder / image.stamp, folder / f".{image.stamp}.sync"
    with translated(StoreError, f"cannot write image {image.disk_id}/{image.stamp} in "
                                f"{dst.root}"):
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(tmp)
        tmp.mkdir()
        names = sorted(entry.name for entry in image.path.iterdir()
                       if entry.is_file() and entry.name != RECORD_NAME)
        for name in [name for name in names if name != MANIFEST_NAME] + [MANIFEST_NAME]:
            write_atomically(tmp / name, (image.path / name).read_bytes())
        fsync_dir(tmp)
        os.rename(tmp, final)
        fsync_dir(folder)
