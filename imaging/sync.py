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

The destination is a datastore's folder, or `rclone:` and any remote path rclone takes (a
configured `name:path`, or a connection string such as `:webdav,url='http://h:8080':store`):
Debian's rclone moves the files, which the engine has checked before. There an image's
files go up with its manifest last, and an image without its manifest is not there yet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

from .base import tools
from .base.errors import Cancelled, ImageError, StoreError, translated
from .base.progress import UNIT_CHUNKS, Progress
from .datastore import codec
from .datastore.chunks import bases_named_by_files, decode, stored_base
from .datastore.image import Image
from .datastore.manifest import NAME as MANIFEST_NAME
from .datastore.store import (CHUNK_SUFFIX, CONFIG_NAME, FORMAT, TEMP_SUFFIX, ChunkBatch,
                              Datastore, fsync_dir, write_atomically)
from .datastore.verification import RECORD_NAME

# The source is only read; at the destination a sync writes chunks no image names yet.
READING = "sync-out"
WRITING = "sync-in"
REMOTE_PREFIX = "rclone:"
RCLONE_PACKAGE = "rclone"
# rclone's "directory not found" exit status.
RCLONE_NO_DIRECTORY = 3
# A local copy makes its chunks durable a batch at a time: a killed sync sends this again.
LOCAL_BATCH_BYTES = 64 * 1024 * 1024
# What a connection string may hold that nobody else should read: shown as ***.
SECRET_OPTION = re.compile(r"((?:^|,)[\w-]*(?:pass|password|key|token|secret|user)[\w-]*=)"
                           r"('[^']*'|\"[^\"]*\"|[^,:]*)", re.IGNORECASE)
URL_USER = re.compile(r"(://)[^/@'\"]*@")


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
         bwlimit: Optional[str] = None, progress: Optional[Progress] = None) -> SyncResult:
    """Copy the images of `source` (of `disks`, the `last` N of each) that `destination`
    lacks; the destination is created, with the source's chunk size, if absent."""
    started = time.monotonic()
    progress = progress or Progress("sync", 0)
    src = Datastore.open(source)
    target = str(destination)
    if target.startswith(REMOTE_PREFIX):
        copy: Destination = Remote(target[len(REMOTE_PREFIX):], src, bwlimit, progress)
    else:
        if bwlimit is not None:
            raise StoreError("a bandwidth limit applies to a copy to an rclone: remote only")
        copy = Local(Path(target), src)
    wanted = _images(src, disks, last)
    result = SyncResult(str(src.root), copy.name, [], [], 0, 0, 0, 0.0)
    names = [f"{path.parent.name}/{path.name}" for path in wanted]
    with src.register(READING, f"sync to {copy.name}", images=names, progress=progress), \
            copy.registered(f"sync from {src.root}", progress):
        missing = [path for path, name in zip(wanted, names) if not copy.holds_image(name)]
        result.present = [name for path, name in zip(wanted, names) if path not in missing]
        images = [Image.open(path, src) for path in missing]
        lengths = {entry.digest: image.chunk_length(position)
                   for image in images for position, entry in enumerate(image.entries())}
        bases = bases_named_by_files(src, lengths)
        order = sorted(bases) + sorted(set(lengths) - bases)
        progress.start_phase("sync", len(order), UNIT_CHUNKS)
        sending: list[str] = []
        handled: set[str] = set()

        def send(digest: str) -> None:
            if digest in handled:
                return
            handled.add(digest)
            if copy.holds_chunk(digest):
                result.chunks_present += 1
                return
            frame = _checked_frame(src, digest, lengths.get(digest))
            if frame is None:
                result.chunks_present += 1
                return
            base = codec.delta_base(frame)
            if base is not None:
                send(base)  # the base its file names now, which a later backup may have changed
            sending.append(digest)
            copy.send_chunk(digest, frame)
            result.bytes_sent += len(frame)

        try:
            for digest in order:
                if progress.cancelled():
                    raise Cancelled()
                send(digest)
                progress.advance(1)
            copy.flush_chunks(sending)
        except BaseException:
            copy.discard_chunks()
            raise
        result.chunks_sent = len(sending)
        for image in images:
            copy.send_image(image)
            result.copied.append(f"{image.disk_id}/{image.stamp}")
    progress.finish()
    result.seconds = time.monotonic() - started
    return result


class Destination(Protocol):
    name: str

    def registered(self, what: str, progress: Progress) -> contextlib.AbstractContextManager: ...

    def holds_image(self, name: str) -> bool: ...

    def holds_chunk(self, digest: str) -> bool:
        """Whether a whole copy of the chunk is there (then it counts as in use)."""

    def send_chunk(self, digest: str, frame: bytes) -> None:
        """Send (or queue) a chunk whose frame was checked."""

    def flush_chunks(self, digests: list[str]) -> None:
        """The chunks queued, sent; an error if one did not arrive whole."""

    def discard_chunks(self) -> None:
        """The chunks queued and not sent, forgotten (the sync failed)."""

    def send_image(self, image: Image) -> None: ...


def _checked_frame(src: Datastore, digest: str, length: Optional[int]) -> Optional[bytes]:
    """The chunk's stored frame, checked (decoded, its content matching its name) before it
    goes; None for an all-zero chunk the source does not hold (read as zeros anyway)."""
    try:
        frame = src.read_frame(digest)
    except ImageError:
        if length is not None and digest == codec.zero_digest(length):
            return None
        raise
    if codec.digest(decode(src, digest, frame)) != digest:
        raise ImageError(f"chunk {digest} in {src.root} is corrupt (content does not match its "
                         "name): not copied; verify the source")
    return frame


def _image_files(image: Image) -> list[str]:
    """The files of an image a copy takes, its manifest last; its verify record stays
    behind: the copy is verified where it lies."""
    names = sorted(entry.name for entry in image.path.iterdir()
                   if entry.is_file() and entry.name not in (RECORD_NAME, MANIFEST_NAME))
    return [*names, MANIFEST_NAME]


class Local:
    """A datastore folder on this host: chunks made durable a batch at a time, a file already
    there kept; an image's files in a folder of this run's own, renamed into place once
    complete."""

    def __init__(self, root: Path, src: Datastore) -> None:
        here, there = root.resolve(), src.root.resolve()
        if here == there or there in here.parents or here in there.parents:
            raise StoreError(f"{root} is the source datastore, or lies inside it or around it")
        self.store = Datastore.open_or_create(root, chunk_size=src.chunk_size)
        _check_compatible(str(self.store.root), self.store.chunk_size, self.store.format, src)
        self.src = src
        self.name = str(self.store.root)
        # Whichever file of a chunk lands first stays: another may already use it as a base.
        self.batch = ChunkBatch(self.store, flush_bytes=LOCAL_BATCH_BYTES)

    def registered(self, what: str, progress: Progress) -> contextlib.AbstractContextManager:
        return self.store.register(WRITING, what, progress=progress)

    def holds_image(self, name: str) -> bool:
        return (self.store.images_dir / name).is_dir()

    def holds_chunk(self, digest: str) -> bool:
        if not self.store.touch_chunk(digest):
            return False
        # Its file here may be a delta against a base of its own, which gc must spare too.
        base = stored_base(self.store, digest)
        return base is None or self.store.touch_chunk(base)

    def send_chunk(self, digest: str, frame: bytes) -> None:
        self.batch.add(digest, frame)
        if self.batch.due():
            self.batch.flush()

    def flush_chunks(self, digests: list[str]) -> None:
        self.batch.flush()

    def discard_chunks(self) -> None:
        self.batch.discard()

    def send_image(self, image: Image) -> None:
        folder = self.store.images_dir / image.disk_id
        final = folder / image.stamp
        # A folder of this run's own (gc removes one a killed run left behind).
        tmp = folder / f".{image.stamp}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        with translated(StoreError, f"cannot write image {image.disk_id}/{image.stamp} in "
                                    f"{self.store.root}"):
            folder.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            try:
                for name in _image_files(image):
                    write_atomically(tmp / name, (image.path / name).read_bytes())
                fsync_dir(tmp)
                if final.exists():  # another sync published it meanwhile
                    return
                os.rename(tmp, final)
                fsync_dir(folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)


class Remote:
    """A datastore wherever rclone reaches: what is there is listed once (names and sizes),
    the chunks it lacks go up in one rclone run, an image's files with its manifest last."""

    def __init__(self, remote: str, src: Datastore, bwlimit: Optional[str],
                 progress: Progress) -> None:
        if not remote:
            raise StoreError("name the remote after rclone: (rclone:NAME:PATH)")
        self.remote, self.src, self.progress = remote, src, progress
        self.name = shown(REMOTE_PREFIX + remote)
        self.sizes: dict[str, int] = {}
        self.options = ["--bwlimit", bwlimit] if bwlimit else []
        config = self._settings()
        _check_compatible(self.name, config["chunk_size"], config["format"], src)
        self.chunks = self._listing("chunks")
        # An image is there once its manifest is, whole.
        self.manifests = {name.rsplit("/", 1)[0]: size
                          for name, size in self._listing("images").items()
                          if name.endswith("/" + MANIFEST_NAME)}

    def registered(self, what: str, progress: Progress) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def holds_image(self, name: str) -> bool:
        there = self.manifests.get(name)
        return there is not None and \
            there == (self.src.images_dir / name / MANIFEST_NAME).stat().st_size

    def holds_chunk(self, digest: str) -> bool:
        there = self.chunks.get(_relative(digest))
        try:
            return there is not None and there == self.src.chunk_path(digest).stat().st_size
        except FileNotFoundError:
            return False  # the source lacks it: checking it says why

    def send_chunk(self, digest: str, frame: bytes) -> None:
        # Sent with the others by flush_chunks, in one rclone run, from the same file.
        self.sizes[digest] = len(frame)

    def flush_chunks(self, digests: list[str]) -> None:
        if not digests:
            return
        with self._file_list(_relative(digest) for digest in digests) as listing:
            self._rclone("copy", str(self.src.chunks_dir), self._path("chunks"),
                         "--files-from", listing, "--no-traverse",
                         failure=f"cannot send {len(digests)} chunks to {self.name}")
        # rclone passes over a listed file that is gone: the images go up only once every
        # chunk is there, whole.
        arrived = self._listing("chunks")
        for digest in digests:
            if arrived.get(_relative(digest)) != self.sizes[digest]:
                raise StoreError(f"chunk {digest} did not arrive whole at {self.name}: "
                                 "no image sent; run the sync again")

    def discard_chunks(self) -> None:
        pass

    def send_image(self, image: Image) -> None:
        there = self._path(f"images/{image.disk_id}/{image.stamp}")
        *files, manifest = _image_files(image)
        with self._file_list(files) as listing:
            self._rclone("copy", str(image.path), there, "--files-from", listing,
                         "--no-traverse", failure=f"cannot send image {image.disk_id}/"
                                                  f"{image.stamp} to {self.name}")
        self._rclone("copyto", str(image.path / manifest), f"{there}/{manifest}",
                     failure=f"cannot send the manifest of {image.disk_id}/{image.stamp}")

    def _settings(self) -> dict:
        # The first contact: a remote nobody answers for fails at once, not after rclone's
        # retries (transfers keep them).
        found = self._rclone("lsf", self.remote, "--files-only", "--include", CONFIG_NAME,
                             "--retries", "1", "--low-level-retries", "1")
        if found.returncode not in (0, RCLONE_NO_DIRECTORY):
            raise StoreError(f"cannot reach {self.name}: {shown(tools.complaint(found))}")
        if found.returncode == 0 and CONFIG_NAME in found.stdout.split():
            text = self._rclone("cat", self._path(CONFIG_NAME),
                                failure=f"cannot read {CONFIG_NAME} of {self.name}").stdout
            try:
                config = json.loads(text)
                return {"chunk_size": int(config["chunk_size"]), "format": int(config["format"])}
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{self.name}: unreadable {CONFIG_NAME}") from None
        config = {"format": FORMAT, "chunk_size": self.src.chunk_size}
        self._rclone("rcat", self._path(CONFIG_NAME), input=json.dumps(config).encode() + b"\n",
                     failure=f"cannot create a datastore at {self.name}")
        return config

    def _listing(self, folder: str) -> dict[str, int]:
        """Each file under `folder` there, by its path below it, with its size."""
        done = self._rclone("lsf", self._path(folder), "-R", "--files-only", "--format", "ps",
                            "--separator", "\t")
        if done.returncode == RCLONE_NO_DIRECTORY:
            return {}  # not there yet: nothing under it
        if done.returncode != 0:
            raise StoreError(f"cannot list {folder} at {self.name}: "
                             f"{shown(tools.complaint(done))}")
        sizes = {}
        for line in done.stdout.splitlines():
            path, _, size = line.rpartition("\t")
            if path and size.isdigit() and not path.startswith(".") and "/." not in path:
                sizes[path] = int(size)
        return sizes

    def _path(self, relative: str) -> str:
        return f"{self.remote}{relative}" if self.remote.endswith(":") else \
            f"{self.remote.rstrip('/')}/{relative}"

    @contextlib.contextmanager
    def _file_list(self, names: Iterable[str]) -> Iterator[str]:
        with tempfile.NamedTemporaryFile("w", prefix="imaging-sync-", suffix=".txt") as listing:
            listing.write("".join(f"{name}\n" for name in names))
            listing.flush()
            yield listing.name

    def _rclone(self, command: str, *arguments: str, failure: Optional[str] = None,
                input: Optional[bytes] = None):
        try:
            return tools.run("rclone", RCLONE_PACKAGE, [command, *arguments, *self.options],
                             kind=StoreError, failure=failure, input=input,
                             text=input is None, cancelled=self.progress.cancelled)
        except StoreError as exc:  # rclone quotes the remote, secrets and all
            raise StoreError(shown(str(exc))) from None


def _relative(digest: str) -> str:
    """A chunk's file, below the chunks folder."""
    return f"{digest[:2]}/{digest}{CHUNK_SUFFIX}"


def shown(text: str) -> str:
    """`text` with what a remote's connection string holds secret (passwords, keys, tokens,
    users, a URL's user and password) as ***: for messages, results and registrations."""
    return URL_USER.sub(r"\1***@", SECRET_OPTION.sub(r"\1***", text))


def _check_compatible(name: str, chunk_size: int, store_format: int, src: Datastore) -> None:
    if chunk_size != src.chunk_size:
        raise StoreError(f"{name} stores chunks of {chunk_size} bytes, {src.root} of "
                         f"{src.chunk_size}: a copy needs the same chunk size")
    if store_format < src.format:
        raise StoreError(f"{name} is a datastore of format {store_format}, older than the "
                         f"source's {src.format}: it cannot hold its delta chunks")


def _images(store: Datastore, disks: Optional[Iterable[str]], last: Optional[int]) -> list[Path]:
    if last is not None and last < 1:
        raise StoreError(f"the newest {last} images of each disk: ask for one or more")
    chosen = []
    for disk in (list(disks) if disks else store.disk_ids()):
        found = store.image_dirs(disk)
        if disks and not found:
            raise StoreError(f"{store.root} holds no image of disk {disk}")
        chosen += found[-last:] if last else found
    return sorted(chosen, key=lambda path: path.name)  # oldest first: bases go before deltas
