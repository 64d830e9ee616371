"""Files inside an image's partitions: listed, and downloaded as files or as a streamed tar.

The web server reads the datastore itself (it is mounted where the web runs).
The engine reads each filesystem with its own user-space tools and only
extracts into a directory, so a download extracts one file at a time into a
private temporary folder, streams it, and deletes it: a folder's tar is
written as its members arrive, never whole in memory or on disk.

Each listing and each download is a file session (filesessions): admitted or
refused before the engine runs, and held by a download until its response ends.

Every path a request names is relative to the partition's root and checked
here first: one that is absolute, holds "..", "." or an empty component, a
NUL or a name that is not text is refused before the engine sees it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import shutil
import tarfile
import tempfile
from pathlib import Path
from typing import Any, AsyncIterator, BinaryIO, Iterator, Optional

from asgiref.sync import sync_to_async
from django.utils.dateparse import parse_datetime

import imaging.files
import imaging.mount
from imaging.errors import ImagingError
from imaging.filesystems import EXT

from ..models import Image
from . import filesessions
from .errors import Refused
from .filesessions import TooMany  # noqa: F401  (raised by browse and download)

READABLE_FILESYSTEMS = (*EXT, "vfat", "ntfs")
MAX_PATH = 4096
STREAM_STEP = 1024 * 1024
TAR_CONTENT_TYPE, FILE_CONTENT_TYPE = "application/x-tar", "application/octet-stream"
COPIED_MODE_BITS = imaging.files.COPIED_MODE_BITS
_NUMBER = re.compile(r"(\d+)$")


class BadPath(Refused):
    """A partition or path a request names that cannot be one of this image's."""


class Missing(Refused):
    """A path the partition's filesystem does not hold, or could not be read."""


@dataclasses.dataclass(frozen=True)
class BrowsablePartition:
    number: int
    size: int
    fstype: Optional[str]
    label: Optional[str]
    problem: Optional[str]  # why its files cannot be listed, or None

    @property
    def readable(self) -> bool:
        return self.problem is None


@dataclasses.dataclass(frozen=True)
class FileEntry:
    name: str  # as stored, undecodable bytes kept as surrogates
    shown: str  # safe to print: control characters and odd bytes escaped
    path: Optional[str]  # relative to the root, or None if no request can name it
    type: str
    size: int
    mode: int  # permission bits
    mtime: Optional[dt.datetime]
    target: Optional[str]  # where a symbolic link points, as stored

    @property
    def is_directory(self) -> bool:
        return self.type == imaging.files.DIRECTORY

    @property
    def shown_target(self) -> str:
        return imaging.files.printable(self.target or "")


@dataclasses.dataclass(frozen=True)
class Folder:
    part: BrowsablePartition
    path: str  # relative to the root: "" is the root
    entries: list[FileEntry]

    @property
    def crumbs(self) -> list[tuple[str, str]]:
        """(name, path) of each folder from below the root down to this one."""
        names = self.path.split("/") if self.path else []
        return [(name, "/".join(names[:depth + 1])) for depth, name in enumerate(names)]


@dataclasses.dataclass(eq=False)
class Download:
    """A file's contents, or a folder's as a tar archive, made piece by piece as an ASGI
    server asks for the next (Django gathers a synchronous iterator whole before it sends
    a byte): each in the request's own thread, as the engine blocks, where close() runs
    too, after the piece in hand. The file session ends with close(), which Django calls
    when the response ends: sent whole, or its client gone.
    """

    name: str  # to save it under
    content_type: str
    pieces: Iterator[bytes]
    session: filesessions.Session
    size: Optional[int] = None  # a file's; a tar's is known only once written

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._sent()

    async def _sent(self) -> AsyncIterator[bytes]:
        made = sync_to_async(next)
        try:
            while (piece := await made(self.pieces, None)) is not None:
                yield piece
        except Exception:
            self.close()  # the pieces failed, so are done; Django leaves a failed response open
            raise

    def close(self) -> None:
        try:
            self.pieces.close()  # the extracted copy being sent, deleted already, is closed
        finally:
            self.session.end()


def partitions(image: Image) -> list[BrowsablePartition]:
    """The image's partitions by number, each with why its files cannot be listed, or None."""
    found = []
    for part in image.partitions or []:
        number = _NUMBER.search(part.get("name") or "")
        if number is None:
            continue
        fstype = part.get("fstype")
        # Only a used-mode backup notes its filesystems: an unknown one is probed by the
        # engine when the partition is opened, which names one it cannot read.
        problem = None if fstype is None or fstype in READABLE_FILESYSTEMS else (
            f"holds {fstype}: files can be read from {imaging.files.COVERED}")
        found.append(BrowsablePartition(int(number.group(1)), part.get("size") or 0, fstype,
                                        part.get("label"), problem))
    return sorted(found, key=lambda part: part.number)


def browsable_partition(image: Image, number: Any) -> BrowsablePartition:
    """The readable partition `number` (text of digits, from a URL) names, else BadPath."""
    if not isinstance(number, str) or not re.fullmatch(r"[0-9]{1,6}", number):
        raise BadPath(f"a partition is named by its number, not {number!r}")
    try:
        part = imaging.mount.numbered(partitions(image), int(number), "the image")
    except ImagingError as missing:
        raise BadPath(str(missing)) from None
    if part.problem:
        raise BadPath(f"partition {part.number} {part.problem}")
    return part


def checked_path(path: Any) -> str:
    """A path relative to a partition's root, as a request gives it ("" is the root)."""
    if not isinstance(path, str):
        raise BadPath(f"a path is text, not {type(path).__name__}")
    if len(path) > MAX_PATH:
        raise BadPath(f"a path is at most {MAX_PATH} characters")
    if "\0" in path:
        raise BadPath("a path may not hold a NUL character")
    if path.startswith("/"):
        raise BadPath(f"{path!r}: give the path relative to the partition's root")
    if path and not all(imaging.files.safe_name(name) for name in path.split("/")):
        raise BadPath(f"{path!r}: a path may not hold '..', '.' or an empty name")
    return path


def browse(image: Image, partition: Any, path: Any, user_id: int) -> Folder:
    """The folder `path` of partition `partition`, both as a request gives them, listed in
    a file session of user `user_id` (TooMany if they, or all, have as many as allowed)."""
    part = browsable_partition(image, partition)
    path = checked_path(path)
    with filesessions.begin(user_id):
        return Folder(part, path, _folder_entries(image, part, path))


def _folder_entries(image: Image, part: BrowsablePartition, path: str) -> list[FileEntry]:
    """The entries of folder `path`, folders first."""
    entries = _listed(image, part, path)
    if len(entries) == 1 and not entries[0].is_directory and path \
            and entries[0].name == path.rsplit("/", 1)[-1]:
        # The engine lists a file as itself; a folder holding only a file of its own
        # name is told apart by looking from the parent.
        if not _entry(image, part, path).is_directory:
            raise BadPath(f"/{path} is a file, not a folder")
    return entries


def _listed(image: Image, part: BrowsablePartition, path: str) -> list[FileEntry]:
    listing = _engine(lambda: imaging.files.list_files(image.path, part.number, "/" + path))
    return [_file_entry(entry, path) for entry in listing.entries]


def _entry(image: Image, part: BrowsablePartition, path: str) -> FileEntry:
    """The entry `path` names (not the root), as its parent folder lists it."""
    parent, _, name = path.rpartition("/")
    for entry in _listed(image, part, parent):
        if entry.name == name:
            return entry
    raise Missing(f"/{path}: no such file or folder in partition {part.number}")


def download(image: Image, partition: Any, path: Any, user_id: int) -> Download:
    """A file of the partition, or a folder as a tar archive ("" is the whole filesystem);
    the partition and path as a request gives them. It holds a file session of user
    `user_id` until it is closed (TooMany if they, or all, have as many as allowed)."""
    part = browsable_partition(image, partition)
    path = checked_path(path)
    session = filesessions.begin(user_id)
    try:
        return _download(image, part, path, session)
    except BaseException:
        session.end()
        raise


def _download(image: Image, part: BrowsablePartition, path: str,
              session: filesessions.Session) -> Download:
    if not path:
        return Download(f"partition-{part.number}.tar", TAR_CONTENT_TYPE,
                        _tar_stream(image, part, ""), session)
    entry = _entry(image, part, path)
    if entry.is_directory:
        return Download(f"{entry.shown}.tar", TAR_CONTENT_TYPE, _tar_stream(image, part, path),
                        session)
    if entry.type != imaging.files.FILE:
        raise BadPath(f"/{path} is a {entry.type}: only files and folders download")
    data = _extracted(image, part, path, entry.name)
    size = os.fstat(data.fileno()).st_size
    return Download(entry.shown, FILE_CONTENT_TYPE, _contents(data, size, path), session, size)


def _extracted(image: Image, part: BrowsablePartition, path: str, name: str) -> BinaryIO:
    """The file `path` extracted into a private folder, opened, and already deleted there."""
    folder = tempfile.mkdtemp(prefix="imaging-download-")
    try:
        result = _engine(lambda: imaging.files.extract(image.path, part.number, ["/" + path],
                                                       folder))
        if result.skipped:
            raise Missing(f"/{path}: {result.skipped[0]['reason']}")
        copy = Path(folder, name)
        try:
            copy.chmod(0o400)  # its own mode may deny even its owner
            return open(copy, "rb")
        except OSError as exc:
            raise Missing(f"/{path}: cannot read its extracted copy: {exc.strerror}") from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _tar_stream(image: Image, part: BrowsablePartition, path: str) -> Iterator[bytes]:
    """The folder `path` as a tar archive, member by member: each file is extracted
    alone, sent in steps and deleted before the next; its folder keeps the name.

    tarfile's stream mode ('w|') copies a member's contents in one call, so only its
    headers (TarInfo.tobuf, pax) come from it: the contents go out in steps between them.
    """
    top = path.rsplit("/", 1)[-1] if path else f"partition-{part.number}"
    pending = [(path, top, 0o755, None)]
    while pending:
        folder, stored_as, mode, mtime = pending.pop()
        yield _header(stored_as, tarfile.DIRTYPE, 0, mode & COPIED_MODE_BITS, mtime)
        for entry in _listed(image, part, folder):
            if not imaging.files.safe_name(entry.name):
                continue  # a crafted name that would leave its folder when unpacked
            member = f"{stored_as}/{entry.name}"
            source = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_directory:
                pending.append((source, member, entry.mode, entry.mtime))
            elif entry.type == imaging.files.SYMLINK and entry.target:
                yield _header(member, tarfile.SYMTYPE, 0, 0o777, entry.mtime, entry.target)
            elif entry.type == imaging.files.FILE:
                yield from _tar_member(image, part, source, entry, member)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def _tar_member(image: Image, part: BrowsablePartition, source: str, entry: FileEntry,
                member: str) -> Iterator[bytes]:
    with _extracted(image, part, source, entry.name) as data:
        size = os.fstat(data.fileno()).st_size
        yield _header(member, tarfile.REGTYPE, size, entry.mode & COPIED_MODE_BITS, entry.mtime)
        yield from _contents(data, size, source)
    remainder = size % tarfile.BLOCKSIZE
    if remainder:
        yield tarfile.NUL * (tarfile.BLOCKSIZE - remainder)


def _contents(data: BinaryIO, size: int, path: str) -> Iterator[bytes]:
    """The `size` bytes of the extracted copy of `path`, in steps; the copy is closed after."""
    with data:
        sent = 0
        while sent < size:
            piece = data.read(min(STREAM_STEP, size - sent))
            if not piece:
                raise Missing(f"/{path} shrank while it was sent")
            sent += len(piece)
            yield piece


def _header(name: str, kind: bytes, size: int, mode: int, mtime: Optional[dt.datetime],
            target: str = "") -> bytes:
    info = tarfile.TarInfo(name)
    info.type, info.size, info.mode, info.linkname = kind, size, mode, target
    info.mtime = int(mtime.timestamp()) if mtime else 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _file_entry(entry: imaging.files.Entry, parent: str) -> FileEntry:
    path = f"{parent}/{entry.name}" if parent else entry.name
    try:
        path.encode("utf-8")
        checked_path(path)
    except (UnicodeEncodeError, BadPath):
        path = None  # a name a URL cannot carry back unchanged
    return FileEntry(entry.name, imaging.files.printable(entry.name), path, entry.type,
                     entry.size, entry.mode, parse_datetime(entry.mtime) if entry.mtime else None,
                     entry.target)


def _engine(call):
    try:
        return call()
    except ImagingError as exc:
        raise Missing(str(exc)) from exc
