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
import secrets
import shutil
import time
from pathlib import Path
from typing import Iterable, Iterator, Optional, Protocol

from .base import rclone
from .base.errors import ImageError, StoreError, translated
from .base.pipeline import ordered_map
from .base.progress import UNIT_CHUNKS, Progress
from .datastore import codec, remote
from .datastore.chunks import bases_named_by_files, decode
from .datastore.image import Image, references
from .datastore.keyring import KeyNeeded
from .datastore.remote import RemoteStore
from .datastore.manifest import NAME as MANIFEST_NAME
from .datastore.sealing import looks_sealed
from .base.syscalls import fsync_dir
from .datastore.store import (CHUNK_SUFFIX, CONFIG_NAME, SYNC_READING, SYNC_WRITING,
                              TEMP_SUFFIX, ChunkBatch, Datastore, write_atomically)
from .datastore.verification import RECORD_NAME

# A local copy makes its chunks durable a batch at a time: a killed sync sends this again.
LOCAL_BATCH_BYTES = 64 * 1024 * 1024


@dataclasses.dataclass
class SyncResult:
    source: str
    destination: str
    copied: list[str]  # "<disk>/<stamp>" of each image copied
    present: list[str]  # ... of each image the destination held already
    chunks_sent: int
    bytes_sent: int  # of the chunks' files
    chunks_present: int
    seconds: float
    image_bytes_sent: int = 0  # of the images' files
    held: list[str] = dataclasses.field(default_factory=list)  # every image there after it

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def sync(source: os.PathLike | str, destination: os.PathLike | str, *,
         disks: Optional[Iterable[str]] = None, last: Optional[int] = None,
         bwlimit: Optional[str] = None, progress: Optional[Progress] = None) -> SyncResult:
    """Copy the images of `source` (of `disks`, the `last` N of each) that `destination`
    lacks; the destination is created, with the source's chunk size, if absent. Either may
    be `rclone:` and a remote: a sync from one (a pull) reads it through a read-only
    mount and registers there as its reader."""
    started = time.monotonic()
    progress = progress or Progress("sync", 0)
    with _source(source, progress) as (src, origin):
        target = str(destination)
        if rclone.is_remote(target):
            copy: Destination = Remote(rclone.remote_of(target), src, bwlimit, progress)
        else:
            if bwlimit is not None:
                raise StoreError("a bandwidth limit applies to a copy to an rclone: remote only")
            copy = Local(Path(target), src)
        result = _sync(src, origin, copy, _images(src, disks, last), progress)
    result.seconds = time.monotonic() - started
    return result


@contextlib.contextmanager
def _source(source: os.PathLike | str,
            progress: Progress) -> Iterator[tuple[Datastore, Optional[RemoteStore]]]:
    """The datastore to copy from: a folder, or a remote mounted read-only, with the remote
    beside it (its readers register there)."""
    if not rclone.is_remote(source):
        yield Datastore.open(source), None
        return
    origin = RemoteStore(rclone.remote_of(str(source)), cancelled=progress.cancelled)
    origin.check_datastore()
    with rclone.mounted(origin.remote) as point:
        yield Datastore.open(point), origin


def _sync(src: Datastore, origin: Optional[RemoteStore], copy: "Destination",
          wanted: list[Path], progress: Progress) -> SyncResult:
    source_name = origin.name if origin else str(src.root)
    result = SyncResult(source_name, copy.name, [], [], 0, 0, 0, 0.0)
    names = names_of(wanted)
    with (origin or src).register(SYNC_READING, f"sync to {copy.name}", images=names,
                                  progress=progress), \
            copy.registered(f"sync from {source_name}", progress):
        missing = [path for path, name in zip(wanted, names) if not copy.holds_image(name)]
        result.present = [name for path, name in zip(wanted, names) if path not in missing]
        lengths = _needed_chunks(src, missing)
        bases = set() if src.encrypted else bases_named_by_files(src, lengths)
        order = sorted(bases) + sorted(set(lengths) - bases)
        progress.start_phase("sync", len(order), UNIT_CHUNKS)
        sending: list[str] = []
        handled: set[str] = set()

        def looked_at(digest: str) -> Optional[tuple[bytes, Optional[str]]]:
            """What of the chunk is to go (in a worker: reading and checking it is most of
            a sync's work), None if nothing."""
            if copy.holds_chunk(digest):
                return None
            return _checked_file(src, digest, lengths.get(digest))

        def send(digest: str, checked: Optional[tuple[bytes, Optional[str]]]) -> None:
            if digest in handled:
                return
            handled.add(digest)
            if checked is None:
                result.chunks_present += 1
                return
            data, base = checked
            if base is not None and base not in handled:
                # the base its file names now, which a later backup may have changed
                send(base, looked_at(base))
            sending.append(digest)
            copy.send_chunk(digest, data)
            result.bytes_sent += len(data)

        try:
            for digest, checked in ordered_map(
                    lambda digest: None if digest in handled else looked_at(digest), order,
                    cancelled=progress.cancelled, name="sync"):
                send(digest, checked)
                progress.advance(1)
            copy.publish(sending, missing)
        except BaseException:
            copy.discard_chunks()
            raise
        result.chunks_sent = len(sending)
        result.copied = names_of(missing)
        result.image_bytes_sent = sum((path / name).stat().st_size for path in missing
                                      for name in _image_files(path))
        result.held = sorted(set(copy.images()) | set(result.copied))
    progress.finish()
    return result


def names_of(images: Iterable[Path]) -> list[str]:
    """"<disk>/<stamp>" of each image folder."""
    return [f"{path.parent.name}/{path.name}" for path in images]


class Destination(Protocol):
    name: str

    def registered(self, what: str, progress: Progress) -> contextlib.AbstractContextManager: ...

    def holds_image(self, name: str) -> bool: ...

    def images(self) -> list[str]:
        """Every image there ("<disk>/<stamp>"), whichever datastore it came from."""

    def holds_chunk(self, digest: str) -> bool:
        """Whether a whole copy of the chunk is there (then it counts as in use)."""

    def send_chunk(self, digest: str, data: bytes) -> None:
        """Send (or queue) a chunk's file (as stored), checked."""

    def publish(self, digests: list[str], images: list[Path]) -> None:
        """The chunks queued, sent (an error if one did not arrive whole), then the images,
        each listed there only once its manifest is."""

    def discard_chunks(self) -> None:
        """The chunks queued and not sent, forgotten (the sync failed)."""


def _needed_chunks(src: Datastore, images: list[Path]) -> dict[str, Optional[int]]:
    """Every chunk the images need, with its length where the index says it (an encrypted
    store's images, read without the key, list theirs with their bases: lengths unknown)."""
    if src.encrypted:
        return {name: None for path in images for name in references(src, path)}
    needed: dict[str, Optional[int]] = {}
    for path in images:
        image = Image.open(path, src)
        for position, entry in enumerate(image.entries()):
            needed[entry.digest] = image.chunk_length(position)
    return needed


def _checked_file(src: Datastore, digest: str,
                  length: Optional[int]) -> Optional[tuple[bytes, Optional[str]]]:
    """The chunk's file as stored, checked before it goes (opened, decoded, its content
    matching its name), and the base its frame names; None for an all-zero chunk the source
    does not hold (read as zeros anyway). An encrypted store's chunk, without the key, is
    only seen to be a sealed file: it goes as it is, and verify checks it where it lands."""
    try:
        data = src.read_chunk_file(digest)
    except ImageError:
        if length is not None and digest == src.zero_name(length):
            return None
        raise
    if src.encrypted:
        try:
            src.sealer
        except KeyNeeded:
            if not looks_sealed(data):
                raise ImageError(f"chunk {digest} in {src.root} is not a sealed file: not "
                                 "copied; verify the source") from None
            return data, None
    frame = src.frame_of(digest, data)
    if src.name(decode(src, digest, frame)) != digest:
        raise ImageError(f"chunk {digest} in {src.root} is corrupt (content does not match its "
                         "name): not copied; verify the source")
    # An encrypted store's references name the bases already.
    return data, None if src.encrypted else codec.delta_base(frame)


def _image_files(image_dir: Path) -> list[str]:
    """The files of an image a copy takes, its manifest last; its verify record stays
    behind: the copy is verified where it lies."""
    names = sorted(entry.name for entry in image_dir.iterdir()
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
        self.store = (Datastore.open(root) if (root / CONFIG_NAME).exists() else
                      Datastore.open_or_create(root, src.chunk_size, src.fingerprint))
        _check_compatible(str(self.store.root), self.store.settings, src)
        self.src = src
        self.name = str(self.store.root)
        # Whichever file of a chunk lands first stays: another may already use it as a base.
        self.batch = ChunkBatch(self.store, flush_bytes=LOCAL_BATCH_BYTES)

    def registered(self, what: str, progress: Progress) -> contextlib.AbstractContextManager:
        return self.store.register(SYNC_WRITING, what, progress=progress)

    def holds_image(self, name: str) -> bool:
        return (self.store.images_dir / name).is_dir()

    def images(self) -> list[str]:
        return names_of(self.store.image_dirs())

    def holds_chunk(self, digest: str) -> bool:
        if not self.store.touch_chunk(digest):
            return False
        if self.store.encrypted:
            return True  # the image's references name the bases, touched as they come
        # Its file here may be a delta against a base of its own, which gc must spare too.
        base = self.store.stored_base(digest)
        return base is None or self.store.touch_chunk(base)

    def send_chunk(self, digest: str, data: bytes) -> None:
        self.batch.add_file(digest, data)
        if self.batch.due():
            self.batch.flush()

    def publish(self, digests: list[str], images: list[Path]) -> None:
        self.batch.flush()
        for image_dir in images:
            self._send_image(image_dir)

    def discard_chunks(self) -> None:
        self.batch.discard()

    def _send_image(self, image_dir: Path) -> None:
        disk, stamp = image_dir.parent.name, image_dir.name
        folder = self.store.images_dir / disk
        final = folder / stamp
        # A folder of this run's own (gc removes one a killed run left behind).
        tmp = folder / f".{stamp}.{secrets.token_hex(4)}{TEMP_SUFFIX}"
        with translated(StoreError, f"cannot write image {disk}/{stamp} in "
                                    f"{self.store.root}"):
            folder.mkdir(parents=True, exist_ok=True)
            tmp.mkdir()
            try:
                for name in _image_files(image_dir):
                    write_atomically(tmp / name, (image_dir / name).read_bytes())
                fsync_dir(tmp)
                if final.exists():  # another sync published it meanwhile
                    return
                os.rename(tmp, final)
                fsync_dir(folder)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    shutil.rmtree(tmp)


class Remote:
    """A datastore wherever rclone reaches: what is there is listed once (names and sizes);
    the chunks it lacks and the images' files but their manifests go up in one rclone run,
    are listed again, then the manifests go up in another.

    rclone's own check after each upload is skipped (`--ignore-checksum`): on SFTP it
    re-reads every file at the remote with md5sum, which doubled the time of a copy here,
    while the sizes listed after the upload and the chunks' names (verify --read-data
    downloads and re-hashes them) check what arrived, and the transport (SSH, TLS)
    authenticates what travels."""

    def __init__(self, remote: str, src: Datastore, bwlimit: Optional[str],
                 progress: Progress) -> None:
        self.store = RemoteStore(remote, options=["--bwlimit", bwlimit] if bwlimit else [],
                                 cancelled=progress.cancelled)
        self.src, self.name = src, self.store.name
        self.sizes: dict[str, int] = {}
        self.files: dict[str, int] = {}
        self.manifests: dict[str, int] = {}
        _check_compatible(self.name, self._settings(CONFIG_NAME in self.store.top_files()), src)

    @contextlib.contextmanager
    def registered(self, what: str, progress: Progress) -> Iterator[None]:
        """Registered, no prune or gc there; then what is there is listed (a chunk a gc
        deleted before is not counted on)."""
        with self.store.register(SYNC_WRITING, what, progress=progress,
                                 excludes=remote.deletes):
            self.files = self.store.listing()
            # An image is there once its manifest is, whole.
            self.manifests = {name[len("images/"):-len("/" + MANIFEST_NAME)]: size
                              for name, size in self.files.items()
                              if name.startswith("images/")
                              and name.endswith("/" + MANIFEST_NAME)}
            yield

    def holds_image(self, name: str) -> bool:
        there = self.manifests.get(name)
        return there is not None and \
            there == (self.src.images_dir / name / MANIFEST_NAME).stat().st_size

    def images(self) -> list[str]:
        return list(self.manifests)

    def holds_chunk(self, digest: str) -> bool:
        there = self.files.get(_relative(digest))
        try:
            return there is not None and there == self.src.chunk_path(digest).stat().st_size
        except FileNotFoundError:
            return False  # the source lacks it: checking it says why

    def send_chunk(self, digest: str, data: bytes) -> None:
        # Sent with the others by publish, in one rclone run, from the same file.
        self.sizes[digest] = len(data)

    def publish(self, digests: list[str], images: list[Path]) -> None:
        image_files = [(image_dir, _image_files(image_dir)) for image_dir in images]
        self._copy([*(_relative(digest) for digest in digests),
                    *(f"images/{name}/{file}" for (image_dir, files), name
                      in zip(image_files, names_of(images)) for file in files[:-1])],
                   f"cannot send {len(digests)} chunks and {len(images)} images to {self.name}")
        # rclone passes over a listed file that is gone: the images are published only once
        # every chunk is there, whole.
        arrived = self.store.listing("chunks") if digests else {}
        for digest in digests:
            if arrived.get(_relative(digest)) != self.sizes[digest]:
                raise StoreError(f"chunk {digest} did not arrive whole at {self.name}: "
                                 "no image sent; run the sync again")
        if images:
            self._copy([f"images/{name}/{MANIFEST_NAME}" for name in names_of(images)],
                       f"cannot send the manifests of {len(images)} images to {self.name}")

    def discard_chunks(self) -> None:
        pass

    def _copy(self, names: list[str], failure: str) -> None:
        with self.store.file_list(names) as listing:
            self.store.run("copy", os.path.abspath(self.src.root), self.store.remote,
                           "--files-from", listing, "--no-traverse", "--ignore-checksum",
                           failure=failure)

    def _settings(self, present: bool) -> dict:
        """Its datastore.json, written with the source's settings if it has none."""
        if present:
            text = self.store.run("cat", self.store.path(CONFIG_NAME),
                                  failure=f"cannot read {CONFIG_NAME} of {self.name}").stdout
            try:
                config = json.loads(text)
                found = {"chunk_size": int(config["chunk_size"]), "format": int(config["format"])}
                return dict(found, key=str(config["key"])) if "key" in config else found
            except (ValueError, KeyError, TypeError):
                raise StoreError(f"{self.name}: unreadable {CONFIG_NAME}") from None
        config = self.src.settings
        self.store.write(CONFIG_NAME, json.dumps(config).encode() + b"\n")
        return config


def _relative(digest: str) -> str:
    """A chunk's file, below the datastore's folder."""
    return f"chunks/{digest[:2]}/{digest}{CHUNK_SUFFIX}"


def _check_compatible(name: str, settings: dict, src: Datastore) -> None:
    """`settings`, the destination's datastore.json, fit a copy of `src`."""
    chunk_size, store_format, key = settings["chunk_size"], settings["format"], settings.get("key")
    if key != src.fingerprint:
        def encrypted(where: object, fingerprint: Optional[str]) -> str:
            return (f"{where} is encrypted with key {fingerprint}" if fingerprint
                    else f"{where} is not encrypted")
        raise StoreError(f"{encrypted(name, key)} and {encrypted(src.root, src.fingerprint)}: "
                         "a copy goes into a datastore encrypted as its source is")
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
