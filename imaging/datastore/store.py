"""The datastore: a directory of content-addressed zstd chunks and images.

Layout (docs/architecture.md, The datastore): datastore.json, chunks/<hh>/<sha256>.zst,
images/<disk-id>/<stamp>/, and jobs/ with a token for each running job.
Every file lands by write-to-temporary, fsync, rename, so a crash leaves only
temporary files (names starting with '.').
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import os
import re
import secrets
import stat
import threading
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from ..base.errors import ImageError, StoreError, describe, reason, translated
from ..base.progress import Progress
from ..base.syscalls import fsync_dir, start_writeback, syncfs
from ..disks.inventory import host_name, safe_id
from . import codec, keyring
from .codec import MAX_BASE_SIZE
from .recipe import NAME as RECIPE_NAME
from .sealing import OVERHEAD as SEAL_OVERHEAD
from .sealing import Sealer
from .verification import RECORD_NAME as VERIFY_NAME

# Format 2: an index line may name the base of a delta chunk (see codec).
# Format 1 datastores are read, and written without deltas. Format 3 is format 2
# encrypted: chunk files and image files sealed, chunks named by a keyed hash.
FORMAT = 2
ENCRYPTED_FORMAT = 3
READABLE_FORMATS = (1, 2, ENCRYPTED_FORMAT)
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
CHUNK_SUFFIX = ".zst"
# What a file or folder is called while it is written, after a dot: gc removes old ones.
TEMP_SUFFIX = ".tmp"
BAD_SUFFIX = ".bad"
CONFIG_NAME = "datastore.json"
# Every running job keeps a token in jobs/ and refreshes its mtime this often.
# Another host sees the new mtime only when its NFS attribute cache for the
# file expires: up to acregmax, 60 s by default (opening the token revalidates
# it under close-to-open, but not on a nocto or noac-tuned mount). A healthy
# job's token thus looks at most 10 + 60 s old; taken for dead at 180 s, a job
# still has almost two minutes of grace for a heartbeat stuck behind a busy or
# rebooting NAS, and a host that died holds its chunks back three minutes at
# most. One attribute update per job every 10 s costs nothing on a NAS.
JOB_HEARTBEAT = 10.0
NFS_ATTRIBUTE_CACHE = 60.0
JOB_STALE = 180.0
# A job that went this long without a heartbeat (suspended, frozen, stalled
# on the NAS) may look dead to a host behind by the attribute cache: it fails.
JOB_LAPSE = JOB_STALE - NFS_ATTRIBUTE_CACHE
# What an unreadable registration counts as: a writer that started at the epoch.
UNKNOWN_KIND = "unknown"
# A sync registers at its source as a reader, at its destination as a writer.
SYNC_READING, SYNC_WRITING = "sync-out", "sync-in"
# Jobs that delete register too: at a remote, syncs and they take turns through the tokens.
PRUNING, COLLECTING = "prune", "gc"
# A boot test: the image booted in a throwaway VM.
BOOTING = "boot"
# Kinds of job that only read chunks some image references; every other kind
# (backup, import, and any this engine does not know) may hold new ones.
READING_KINDS = frozenset({"restore", "export", "verify", "recompress", "mount", BOOTING,
                           SYNC_READING})
# Kinds of job whose new chunks may bear old mtimes: rclone gives a chunk it uploads its
# source's mtime, so while a sync into this folder runs, gc here keeps every unreferenced chunk.
UNDATED_WRITING_KINDS = frozenset({SYNC_WRITING})
CLOCK_NAME = ".clock"
# Held by the one running garbage collection.
GC_LOCK = ".gc.lock"
# Shared by running prunes; garbage collection takes it whole, so it never
# sees an image that a prune has hidden but may put back.
PRUNE_LOCK = ".prune.lock"
# Held by the one run moving images to their disk's new id (see rehome).
REHOME_LOCK = ".rehome.lock"
DISK_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:+-]{0,199}$")


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` is either absent or complete."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
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


# In an encrypted store: what an image shows without the key (the manifest's sizes and
# times), and every chunk it needs, sorted (what gc and sync need without the key).
SUMMARY_NAME = "summary.json"
REFERENCES_NAME = "references"
# There while the image is protected from prune and deletion: when and why, as JSON.
PROTECTED_NAME = "protected"
# The files of an image in an encrypted store that stay readable without its key: those,
# the script that restores it, verify's last outcome and the protection.
PLAIN_IMAGE_FILES = frozenset({SUMMARY_NAME, REFERENCES_NAME, RECIPE_NAME, VERIFY_NAME,
                               PROTECTED_NAME})


def image_context(image_dir: Path, name: str) -> str:
    """What a sealed file of an image is: its name and the image's place, whatever folder
    it is written in first (`.STAMP.tmp`, a sync's own)."""
    stamp = image_dir.name.lstrip(".").split(".")[0]
    return f"{name} images/{image_dir.parent.name}/{stamp}"


def check_disk_id(disk_id: str) -> str:
    if not DISK_ID_RE.match(disk_id or "") or ".." in disk_id:
        raise StoreError(f"invalid disk id {disk_id!r}: use letters, digits and ._:+- only")
    return disk_id


class Datastore:
    def __init__(self, root: Path, chunk_size: int, format: int = FORMAT,
                 fingerprint: Optional[str] = None) -> None:
        self.root = root
        self.chunk_size = chunk_size
        self.format = format
        self.fingerprint = fingerprint  # of the key that encrypts it; None: not encrypted
        self._sealer: Optional[Sealer] = None
        self._zero_names: dict[int, str] = {}
        self.chunks_dir = root / "chunks"
        self.images_dir = root / "images"
        self.jobs_dir = root / "jobs"

    # -- opening ---------------------------------------------------------
    @classmethod
    def open(cls, root: os.PathLike | str) -> "Datastore":
        root = Path(root)
        config = root / CONFIG_NAME
        try:
            settings = json.loads(config.read_text())
        except FileNotFoundError:
            raise StoreError(f"{root}: not a datastore (no {CONFIG_NAME})") from None
        except (OSError, ValueError) as exc:
            raise StoreError(f"{config}: unreadable datastore settings ({exc})") from None
        store_format = settings.get("format")
        if store_format not in READABLE_FORMATS:
            raise StoreError(f"{config}: unsupported datastore format {store_format!r}")
        chunk_size = settings.get("chunk_size")
        if not isinstance(chunk_size, int) or chunk_size <= 0 or chunk_size % 4096:
            raise StoreError(f"{config}: invalid chunk_size {chunk_size!r}")
        fingerprint = settings.get("key")
        if (store_format == ENCRYPTED_FORMAT) != isinstance(fingerprint, str):
            raise StoreError(f"{config}: format {store_format} with key {fingerprint!r}")
        return cls(root, chunk_size, store_format, fingerprint)

    @classmethod
    def open_or_create(cls, root: os.PathLike | str, chunk_size: int = DEFAULT_CHUNK_SIZE,
                       encrypt_with: Optional[str] = None) -> "Datastore":
        """The datastore at `root`, made if absent: encrypted with the key of fingerprint
        `encrypt_with` (held by the keyring) when one is named."""
        root = Path(root)
        if (root / CONFIG_NAME).exists():
            store = cls.open(root)
            if encrypt_with and store.fingerprint != encrypt_with:
                raise keyring.KeyNeeded(
                    f"{root} is encrypted with key {store.fingerprint}, not {encrypt_with}"
                    if store.fingerprint else
                    f"{root} is not encrypted: leave the key out, or name a new datastore "
                    "to encrypt")
            make_private(root)
            return store
        if chunk_size <= 0 or chunk_size % 4096:
            raise StoreError(f"chunk size must be a positive multiple of 4096, not {chunk_size}")
        settings = ({"format": ENCRYPTED_FORMAT, "chunk_size": chunk_size, "key": encrypt_with}
                    if encrypt_with else {"format": FORMAT, "chunk_size": chunk_size})
        with translated(StoreError, f"cannot create datastore {root}"):
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            make_private(root)
            for sub in ("chunks", "images", "jobs"):
                (root / sub).mkdir(exist_ok=True)
            write_atomically(root / CONFIG_NAME, json.dumps(settings).encode() + b"\n")
            fsync_dir(root)
        return cls(root, chunk_size, settings["format"], encrypt_with)

    @property
    def settings(self) -> dict:
        """What datastore.json holds (a copy keeps it)."""
        found = {"format": self.format, "chunk_size": self.chunk_size}
        return dict(found, key=self.fingerprint) if self.encrypted else found

    # -- encryption (docs/architecture.md, "Encrypted datastores") --------
    @property
    def encrypted(self) -> bool:
        return self.fingerprint is not None

    @property
    def sealer(self) -> Sealer:
        """The sealer of this store's key; KeyNeeded if this process does not hold it."""
        if self._sealer is None:
            self._sealer = keyring.sealer_for(self.fingerprint, self.root)
        return self._sealer

    def name(self, raw) -> str:
        """The name of a chunk holding `raw`: its SHA-256, or its keyed hash when encrypted."""
        return self.sealer.chunk_name(raw) if self.encrypted else codec.digest(raw)

    def name_of_pieces(self, pieces) -> str:
        return self.sealer.chunk_name_of(pieces) if self.encrypted else codec.sha256_of(pieces)

    def zero_name(self, length: int) -> str:
        """The name of a chunk of `length` zero bytes."""
        if not self.encrypted:
            return codec.zero_digest(length)
        if length not in self._zero_names:
            self._zero_names[length] = self.sealer.chunk_name(codec.zeros(length))
        return self._zero_names[length]

    def chunk_file(self, digest: str, frame: bytes) -> bytes:
        """What a chunk's file holds: its frame, sealed when encrypted."""
        return self.sealer.seal(frame, f"chunk {digest}") if self.encrypted else frame

    def frame_of(self, digest: str, data) -> bytes | memoryview:
        """The frame in a chunk's file; Tampered if a sealed one fails its check."""
        return self.sealer.open(data, f"chunk {digest}") if self.encrypted else data

    def stored_size(self, frame_size: int) -> int:
        return frame_size + SEAL_OVERHEAD if self.encrypted else frame_size

    def image_file(self, image_dir: Path, name: str, data: bytes) -> bytes:
        """What `name` of the image in `image_dir` holds on disk: `data`, sealed when the
        store is encrypted (but for the files that must be read without the key)."""
        if not self.encrypted or name in PLAIN_IMAGE_FILES:
            return data
        return self.sealer.seal(data, image_context(image_dir, name))

    def read_image_file(self, image_dir: Path, name: str, *,
                        placed: Optional[Path] = None) -> bytes:
        """The contents of `name` in the image in `image_dir`, opened when sealed (for the
        image at `placed`, by default `image_dir`).

        OSError as the file system raised it; Tampered if a sealed file fails its check.
        """
        data = (image_dir / name).read_bytes()
        if not self.encrypted or name in PLAIN_IMAGE_FILES:
            return data
        return self.sealer.open(data, image_context(placed or image_dir, name))

    @property
    def deltas(self) -> bool:
        """Whether changed chunks may be stored as deltas against a previous image's."""
        return self.format >= 2 and self.chunk_size <= MAX_BASE_SIZE

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
        except OSError as exc:
            raise StoreError(f"cannot mark chunk {digest} as in use: {describe(exc)}") from None

    def write_chunk(self, digest: str, frame: bytes) -> int:
        """Store `frame` as chunk `digest`, replacing any file there; the bytes stored."""
        path = self.chunk_path(digest)
        data = self.chunk_file(digest, frame)
        with translated(StoreError, f"cannot write chunk {digest[:16]}"):
            try:
                write_atomically(path, data)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(path, data)
        return len(data)

    def chunk_batch(self) -> "ChunkBatch":
        return ChunkBatch(self)

    def read_frame(self, digest: str) -> bytes:
        return self.frame_of(digest, self.read_chunk_file(digest))

    def read_chunk_file(self, digest: str) -> bytes:
        """A chunk's file as it is stored (sealed, in an encrypted store)."""
        path = self.chunk_path(digest)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ImageError(f"chunk {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read chunk {digest}: {exc.strerror}") from None

    def read_frame_into(self, digest: str, buffer: bytearray) -> memoryview:
        """The stored frame of `digest`, read into `buffer` if it fits (a fresh one if not)."""
        path = self.chunk_path(digest)
        try:
            with open(path, "rb", buffering=0) as handle:
                size = os.fstat(handle.fileno()).st_size
                target = memoryview(buffer if len(buffer) >= size else bytearray(size))[:size]
                filled = 0
                while filled < size and (count := handle.readinto(target[filled:])):
                    filled += count
        except FileNotFoundError:
            raise ImageError(f"chunk {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read chunk {digest}: {exc.strerror}") from None
        return self.frame_of(digest, target[:filled])

    def stored_base(self, digest: str) -> Optional[str]:
        """The base stored chunk `digest` is a delta against, or None; read from its first bytes.

        In an encrypted store they are decrypted unchecked: the whole file's check waits
        for whoever reads the chunk, and a base named wrongly fails that read.
        """
        try:
            with open(self.chunk_path(digest), "rb") as handle:
                head = handle.read((SEAL_OVERHEAD if self.encrypted else 0)
                                   + codec.DELTA_HEADER_SIZE)
        except FileNotFoundError:
            raise ImageError(f"chunk {digest} is missing from {self.root}") from None
        except OSError as exc:
            raise StoreError(f"cannot read chunk {digest}: {describe(exc)}") from None
        return codec.delta_base(self.sealer.peek(head) if self.encrypted else head)

    def quarantine(self, digest: str) -> Path:
        """Set a corrupt chunk aside so the next backup of that data stores it afresh."""
        path = self.chunk_path(digest)
        bad = path.with_name(path.name + BAD_SUFFIX)
        with translated(StoreError, f"cannot set aside corrupt chunk {digest}"):
            os.replace(path, bad)
        return bad

    def quarantined(self, digest: str) -> bool:
        path = self.chunk_path(digest)
        return path.with_name(path.name + BAD_SUFFIX).exists()

    def chunk_dirs(self) -> list[Path]:
        with translated(StoreError, f"cannot list the chunk folders of {self.root}"):
            return sorted(p for p in self.chunks_dir.iterdir() if p.is_dir())

    # -- images ----------------------------------------------------------
    def disk_ids(self) -> list[str]:
        if not self.images_dir.is_dir():
            return []
        with translated(StoreError, f"cannot list the images of {self.root}"):
            return sorted(p.name for p in self.images_dir.iterdir()
                          if p.is_dir() and not p.name.startswith("."))

    def image_dirs(self, disk_id: Optional[str] = None) -> list[Path]:
        disks = [disk_id] if disk_id else self.disk_ids()
        found = []
        with translated(StoreError, f"cannot list the images of {self.root}"):
            for disk in disks:
                folder = self.images_dir / disk
                if folder.is_dir():
                    found.extend(sorted(p for p in folder.iterdir()
                                        if p.is_dir() and not p.name.startswith(".")))
        return found

    # -- running jobs (for garbage collection and prune) -----------------
    def register(self, kind: str, what: str, *, images: Sequence[str] = (),
                 progress: Optional[Progress] = None) -> contextlib.AbstractContextManager:
        """Register a running job here for as long as a `with` block runs.

        `kind` is what the job does (backup and import write chunks no image
        references yet; restore, export, verify, recompress and mount read
        `images`, each named "<disk-id>/<stamp>"); `what` describes it to
        people. A heartbeat that fails stops the job through `progress`.
        A read-only datastore takes no registration: nothing here changes it.
        """
        if self.read_only:
            return contextlib.nullcontext()
        return Registration(self, kind, what, tuple(images), progress)

    @functools.cached_property
    def read_only(self) -> bool:
        """Mounted read-only (a remote through rclone, a disk mounted ro): only read here."""
        try:
            return bool(os.statvfs(self.root).f_flag & os.ST_RDONLY)
        except OSError:
            return False

    def clock(self) -> float:
        """Now, by the clock that stamps files here: the file server's, over NFS.

        Heartbeat ages are measured with it, so hosts whose clocks disagree
        still agree on which jobs are alive.
        """
        probe = self.jobs_dir / CLOCK_NAME
        with translated(StoreError, f"cannot read the datastore's clock in {self.root}"):
            self.jobs_dir.mkdir(exist_ok=True)
            with open(probe, "ab") as handle:
                os.utime(handle.fileno())
                return os.fstat(handle.fileno()).st_mtime

    def running_jobs(self) -> list[Job]:
        """Every job registered here whose heartbeat is fresh, on any host, in any container."""
        return [job for _, job, age in self._registrations() if age <= JOB_STALE]

    def forget_dead_jobs(self) -> int:
        """Delete the tokens of jobs whose heartbeat is stale; how many went.

        A job that comes back after that (a host resumed from suspend) finds
        its token gone and fails, which is right: it was taken for dead.
        """
        dead = [token for token, _, age in self._registrations() if age > JOB_STALE]
        for token in dead:
            with translated(StoreError, f"cannot remove the dead job {token.name}"), \
                    contextlib.suppress(FileNotFoundError):
                token.unlink()
        return len(dead)

    @contextlib.contextmanager
    def collecting(self) -> Iterator[None]:
        """Garbage collection's hold on the store: alone, and with no prune midway."""
        with self._lock(GC_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB,
                        f"another garbage collection is running on {self.root}"):
            # Prunes take seconds: wait for the running ones to end.
            with self._lock(PRUNE_LOCK, fcntl.LOCK_EX):
                yield

    @contextlib.contextmanager
    def pruning(self) -> Iterator[None]:
        """A prune's hold on the store: other prunes may run, garbage collection may not."""
        with self._lock(PRUNE_LOCK, fcntl.LOCK_SH | fcntl.LOCK_NB,
                        f"garbage collection is running on {self.root}: prune once it is done"):
            yield

    @contextlib.contextmanager
    def rehoming(self) -> Iterator[None]:
        """Moving images between disk folders: alone, as a prune (no garbage collection,
        which must never list an image in neither folder)."""
        with self._lock(REHOME_LOCK, fcntl.LOCK_EX | fcntl.LOCK_NB,
                        f"images of {self.root} are being moved by another run"), self.pruning():
            yield

    @contextlib.contextmanager
    def _lock(self, name: str, operation: int, busy: str = "") -> Iterator[None]:
        """flock `name` in the store root; `busy` is the error when LOCK_NB finds it taken.

        flock() over NFS becomes a lock on the server (NLM or NFSv4), held
        across hosts; "a+" opens for reading and writing, as a lock there needs.
        """
        with translated(StoreError, f"cannot lock the datastore {self.root}"):
            handle = open(self.root / name, "a+")
        try:
            try:
                fcntl.flock(handle, operation)
            except BlockingIOError:
                raise StoreError(busy) from None
            except OSError as exc:
                raise StoreError(f"cannot lock the datastore {self.root}: {reason(exc)}") from None
            yield
        finally:
            handle.close()

    def _registrations(self) -> list[tuple[Path, Job, float]]:
        """(token, job, heartbeat age in seconds) of every token here, dead or alive."""
        now = self.clock()
        found = []
        with translated(StoreError, f"cannot read the jobs registered in {self.root}"):
            with os.scandir(self.jobs_dir) as entries:
                tokens = [Path(entry.path) for entry in entries if not entry.name.startswith(".")]
            for token in tokens:
                try:
                    # Opening revalidates NFS's cached attributes (close-to-open), so
                    # this mtime is the job's last heartbeat, not a cached older one.
                    with open(token, "rb") as handle:
                        beat = os.fstat(handle.fileno()).st_mtime
                        text = handle.read()
                except FileNotFoundError:
                    continue  # that job ended meanwhile
                found.append((token, Job.parse(text, token.name), now - beat))
        return found


@dataclasses.dataclass(frozen=True)
class Job:
    """A running job, as its token in the datastore describes it."""

    kind: str
    what: str
    host: str
    pid: int  # in its own host's or container's PID namespace: for people, never for liveness
    started: float  # UNIX time, by its host's clock
    images: tuple[str, ...] = ()  # "<disk-id>/<stamp>" of each image it reads

    @property
    def writes(self) -> bool:
        """May it hold chunks no image references yet? Any kind not known to only read may."""
        return self.kind not in READING_KINDS

    def reads(self, image: str) -> bool:
        return image in self.images

    def as_dict(self) -> dict:
        return dict(dataclasses.asdict(self), images=list(self.images))

    @classmethod
    def parse(cls, text: bytes, name: str) -> "Job":
        try:
            record = json.loads(text)
            return cls(str(record["kind"]), str(record["what"]), str(record["host"]),
                       int(record["pid"]), float(record["started"]),
                       tuple(str(image) for image in record.get("images", ())))
        except (ValueError, KeyError, TypeError, AttributeError):
            # Nothing says what it may need: it holds back every chunk (a writer
            # that started at the epoch) until its heartbeat goes stale.
            return cls(UNKNOWN_KIND, f"an unreadable registration ({name})", "?", 0, 0.0)


class Registration:
    """A job's token in the datastore, kept fresh by a heartbeat thread while the job runs.

    Liveness is the token's mtime alone, never a process id: a pid means
    nothing across hosts, users or PID namespaces. If a heartbeat cannot be
    written (the store is full or read-only, the token was deleted as dead)
    or the job went so long without one that others may have taken it for
    dead, the job fails: `progress.abort` stops it at its next poll between
    chunks, and leaving the `with` block raises the same error otherwise.
    """

    def __init__(self, store: Datastore, kind: str, what: str, images: tuple[str, ...],
                 progress: Optional[Progress]) -> None:
        self.store = store
        self.job = Job(kind, what, host_name(), os.getpid(), time.time(), images)
        name = f"{safe_id(self.job.host)}-{self.job.pid}-{secrets.token_hex(4)}"
        self.token = store.jobs_dir / name
        self.error: Optional[StoreError] = None
        self._progress = progress
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)

    def __enter__(self) -> "Registration":
        with translated(StoreError, f"cannot register {self.job.what} in {self.store.root}"):
            self.store.jobs_dir.mkdir(exist_ok=True)
            write_atomically(self.token, json.dumps(self.job.as_dict()).encode() + b"\n")
        self._beating.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._stopped.set()
        self._beating.join()
        try:
            self.token.unlink()
        except FileNotFoundError:
            self._lose("its token was removed")
        except OSError:
            pass  # left behind, it goes stale and the next garbage collection removes it
        if error is None and self.error is not None:
            raise self.error

    def _beat(self) -> None:
        last = _uptime()
        while not self._stopped.wait(JOB_HEARTBEAT):
            silent = _uptime() - last
            if silent > JOB_LAPSE:
                return self._lose(f"no heartbeat for {silent:.0f} s")
            try:
                os.utime(self.token)
            except OSError as exc:
                return self._lose(reason(exc))
            last = _uptime()

    def _lose(self, detail: str) -> None:
        if self.error is None:
            self.error = StoreError(f"{self.job.what} stopped: its heartbeat in {self.store.root} "
                                    f"failed ({detail})")
            if self._progress is not None:
                self._progress.abort(self.error)


def _uptime() -> float:
    """Seconds since boot, suspend included: a job asleep for an hour sees that hour."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


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
        self._pending: list[tuple[Path, Path, bool]] = []
        self._pending_bytes = 0
        self._lock = threading.Lock()

    def add(self, digest: str, frame: bytes, *, replace: bool = False) -> int:
        """Queue a chunk; unless `replace`, a file that lands under its name first is kept.
        Returns the bytes its file holds.

        Two backups may store the same new chunk at once, each its own way (whole,
        or as a delta); whichever lands first stays, so a chunk file that an
        image may already use as a base is never swapped for a delta.
        """
        return self.add_file(digest, self.store.chunk_file(digest, frame), replace=replace)

    def add_file(self, digest: str, data: bytes, *, replace: bool = False) -> int:
        """`add` a chunk's file as it is stored (sealed already, in an encrypted store)."""
        path = self.store.chunk_path(digest)
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
        with translated(StoreError, f"cannot write chunk {digest[:16]}"):
            try:
                try:
                    _write_and_start_writeback(tmp, data)
                except FileNotFoundError:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    _write_and_start_writeback(tmp, data)
            except BaseException:
                # Also when the retry in a new folder fails: no partial file stays behind.
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
        with self._lock:
            self._pending.append((tmp, path, replace))
            self._pending_bytes += len(data)
        return len(data)

    def due(self) -> bool:
        return self._pending_bytes >= self.flush_bytes

    def flush(self) -> None:
        with self._lock:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        if not batch:
            return
        with translated(StoreError, "cannot store chunks"):
            syncfs(self.store.chunks_dir)
            for tmp, path, replace in batch:
                if replace or not path.exists():
                    os.replace(tmp, path)
                else:
                    os.unlink(tmp)
            for folder in {path.parent for _, path, _ in batch}:
                fsync_dir(folder)

    def discard(self) -> None:
        with self._lock:
            batch, self._pending, self._pending_bytes = self._pending, [], 0
        for tmp, _, _ in batch:
            with contextlib.suppress(OSError):
                tmp.unlink()


def make_private(root: Path) -> None:
    """A datastore holds whole disks (every password hash, every key on them): only the user
    who writes it may enter it. Best effort: a network filesystem may map modes its own way
    (NFS with root squashing refuses the change), and then its export decides."""
    try:
        mode = stat.S_IMODE(root.stat().st_mode)
        if mode & 0o077:
            root.chmod(mode & 0o700)
    except OSError:
        pass
