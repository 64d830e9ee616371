"""Files inside an image's partitions: listed, and downloaded as files or as a streamed tar.

The web server reads the datastore itself (it is mounted where the web runs).
Each request opens one engine file session (imaging.reading.files.FileSession: the
partition mounted once, its filesystem's tools run there) and does everything
in it: a listing; a file's download, its contents streamed from the image; a
folder's tar, written as its members are read, never whole in memory or on
disk.

Each listing and each download is also a file session of the server's
(filesessions): admitted or refused before the engine runs. A download holds
both until its response ends.

Every path a request names is relative to the partition's root and checked
here first: one that is absolute, holds "..", "." or an empty component, a
NUL or a name that is not text is refused before the engine sees it.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import os
import re
import tarfile
import threading
from typing import Any, AsyncIterator, Callable, Iterator, Optional, TypeVar

from asgiref.sync import sync_to_async
from django.utils.dateparse import parse_datetime

import imaging.disks.lvm
import imaging.reading.files
import imaging.reading.mount
from imaging.base.errors import ImagingError
from imaging.reading.filesystems import EXT

from ..models import Image
from . import filesessions
from .errors import Refused
from .filesessions import TooMany  # noqa: F401  (raised by browse and download)

READABLE_FILESYSTEMS = (*EXT, "vfat", "ntfs", "xfs", "btrfs")
MAX_PATH = 4096
MAX_NAME = 255
STREAM_STEP = imaging.reading.files.STREAM_STEP
TAR_CONTENT_TYPE, FILE_CONTENT_TYPE = "application/x-tar", "application/octet-stream"
COPIED_MODE_BITS = imaging.reading.files.COPIED_MODE_BITS
_NUMBER = re.compile(r"(\d+)$")
# Images whose logical volumes each web process remembers, read from the image.
VOLUME_LISTS_KEPT = 256
_VOLUMES_READING = threading.Lock()
Answer = TypeVar("Answer")


class BadPath(Refused):
    """A partition or path a request names that cannot be one of this image's."""


class Missing(Refused):
    """A path the partition's filesystem does not hold, or could not be read."""


@dataclasses.dataclass(frozen=True)
class BrowsablePartition:
    number: int  # of a logical volume: of the partition holding it
    size: int
    fstype: Optional[str]
    label: Optional[str]
    problem: Optional[str]  # why its files cannot be listed, or None
    volume: Optional[str] = None  # "vg0/root": an LVM logical volume

    @property
    def readable(self) -> bool:
        return self.problem is None

    @property
    def key(self) -> str:
        """How a URL names it: 1, or vg0-root."""
        return imaging.disks.lvm.file_name(self.volume) if self.volume else str(self.number)

    @property
    def shown(self) -> str:
        return imaging.disks.lvm.place(self.number, self.volume)


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
        return self.type == imaging.reading.files.DIRECTORY

    @property
    def shown_target(self) -> str:
        return imaging.reading.files.printable(self.target or "")


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
    too, after the piece in hand. The engine's session and the server's file session end
    with close(), which Django calls when the response ends: sent whole, or its client
    gone; or, a response dropped unclosed, as soon as it is dropped.
    """

    name: str  # to save it under
    content_type: str
    pieces: Iterator[bytes]
    held: contextlib.ExitStack  # the engine's session and the server's file session
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
        with self.held:
            self.pieces.close()


def partitions(image: Image, *, volumes: bool = True) -> list[BrowsablePartition]:
    """The image's partitions by number (with the logical volumes of each LVM PV in it,
    unless not `volumes`), each with why its files cannot be listed, or None."""
    found = []
    for part in image.partitions or []:
        number = _NUMBER.search(part.get("name") or "")
        if number is None:
            continue
        fstype = part.get("fstype")
        found.append(BrowsablePartition(int(number.group(1)), part.get("size") or 0, fstype,
                                        part.get("label"), _problem(image, part, fstype)))
        found += [BrowsablePartition(int(number.group(1)), volume.get("size") or 0,
                                     volume.get("fstype"), None,
                                     _problem(image, volume, volume.get("fstype")),
                                     volume["name"])
                  for volume in (part.get("volumes") or () if volumes else ())]
    # A used-mode backup notes each partition's filesystem and each PV's volumes; an image
    # with nothing noted (a raw one) tells them itself.
    noted = any(part.get("fstype") for part in image.partitions or [])
    if volumes and not noted and not image.encrypted:
        with contextlib.suppress(ImagingError):  # browsing the partition says what is wrong
            found += [BrowsablePartition(number, size, None, None, None, name)
                      for number, size, name in _volumes_read(str(image.path))]
    return sorted(found, key=lambda part: (part.number, part.volume or ""))


@functools.lru_cache(maxsize=VOLUME_LISTS_KEPT)
def _volumes_read(image_path: str) -> tuple[tuple[int, int, str], ...]:
    """(partition number, size, name) of the logical volumes in the image, read from it once
    per process (an image never changes; a failed read is not kept), one image at a time:
    each page of the file browser asks, for anyone logged in."""
    with _VOLUMES_READING:
        return tuple((volume.number, volume.size, volume.volume or "")
                     for volume in imaging.reading.mount.logical_volumes(image_path))


def _problem(image: Image, part: dict, fstype: Optional[str]) -> Optional[str]:
    """Why the files of a partition or volume cannot be listed, or None."""
    if image.encrypted:
        return ("is sealed with its datastore's key, which only the workers hold: "
                "read its files on a worker's host (imaging files --key), or restore it")
    # Only a used-mode backup notes its filesystems: an unknown one is probed by the
    # engine when the partition is opened, which names one it cannot read.
    if fstype is None or fstype in READABLE_FILESYSTEMS:
        return None
    if part.get("stored_in_full"):
        return f"holds {fstype}, stored in full: {part['stored_in_full']}"
    return f"holds {fstype}: files can be read from {imaging.reading.files.COVERED}"


def browsable_partition(image: Image, number: Any) -> BrowsablePartition:
    """The readable partition `number` (text of digits, from a URL) names, or the logical
    volume (vg0-root), else BadPath."""
    if not isinstance(number, str) or not 0 < len(number) <= MAX_NAME:
        raise BadPath("a partition is named by its number, a logical volume as VG-LV")
    if re.fullmatch(r"[0-9]{1,6}", number):
        try:
            part = imaging.reading.mount.numbered(
                partitions(image, volumes=False), int(number), "the image")
        except ImagingError as missing:
            raise BadPath(str(missing)) from None
    else:
        part = next((part for part in partitions(image)
                     if part.volume and part.key == number), None)
        if part is None:
            raise BadPath(f"the image has no logical volume {number} whose files can be listed")
    if part.problem:
        raise BadPath(f"{part.shown} {part.problem}")
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
    if path and not all(imaging.reading.files.safe_name(name) for name in path.split("/")):
        raise BadPath(f"{path!r}: a path may not hold '..', '.' or an empty name")
    return path


def browse(image: Image, partition: Any, path: Any, user_id: int) -> Folder:
    """The folder `path` of partition `partition`, both as a request gives them, listed in
    a file session of user `user_id` (TooMany if they, or all, have as many as allowed)."""
    part = browsable_partition(image, partition)
    path = checked_path(path)
    with filesessions.begin(user_id), _opened(image, part) as files:
        folder = _engine(lambda: files.lookup("/" + path))
        if folder.kind != imaging.reading.files.DIRECTORY:
            raise BadPath(f"/{path} is a {folder.kind}, not a folder")
        entries = _engine(lambda: files.entries(folder))
    return Folder(part, path, [_file_entry(entry, path) for entry in entries])


def download(image: Image, partition: Any, path: Any, user_id: int) -> Download:
    """A file of the partition, or a folder as a tar archive ("" is the whole filesystem);
    the partition and path as a request gives them. It holds a file session of user
    `user_id` until it is closed (TooMany if they, or all, have as many as allowed)."""
    part = browsable_partition(image, partition)
    path = checked_path(path)
    with contextlib.ExitStack() as held:
        held.enter_context(filesessions.begin(user_id))
        files = held.enter_context(_opened(image, part))
        node = _engine(lambda: files.lookup("/" + path))
        stored = os.fsdecode(node.name) if path else \
            (part.key if part.volume else f"partition-{part.number}")
        shown = imaging.reading.files.printable(stored)
        if node.kind == imaging.reading.files.DIRECTORY:
            pieces = _in_steps(_tar_stream(files, node, stored))
            return Download(f"{shown}.tar", TAR_CONTENT_TYPE, pieces, held.pop_all())
        if node.kind != imaging.reading.files.FILE:
            raise BadPath(f"/{path} is a {node.kind}: only files and folders download")
        pieces = _engine(lambda: files.read(node))
        return Download(shown, FILE_CONTENT_TYPE, pieces, held.pop_all(), node.size)


def _opened(image: Image, part: BrowsablePartition) -> imaging.reading.files.FileSession:
    return _engine(lambda: imaging.reading.files.FileSession(image.path,
                                                             part.volume or part.number))


def _tar_stream(files: imaging.reading.files.FileSession, folder: imaging.reading.files.Node,
                top: str) -> Iterator[bytes]:
    """The folder as a tar archive stored under `top`, member by member as the session
    walks it: each file's contents go out as they are read, between its header and the
    next. Names that would leave their folder when unpacked are left out, and so are
    files the filesystem's tools cannot name.

    tarfile's stream mode ('w|') copies a member's contents in one call, so only its
    headers (TarInfo.tobuf, pax) come from it.
    """
    yield _header(top, tarfile.DIRTYPE, files.entry(folder))
    for names, node, contents in files.walk(folder):
        entry = files.entry(node)
        if not imaging.reading.files.safe_name(entry.name):
            continue
        member = "/".join([top, *map(os.fsdecode, names)])
        if entry.type == imaging.reading.files.DIRECTORY:
            yield _header(member, tarfile.DIRTYPE, entry)
        elif entry.type == imaging.reading.files.SYMLINK and entry.target:
            yield _header(member, tarfile.SYMTYPE, entry)
        elif contents is not None:
            yield _header(member, tarfile.REGTYPE, entry)
            yield from contents
            if entry.size % tarfile.BLOCKSIZE:
                yield tarfile.NUL * (tarfile.BLOCKSIZE - entry.size % tarfile.BLOCKSIZE)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def _in_steps(pieces: Iterator[bytes]) -> Iterator[bytes]:
    """The pieces joined into runs of at least STREAM_STEP bytes (but the last): each
    piece sent is a trip to the request's thread, and small files give small pieces."""
    with contextlib.closing(pieces):
        gathered: list[bytes] = []
        size = 0
        for piece in pieces:
            gathered.append(piece)
            size += len(piece)
            if size >= STREAM_STEP:
                yield b"".join(gathered)
                gathered, size = [], 0
        if gathered:
            yield b"".join(gathered)


def _header(name: str, kind: bytes, entry: imaging.reading.files.Entry) -> bytes:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = entry.size if kind == tarfile.REGTYPE else 0
    info.mode = 0o777 if kind == tarfile.SYMTYPE else entry.mode & COPIED_MODE_BITS
    info.linkname = entry.target if kind == tarfile.SYMTYPE else ""
    info.mtime = int(parse_datetime(entry.mtime).timestamp()) if entry.mtime else 0
    return info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")


def _file_entry(entry: imaging.reading.files.Entry, parent: str) -> FileEntry:
    path = f"{parent}/{entry.name}" if parent else entry.name
    try:
        path.encode("utf-8")
        checked_path(path)
    except (UnicodeEncodeError, BadPath):
        path = None  # a name a URL cannot carry back unchanged
    return FileEntry(entry.name, imaging.reading.files.printable(entry.name), path, entry.type,
                     entry.size, entry.mode, parse_datetime(entry.mtime) if entry.mtime else None,
                     entry.target)


def _engine(call: Callable[[], Answer]) -> Answer:
    try:
        return call()
    except ImagingError as exc:
        raise Missing(str(exc)) from exc
