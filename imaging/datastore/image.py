"""One image directory: reading it back, and assembling it crash-safely.

An image is built in images/<disk>/.<stamp>.tmp/ and renamed to <stamp> only
after every file, the manifest last, is fsynced: a directory without the dot
is complete by construction. A job reading an image registers as its reader
in the datastore while it runs (`reading`, `reads_image`), so prune and gc
spare it.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import functools
import hashlib
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from ..base.errors import ImageError, StoreError, translated
from ..base.progress import Progress
from .codec import DIGEST_RE
from .manifest import NAME as MANIFEST_NAME
from .manifest import Manifest
from .store import TEMP_SUFFIX, Datastore, check_disk_id, fsync_dir, write_atomically

STAMP_FORMAT = "%Y-%m-%dT%H-%M-%SZ"
# The chunk list of an image: one line per chunk of the disk, in order.
INDEX_NAME = "index"


def stamp_of(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).strftime(STAMP_FORMAT)


def parse_stamp(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, STAMP_FORMAT).replace(tzinfo=dt.timezone.utc)


class IndexEntry(NamedTuple):
    digest: str
    base: Optional[str] = None  # the chunk a delta chunk is compressed against

    def line(self) -> str:
        return f"{self.digest} {self.base}\n" if self.base else f"{self.digest}\n"


@dataclass
class Image:
    path: Path
    manifest: Manifest
    store: Datastore
    _entries: Optional[list[IndexEntry]] = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, path: os.PathLike | str, store: Optional[Datastore] = None) -> "Image":
        """The image in directory `path`; `store`, the datastore holding it, when already open."""
        path = Path(path).resolve()
        if not path.is_dir():
            raise ImageError(f"{path}: no such image directory")
        manifest = Manifest.load(path)
        # images/<disk>/<stamp> inside the datastore root
        store = store or Datastore.open(path.parent.parent.parent)
        if manifest.chunk_size != store.chunk_size:
            raise ImageError(f"{path}: chunk size {manifest.chunk_size} differs from the datastore's")
        return cls(path, manifest, store)

    @property
    def size(self) -> int:
        return self.manifest.size

    @property
    def chunk_size(self) -> int:
        return self.manifest.chunk_size

    @property
    def disk_id(self) -> str:
        return self.path.parent.name

    @property
    def stamp(self) -> str:
        return self.path.name

    def index(self) -> list[str]:
        """The chunk digests in disk order, validated against the image size."""
        return [entry.digest for entry in self.entries()]

    def entries(self) -> list["IndexEntry"]:
        """Each chunk in disk order with the base it is a delta against, if any.

        Each line of `index` is a digest, then, for a delta chunk, a space and
        its base's digest (datastore format 2).
        """
        if self._entries is None:
            self._entries = self._read_index()
        return self._entries

    def _read_index(self) -> list["IndexEntry"]:
        index_path = self.path / INDEX_NAME
        try:
            text = index_path.read_text()
        except FileNotFoundError:
            raise ImageError(f"{index_path}: missing index") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ImageError(f"{index_path}: unreadable index ({exc})") from None
        lines = text.splitlines()
        if len(lines) != self.manifest.chunks:
            raise ImageError(f"{index_path}: corrupt or truncated index "
                             f"({len(lines)} chunks listed, {self.manifest.chunks} expected)")
        entries = []
        for number, line in enumerate(lines, 1):
            digest, _, base = line.partition(" ")
            if not DIGEST_RE.match(digest) or not (base == "" or DIGEST_RE.match(base)):
                raise ImageError(f"{index_path}: corrupt index (line {number} is not a SHA-256, "
                                 "or one and its base's)")
            entries.append(IndexEntry(digest, base or None))
        if hashlib.sha256(text.encode()).hexdigest() != self.manifest.index_sha256:
            raise ImageError(f"{index_path}: corrupt index (its checksum does not match the manifest)")
        return entries

    def chunk_length(self, position: int) -> int:
        return min(self.chunk_size, self.size - position * self.chunk_size)


class ImageWriter:
    """Collects an image's files in a hidden directory and publishes it atomically."""

    def __init__(self, store: Datastore, disk_id: str,
                 moment: Optional[dt.datetime] = None) -> None:
        self.store = store
        self.disk_id = check_disk_id(disk_id)
        self.folder = store.images_dir / disk_id
        moment = moment or dt.datetime.now(dt.timezone.utc)
        with translated(StoreError, f"cannot create image folder in {store.root}"):
            self.folder.mkdir(parents=True, exist_ok=True)
            # Two images of one disk in the same second get consecutive stamps.
            while True:
                self.stamp = stamp_of(moment)
                self.final = self.folder / self.stamp
                self.tmp = self.folder / f".{self.stamp}{TEMP_SUFFIX}"
                if not self.final.exists():
                    try:
                        self.tmp.mkdir()
                        break
                    except FileExistsError:
                        pass
                moment += dt.timedelta(seconds=1)
        self.created = moment

    def write(self, name: str, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        with translated(StoreError, f"cannot write {name} of the image"):
            write_atomically(self.tmp / name, data)

    def commit(self, manifest: Manifest) -> Path:
        self.write(MANIFEST_NAME, manifest.as_json())
        with translated(StoreError, "cannot publish the image"):
            fsync_dir(self.tmp)
            os.rename(self.tmp, self.final)
            fsync_dir(self.folder)
        return self.final

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            shutil.rmtree(self.tmp)


@contextlib.contextmanager
def reading(image_dir: os.PathLike | str, kind: str, progress: Optional[Progress],
            detail: str = "") -> Iterator[Image]:
    """Register a job that reads the image in `image_dir` while the block runs; yields the image.

    The image is opened again once the token is in place. Prune hides an
    image before it looks for its readers: a reader it did not see finds the
    image gone here and stops, one it saw keeps the image.
    """
    found = Image.open(image_dir)
    name = f"{found.disk_id}/{found.stamp}"
    with found.store.register(kind, f"{kind} {name}{detail}", images=[name], progress=progress):
        yield Image.open(found.path, found.store)


def reads_image(kind: str) -> Callable:
    """Decorate a job taking (image_dir, ..., progress=None) to run registered as its reader."""
    def decorate(job: Callable) -> Callable:
        @functools.wraps(job)
        def registered(image_dir, *args, progress: Optional[Progress] = None, **kwargs):
            progress = progress or Progress(kind, 0)
            with reading(image_dir, kind, progress):
                return job(image_dir, *args, progress=progress, **kwargs)
        return registered
    return decorate
