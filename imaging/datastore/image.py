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
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional

from ..base.errors import ImageError, StoreError, reason, translated
from ..base.progress import Progress
from ..base.syscalls import fsync_dir
from .codec import DIGEST_RE
from .manifest import NAME as MANIFEST_NAME
from .manifest import Manifest, utc_text
from .sealing import Tampered
from .store import (PLAIN_IMAGE_FILES, PROTECTED_NAME, REFERENCES_NAME, SUMMARY_NAME,
                    TEMP_SUFFIX, Datastore, check_disk_id, write_atomically)

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
        if not (path / MANIFEST_NAME).exists():
            raise ImageError(f"{path}: not an image (no {MANIFEST_NAME})")
        # images/<disk>/<stamp> inside the datastore root
        store = store or Datastore.open(path.parent.parent.parent)
        manifest = read_manifest(store, path)
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
            text = self.store.read_image_file(self.path, INDEX_NAME).decode()
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

    def read_file(self, name: str) -> bytes:
        """One of the image's files, opened when sealed; OSError as raised, Tampered."""
        return self.store.read_image_file(self.path, name)

    def write_manifest(self, manifest: Manifest) -> None:
        """Replace the manifest (and, in an encrypted store, the summary shown without the key)."""
        write_image_files(self.store, self.path, manifest, write_atomically)
        self.manifest = manifest


def protection(image_dir: Path) -> Optional[dict]:
    """{"at", "note"} while the image is protected (prune and deletion refuse it), else None."""
    try:
        record = json.loads((image_dir / PROTECTED_NAME).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        record = {}  # unreadable, still there: protected all the same
    return {"at": str(record.get("at", "")), "note": str(record.get("note", ""))}


def protection_mark(note: str, now: dt.datetime) -> bytes:
    """The file that protects an image (plain in an encrypted store too: no key needed)."""
    return json.dumps({"at": utc_text(now), "note": note}).encode() + b"\n"


def protect(image_dir: Path, note: str, now: dt.datetime) -> None:
    if not (image_dir / MANIFEST_NAME).is_file():
        raise ImageError(f"{image_dir}: not an image (no {MANIFEST_NAME})")
    with translated(StoreError, f"cannot protect {image_dir}"):
        write_atomically(image_dir / PROTECTED_NAME, protection_mark(note, now))
        fsync_dir(image_dir)


def unprotect(image_dir: Path) -> bool:
    """Whether the image was protected."""
    with translated(StoreError, f"cannot unprotect {image_dir}"):
        try:
            (image_dir / PROTECTED_NAME).unlink()
        except FileNotFoundError:
            return False
        fsync_dir(image_dir)
    return True


def read_manifest(store: Datastore, image_dir: Path) -> Manifest:
    path = image_dir / MANIFEST_NAME
    try:
        text = store.read_image_file(image_dir, MANIFEST_NAME)
    except FileNotFoundError:
        raise ImageError(f"{image_dir}: not an image (no {MANIFEST_NAME})") from None
    except OSError as exc:
        raise ImageError(f"{path}: unreadable manifest ({reason(exc)})") from None
    return Manifest.parse(text, path)


def references(store: Datastore, image_dir: Path) -> set[str]:
    """Every chunk an image needs, bases included, read without the key in an encrypted
    store (its `references`); in a plain one, its index names them (bases as the files
    name them are the caller's to add)."""
    if not store.encrypted:
        return {name for entry in Image.open(image_dir, store).entries() for name in entry if name}
    path = image_dir / REFERENCES_NAME
    try:
        names = path.read_text().split()
    except FileNotFoundError:
        raise ImageError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ImageError(f"{path}: unreadable ({exc})") from None
    if not all(DIGEST_RE.match(name) for name in names):
        raise ImageError(f"{path}: corrupt (a line is not a chunk's name)")
    return set(names)


def references_text(entries: list[IndexEntry]) -> str:
    """An encrypted image's `references`: sorted, so they tell nothing of where each chunk is."""
    return "".join(f"{name}\n" for name in sorted({name for entry in entries
                                                   for name in entry if name}))


def write_image_files(store: Datastore, folder: Path, manifest: Manifest, write, *,
                      placed: Optional[Path] = None) -> None:
    """Write the manifest into `folder` with `write(path, data)`, sealed for the image at
    `placed` (default: `folder`); in an encrypted store, its summary first."""
    if store.encrypted:
        write(folder / SUMMARY_NAME, json.dumps(manifest.summary(), sort_keys=True).encode())
    write(folder / MANIFEST_NAME, store.image_file(placed or folder, MANIFEST_NAME,
                                                   manifest.as_json().encode()))


def reseal(store: Datastore, image_dir: Path, placed: Path) -> None:
    """Seal the sealed files of the image in `image_dir` for its new place `placed` (their
    context names the place), the manifest excepted, each replaced whole; one resealed
    by an earlier, interrupted run is left as it is."""
    if not store.encrypted:
        return
    with translated(StoreError, f"cannot reseal the files of {image_dir}"):
        names = sorted(entry.name for entry in os.scandir(image_dir) if entry.is_file()
                       and not entry.name.startswith(".") and entry.name != MANIFEST_NAME
                       and entry.name not in PLAIN_IMAGE_FILES)
        for name in names:
            try:
                store.read_image_file(image_dir, name, placed=placed)
                continue
            except Tampered:
                pass
            write_atomically(image_dir / name, store.image_file(
                placed, name, store.read_image_file(image_dir, name)))


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
            write_atomically(self.tmp / name, self.store.image_file(self.tmp, name, data))

    def write_index(self, entries: list[IndexEntry]) -> str:
        """Write the index (and an encrypted store's `references`); the index's text."""
        text = "".join(entry.line() for entry in entries)
        self.write(INDEX_NAME, text)
        if self.store.encrypted:
            self.write(REFERENCES_NAME, references_text(entries))
        return text

    def commit(self, manifest: Manifest) -> Path:
        with translated(StoreError, "cannot write the image's manifest"):
            write_image_files(self.store, self.tmp, manifest, write_atomically)
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
