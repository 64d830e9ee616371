"""The datastore: a directory of content-addressed zstd chunks and images.

Layout (see DESIGN.md): datastore.json, chunks/<hh>/<sha256>.zst, and
images/<disk-id>/<stamp>/. Every file lands by write-to-temporary, fsync,
rename, so a crash leaves only temporary files (names starting with '.').
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import threading
import time
from pathlib import Path
from typing import Iterator, Optional

from .errors import ImageError, StoreError, translated
from .inventory import host_name
from .syscalls import start_writeback, syncfs

FORMAT = 1
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
CHUNK_SUFFIX = ".zst"
BAD_SUFFIX = ".bad"
DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
# A writer on another host refreshes its token this often; one silent for
# WRITER_STALE seconds died with its host.
WRITER_HEARTBEAT = 60.0
WRITER_STALE = 600.0
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def check_disk_id(disk_id: str) -> str:
    if not DISK_ID_RE.match(disk_id or "") or ".." in disk_id:
        raise StoreError(f"invalid disk id {disk_id!r}: use letters, digits and ._:+- only")
    return disk_id


class Datastore:
    def __init__(self, root: Path, chunk_size: int) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.chunks_dir = root / "chunks"
        self.images_dir = root / "images"
        self.writers_dir = root / "writers"

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, root: os.PathLike | str) -> "Datastore":
        root = Path(root)
        config = root / "datastore.json"
        try:
            settings = json.loads(config.read_text())
        except FileNotFoundError:
            raise StoreError(f"{root}: not a datastore (no datastore.json)") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{config}: unreadable datastore settings ({exc})") from None
        if settings.get("format") != FORMAT:
            raise StoreError(f"{config}: unsupported datastore format {settings.get('format')!r}")
        chunk_size = settings.get("chunk_size")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 4096:
            raise StoreError(f"{config}: invalid chunk_size {chunk_size!r}")
        return cls(root, chunk_size)

    @classmethod
    def open_or_create(cls, root: os.PathLike | str,
                       chunk_size: int = DEFAULT_CHUNK_SIZE) -> "Datastore":
        root = Path(root)
        if (root / "datastore.json").exists():
            return cls.open(root)
        if chunk_size <= 0 or chunk_size % 4096:
            raise StoreError(f"chunk size must be a positive multiple of 4096, not {chunk_size}")
        with translated(StoreError, f"cannot create datastore {root}"):
            root.mkdir(parents=True, exist_ok=True)
            for sub in ("chunks", "images", "writers"):
                (root / sub).mkdir(exist_ok=True)
            write_atomically(root / "datastore.json",
                             json.dumps({"format": FORMAT, "chunk_size": chunk_size}).encode() + b"\n")
            fsync_dir(root)
        return cls(root, chunk_size)

    # -- chunks ----------------------------------------------------------
    def chunk_path(self, digest: str) -> Path:
        return self.chunks_dir / digest[:2] / f"{digest}{CHUNK_SUFFIX}"

    def touch_chunk(self, digest: str) -> bool:
        """Mark an existing chunk as in use now; False if it is not stored.

        Garbage collection never removes a chunk touched after the oldest
        running backup started, so a backup that reuses a chunk keeps it alive.
        """
        try:
            os.utime(self.chunk_path(digest))
            return True
        except FileNotFoundError:
            return False

    def write_chunk(self, digest: str, frame: bytes) -> None:
        path = self.chunk_path(digest)
        with translated(StoreError, f"cannot write chunk {digest[:16]}"):
            try:
                write_atomically(path, frame)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, frame)

    def chunk_batch(self) -> "ChunkBatch":
        return ChunkBatch(self)

    def read_frame(self, digest: str) -> bytes:
        path = self.chunk_path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"chunk {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read chunk {digest}: {exc.strerror}") from None

    def quarantine(self, digest: str) -> Path:
        """Set a corrupt chunk aside so the next backup of that data stores it afresh."""
        path = self.chunk_path(digest)
        bad = path.with_name(path.name + BAD_SUFFIX)
        with translated(StoreError, f"cannot set aside corrupt chunk {digest}"):
            os.replace(path, bad)
        return bad

    def chunk_dirs(self) -> list[Path]:
        return sorted(p for p in self.chunks_dir.iterdir() if p.is_dir())

    # -- images ----------------------------------------------------------
    def disk_ids(self) -> list[str]:
        if not self.images_dir.is_dir():
            return []
        return sorted(p.name for p in self.images_dir.iterdir()
                      if p.is_dir() and not p.name.startswith("."))

    def image_dirs(self, disk_id: Optional[str] = None) -> list[Path]:
        disks = [disk_id] if disk_id else self.disk_ids()
        found = []
        for disk in disks:
            folder = self.images_dir / disk
            if folder.is_dir():
                found.extend(sorted(p for p in folder.iterdir()
                                    if p.is_dir() and not p.name.startswith(".")))
        return found

    # -- running writers (for garbage collection) ------------------------
    @contextlib.contextmanager
    def writer(self, what: str) -> Iterator[Path]:
        """Register a running job that may reference chunks not yet in any image.

        Hosts share a datastore over NFS: the token names its host, and a
        heartbeat keeps its mtime fresh so other hosts can tell a live writer
        from one whose host died.
        """
        self.writers_dir.mkdir(exist_ok=True)
        host, pid = host_name(), os.getpid()
        token = self.writers_dir / f"{host}-{pid}-{secrets.token_hex(4)}"
        token.write_text(json.dumps({"host": host, "pid": pid, "what": what, "started": time.time()}))
        stopped = threading.Event()

        def heartbeat() -> None:
            while not stopped.wait(WRITER_HEARTBEAT):
                with contextlib.suppress(OSError):
                    os.utime(token)

        beating = threading.Thread(target=heartbeat, name="writer-heartbeat", daemon=True)
        beating.start()
        try:
            yield token
        finally:
            stopped.set()
            beating.join()
            with contextlib.suppress(OSError):
                token.unlink()

    def running_writers(self) -> list[dict]:
        """Registered writers still alive: a live process here, a fresh heartbeat elsewhere."""
        alive = []
        if not self.writers_dir.is_dir():
            return alive
        here = host_name()
        for token in self.writers_dir.iterdir():
            try:
                info = json.loads(token.read_text())
                beat = token.stat().st_mtime
                if info.get("host", here) == here:
                    os.kill(int(info["pid"]), 0)
                elif time.time() - beat > WRITER_STALE:
                    continue
                info["started"] = min(float(info["started"]), beat)
            except (OSError, ValueError, KeyError, TypeError):
                continue
            alive.append(info)
        return alive


def _write_and_start_writeback(path: Path, data: bytes) -> None:
    """Write a new file; its writeback starts now, so the batch's syncfs waits less."""
    with open(path, "wb") as handle:
        handle.write(data)
        handle.flush()
        start_writeback(handle.fileno(), 0, len(data))


class ChunkBatch:
    """Writes many new chunks durably for the price of one filesystem sync.

    Each chunk goes to a temporary name at once; `flush` syncs the filesystem
    once, then renames the whole batch into place and syncs the directories.
    Same guarantee as fsync-then-rename per chunk: a chunk is visible under
    its name only after its bytes are on disk.
    """

    def __init__(self, store: Datastore, flush_bytes: int = 256 * 1024 * 1024) -> None:
        self.store = store
        self.flush_bytes = flush_bytes
        self._pending: list[tuple[Path, Path]] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()

    def add(self, digest: str, frame: bytes) -> None:
        path = self.store.chunk_path(digest)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with translated(StoreError, f"cannot write chunk {digest[:16]}"):
            try:
                try:
                    _write_and_start_writeback(tmp, frame)
                except FileNotFoundError:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_and_start_writeback(tmp, frame)
            except BaseException:
                # Also when the retry in a new folder fails: no partial file stays behind.
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        with self._lock:
            self._pending.append((tmp, path))
            self._pending_bytes += len(frame)

    def due(self) -> bool:
        return self._pending_bytes >= self.flush_bytes

    def flush(self) -> None:
        with self._lock:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        if not batch:
            return
        with translated(StoreError, "cannot store chunks"):
            syncfs(self.store.chunks_dir)
            for tmp, path in batch:
                os.replace(tmp, path)
            for folder in {path.parent for _, path in batch}:
                fsync_dir(folder)

    def discard(self) -> None:
        with self._lock:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        for tmp, _ in batch:
            with contextlib.suppress(OSError):
                tmp.unlink()
