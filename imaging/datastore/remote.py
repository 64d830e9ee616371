"""A datastore at an rclone remote, reached file by file (docs/architecture.md, "Remote
datastores").

There is no lock and no rename at a remote (an S3 bucket has neither), so the jobs that
change one take turns through tokens in its `jobs/` folder, as a local store's jobs do,
written and listed with rclone: each job uploads its token, then lists the others. Of two
jobs that exclude each other, whichever lists second sees the first; if both see each
other, both stop, and neither has changed anything yet. A sync into the remote (a writer),
a prune and a garbage collection (which deletes only while no writer or prune runs) are
such jobs; a reader of an image registers, and prune spares that image.

Liveness is the token's modification time, renewed every REMOTE_HEARTBEAT by uploading it
again, against the lister's clock: REMOTE_STALE is long enough for minutes of clock skew
between the hosts and the remote.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import secrets
import tempfile
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

from ..base import rclone, tools
from ..base.errors import ImageError, StoreError
from ..base.progress import Progress
from ..base.rclone import shown
from ..disks.inventory import host_name, safe_id
from .image import protection_mark
from .manifest import NAME as MANIFEST_NAME
from .store import CONFIG_NAME, PROTECTED_NAME, Job

JOBS_FOLDER = "jobs"
REMOTE_HEARTBEAT = 60.0
REMOTE_STALE = 900.0
# Kinds of registration at a remote that deletes.
PRUNING = "prune"
COLLECTING = "gc"


class RemoteStore:
    """`remote` is what rclone takes (a configured `name:path` or a connection string)."""

    def __init__(self, remote: str, *, options: Sequence[str] = (),
                 cancelled=None) -> None:
        self.remote = remote
        self.name = shown(rclone.PREFIX + remote)
        self.options = list(options)
        self.cancelled = cancelled

    def path(self, relative: str) -> str:
        return rclone.joined(self.remote, relative)

    def run(self, command: str, *arguments: str, failure: Optional[str] = None,
            input: Optional[bytes] = None, options: Optional[Sequence[str]] = None):
        return rclone.run(command, *arguments, options=self.options if options is None
                          else options, failure=failure, input=input, cancelled=self.cancelled)

    def listing(self, folder: Optional[str] = None, *, hidden: bool = False) -> dict[str, int]:
        """Each file under `folder` there (the whole remote if None), by its path below the
        remote, with its size; hidden ones (a name starting with a dot) only if `hidden`.
        The first contact: a remote nobody
        answers for fails at once, not after rclone's retries (transfers keep them)."""
        done = self.run("lsf", self.path(folder) if folder else self.remote, "-R",
                        "--files-only", "--format", "ps", "--separator", "\t",
                        *(() if folder else ("--retries", "1", "--low-level-retries", "1")))
        if done.returncode == rclone.NO_DIRECTORY:
            return {}  # not there yet: nothing under it
        if done.returncode != 0:
            raise StoreError(f"cannot {'list ' + folder + ' at' if folder else 'reach'} "
                             f"{self.name}: {shown(tools.complaint(done))}")
        sizes = {}
        for line in done.stdout.splitlines():
            path, _, size = line.rpartition("\t")
            if path and size.isdigit() and (hidden or not path.startswith(".")
                                            and "/." not in path):
                sizes[f"{folder}/{path}" if folder else path] = int(size)
        return sizes

    def check_datastore(self) -> None:
        """That a datastore is there (the first contact, failing at once if nobody answers)."""
        done = self.run("lsf", self.remote, "--files-only", "--retries", "1",
                        "--low-level-retries", "1", options=())
        if done.returncode not in (0, rclone.NO_DIRECTORY):
            raise StoreError(f"cannot reach {self.name}: {shown(tools.complaint(done))}")
        if CONFIG_NAME not in done.stdout.splitlines():
            raise StoreError(f"{self.name}: not a datastore (no {CONFIG_NAME})")

    def move(self, relative: str, to: str) -> None:
        """Within the remote: a server-side move where the backend has one."""
        self.run("moveto", self.path(relative), self.path(to),
                 failure=f"cannot move {relative} at {self.name}")

    def write(self, relative: str, data: bytes, options: Optional[Sequence[str]] = None) -> None:
        self.run("rcat", self.path(relative), input=data, options=options,
                 failure=f"cannot write {relative} at {self.name}")

    def delete_file(self, relative: str) -> None:
        self.run("deletefile", self.path(relative),
                 failure=f"cannot delete {relative} at {self.name}")

    def delete(self, relatives: Iterable[str]) -> None:
        """The files named (below the remote), in one rclone run."""
        with self.file_list(relatives) as listing:
            self.run("delete", self.remote, "--files-from", listing,
                     failure=f"cannot delete files at {self.name}")

    def purge(self, relative: str) -> None:
        """The folder `relative` and all below it."""
        self.run("purge", self.path(relative),
                 failure=f"cannot delete {relative} at {self.name}")

    def remove_empty_folders(self, relative: str) -> None:
        self.run("rmdirs", self.path(relative), "--leave-root",
                 failure=f"cannot remove the empty folders of {relative} at {self.name}")

    @contextlib.contextmanager
    def file_list(self, names: Iterable[str]) -> Iterator[str]:
        """A file naming `names`, one a line, for rclone's --files-from."""
        with tempfile.NamedTemporaryFile("w", prefix="imaging-remote-", suffix=".txt") as listing:
            listing.write("".join(f"{name}\n" for name in names))
            listing.flush()
            yield listing.name

    # -- an image's protection ---------------------------------------------
    def protect(self, image: str, note: str, now: dt.datetime) -> None:
        """Protect the image at `image` (images/DISK/STAMP): prune there keeps it."""
        if f"{image}/{MANIFEST_NAME}" not in self.listing(image):
            raise ImageError(f"{self.name}/{image}: not an image (no {MANIFEST_NAME})")
        self.write(f"{image}/{PROTECTED_NAME}", protection_mark(note, now))

    def unprotect(self, image: str) -> bool:
        """Whether the image was protected."""
        if f"{image}/{PROTECTED_NAME}" not in self.listing(image):
            return False
        self.delete_file(f"{image}/{PROTECTED_NAME}")
        return True

    # -- running jobs -------------------------------------------------------
    def register(self, kind: str, what: str, *, images: Sequence[str] = (),
                 progress: Optional[Progress] = None,
                 excludes: Callable[[Job], bool] = lambda job: False) -> "RemoteRegistration":
        """A token here while a `with` block runs. The block does not begin while a job
        that `excludes` names runs here (a StoreError saying which)."""
        return RemoteRegistration(self, Job(kind, what, host_name(), os.getpid(), time.time(),
                                            tuple(images)), progress, excludes)

    def registrations(self) -> list[tuple[str, Job, float]]:
        """(token, job, age of its last heartbeat in seconds) of every token here."""
        done = self.run("lsjson", self.path(JOBS_FOLDER), "--files-only", options=())
        if done.returncode == rclone.NO_DIRECTORY:
            return []
        if done.returncode != 0:
            raise StoreError(f"cannot read the jobs registered at {self.name}: "
                             f"{shown(tools.complaint(done))}")
        try:
            entries = [(str(entry["Path"]), _moment(str(entry["ModTime"])))
                       for entry in json.loads(done.stdout)]
        except (ValueError, KeyError, TypeError):
            raise StoreError(f"cannot read the jobs registered at {self.name}: rclone's "
                             "listing is not what it should be") from None
        now = time.time()
        found = []
        for token, beat in entries:
            if token.startswith("."):
                continue
            text = self.run("cat", self.path(f"{JOBS_FOLDER}/{token}"), options=())
            if text.returncode != 0:
                continue  # that job ended meanwhile
            found.append((token, Job.parse(text.stdout.encode(), token), now - beat))
        return found

    def running_jobs(self, *, mine: str = "") -> list[Job]:
        """Every job registered here with a fresh heartbeat, but the token `mine`."""
        return [job for token, job, age in self.registrations()
                if age <= REMOTE_STALE and token != mine]

    def forget_dead_jobs(self) -> int:
        dead = [token for token, _, age in self.registrations() if age > REMOTE_STALE]
        if dead:
            self.delete(f"{JOBS_FOLDER}/{token}" for token in dead)
        return len(dead)


def is_collecting(job: Job) -> bool:
    return job.kind == COLLECTING


class RemoteRegistration:
    """A job's token at a remote, uploaded again every REMOTE_HEARTBEAT while it runs; a
    heartbeat that fails stops the job through `progress`, as a local one does."""

    def __init__(self, store: RemoteStore, job: Job, progress: Optional[Progress],
                 excludes: Callable[[Job], bool]) -> None:
        self.store, self.job, self.progress, self.excludes = store, job, progress, excludes
        self.token = f"{safe_id(job.host)}-{job.pid}-{secrets.token_hex(4)}"
        self.error: Optional[StoreError] = None
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="remote-heartbeat",
                                         daemon=True)

    def __enter__(self) -> "RemoteRegistration":
        self._upload()
        try:
            self._check_alone()
        except BaseException:
            self._remove()
            raise
        self._beating.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self._stopped.set()
        self._beating.join()
        self._remove()
        if error is None and self.error is not None:
            raise self.error

    def _check_alone(self) -> None:
        for job in self.store.running_jobs(mine=self.token):
            if self.excludes(job):
                raise StoreError(f"{self.job.what} did not start: {job.what} runs at "
                                 f"{self.store.name} (on {job.host}): run it once that is done")

    def _upload(self) -> None:
        # No rate limit on a token: a heartbeat must not wait behind the chunks.
        self.store.write(f"{JOBS_FOLDER}/{self.token}",
                         json.dumps(self.job.as_dict()).encode() + b"\n", options=())

    def _remove(self) -> None:
        with contextlib.suppress(StoreError):  # left behind, it goes stale; gc removes it
            self.store.delete_file(f"{JOBS_FOLDER}/{self.token}")

    def _beat(self) -> None:
        while not self._stopped.wait(REMOTE_HEARTBEAT):
            try:
                self._upload()
            except StoreError as exc:
                self.error = StoreError(f"{self.job.what} stopped: its heartbeat at "
                                        f"{self.store.name} failed ({exc})")
                if self.progress is not None:
                    self.progress.abort(self.error)
                return


def split_image(remote: str) -> tuple[str, str]:
    """(the datastore, images/DISK/STAMP) of an image's remote path."""
    head, found, tail = remote.rpartition("images/")
    if not found or tail.strip("/").count("/") != 1:
        raise StoreError(f"{shown(rclone.PREFIX + remote)}: an image on a remote is "
                         "rclone:REMOTE/images/DISK/STAMP")
    root = head if head.endswith(":") else head.rstrip("/")
    return root, found + tail.strip("/")


def _moment(text: str) -> float:
    """UNIX time of rclone's RFC 3339 modification time (nanoseconds cut to micro)."""
    head, dot, rest = text.partition(".")
    if dot:
        digits = "".join(char for char in rest if char.isdigit())
        text = f"{head}.{digits[:6]}{rest[len(digits):]}"
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
