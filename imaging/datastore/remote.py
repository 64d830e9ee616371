"""A datastore at an rclone remote, reached file by file (docs/architecture.md, "Remote
datastores").

There is no lock at a remote (and no atomic rename on an S3 bucket), so the jobs that
change one take turns through tokens in its `jobs/` folder, in a local store's token
format, written and listed with rclone: each job uploads its token, then lists the
others. Of two jobs that exclude each other, whichever lists second sees the first; if
both see each other, both stop, and neither has changed anything yet. A sync into the
remote and a prune exclude each other and a gc; a gc runs beside readers only; a reader
of an image registers, and prune spares that image.

Liveness is the token's modification time, renewed every REMOTE_HEARTBEAT by uploading it
again, against the lister's clock: REMOTE_STALE is long enough for minutes of clock skew
between the hosts and the remote.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import re
import secrets
import tempfile
import threading
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

from ..base import rclone, tools
from ..base.errors import ImageError, ImagingError, StoreError
from ..base.progress import Progress
from ..base.rclone import shown
from ..disks.inventory import host_name, safe_id
from .image import protection_mark
from .manifest import NAME as MANIFEST_NAME
from .store import (COLLECTING, CONFIG_NAME, PROTECTED_NAME, PRUNING, SYNC_WRITING,
                    UNKNOWN_KIND, Job)

JOBS_FOLDER = "jobs"
REMOTE_HEARTBEAT = 60.0
REMOTE_STALE = 900.0
# A job whose heartbeat went this long without landing (a suspended host) may look dead.
REMOTE_LAPSE = REMOTE_STALE - 2 * REMOTE_HEARTBEAT
RFC3339 = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|z|[+-]\d\d:\d\d)$")


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
            input: Optional[bytes] = None, options: Optional[Sequence[str]] = None,
            cancellable: bool = True):
        return rclone.run(command, *arguments, options=self.options if options is None
                          else options, failure=failure, input=input,
                          cancelled=self.cancelled if cancellable else None)

    def listing(self, folder: Optional[str] = None, *, hidden: bool = False) -> dict[str, int]:
        """Each file under `folder` there (the whole remote if None), by its path below the
        remote, with its size; hidden ones (a name starting with a dot) only if `hidden`."""
        done = self.run("lsf", self.path(folder) if folder else self.remote, "-R",
                        "--files-only", "--format", "ps", "--separator", "\t")
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

    def top_files(self) -> set[str]:
        """The files at the top of the remote folder (none if it is not there yet): the
        first contact, failing at once if nobody answers."""
        done = self.run("lsf", self.remote, "--files-only", "--retries", "1",
                        "--low-level-retries", "1", options=())
        if done.returncode not in (0, rclone.NO_DIRECTORY):
            raise StoreError(f"cannot reach {self.name}: {shown(tools.complaint(done))}")
        return set(done.stdout.splitlines()) if done.returncode == 0 else set()

    def check_datastore(self) -> None:
        """That a datastore is there."""
        if CONFIG_NAME not in self.top_files():
            raise StoreError(f"{self.name}: not a datastore (no {CONFIG_NAME})")

    def move(self, relative: str, to: str) -> None:
        """Within the remote: a server-side move where the backend has one."""
        self.run("moveto", self.path(relative), self.path(to),
                 failure=f"cannot move {relative} at {self.name}")

    def write(self, relative: str, data: bytes, options: Optional[Sequence[str]] = None,
              cancellable: bool = True) -> None:
        self.run("rcat", self.path(relative), input=data, options=options,
                 cancellable=cancellable, failure=f"cannot write {relative} at {self.name}")

    def delete_file(self, relative: str, cancellable: bool = True) -> None:
        self.run("deletefile", self.path(relative), cancellable=cancellable,
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
                 excludes: Callable[[Job], bool] = lambda job: False,
                 required: bool = True) -> "RemoteRegistration":
        """A token here while a `with` block runs. The block does not begin while a job
        that `excludes` names runs here (a StoreError saying which). A registration not
        `required` (a reader's) that cannot be written lets the block run without it."""
        return RemoteRegistration(self, Job(kind, what, host_name(), os.getpid(), time.time(),
                                            tuple(images)), progress, excludes, required)

    def registrations(self, mine: str = "") -> list[tuple[str, Job, float]]:
        """(token, job, age of its last heartbeat in seconds) of every token here but
        `mine`."""
        done = self.run("lsjson", self.path(JOBS_FOLDER), "--files-only", options=(),
                        cancellable=False)
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
            if token.startswith(".") or token == mine:
                continue
            text = self.run("cat", self.path(f"{JOBS_FOLDER}/{token}"), options=(),
                            cancellable=False)
            if text.returncode in (rclone.NO_DIRECTORY, rclone.NO_FILE):
                continue  # that job ended meanwhile
            if text.returncode != 0:
                raise StoreError(f"cannot read the job {token} registered at {self.name}: "
                                 f"{shown(tools.complaint(text))}")
            # A token caught half rewritten parses as an unknown job: every job stops for it.
            found.append((token, Job.parse(text.stdout.encode(), token), now - beat))
        return found

    def running_jobs(self, *, mine: str = "") -> list[Job]:
        """Every job registered here with a fresh heartbeat, but the token `mine`."""
        return [job for _, job, age in self.registrations(mine) if age <= REMOTE_STALE]

    def forget_dead_jobs(self) -> int:
        dead = [token for token, _, age in self.registrations() if age > REMOTE_STALE]
        if dead:
            self.delete(f"{JOBS_FOLDER}/{token}" for token in dead)
        return len(dead)


def deletes(job: Job) -> bool:
    """Whether the job deletes there: a sync does not run beside it."""
    return job.kind in (PRUNING, COLLECTING, UNKNOWN_KIND)


def deletes_or_uploads(job: Job) -> bool:
    """Whether the job deletes or uploads images there: a prune does not run beside it."""
    return deletes(job) or job.kind == SYNC_WRITING


class RemoteRegistration:
    """A job's token at a remote, uploaded again every REMOTE_HEARTBEAT while it runs; a
    heartbeat that fails stops the job through `progress`, as a local one does."""

    def __init__(self, store: RemoteStore, job: Job, progress: Optional[Progress],
                 excludes: Callable[[Job], bool], required: bool) -> None:
        self.store, self.job, self.progress, self.excludes = store, job, progress, excludes
        self.required = required
        self.registered = False
        self.token = f"{safe_id(job.host)}-{job.pid}-{secrets.token_hex(4)}"
        self.error: Optional[StoreError] = None
        self._stopped = threading.Event()
        self._beating = threading.Thread(target=self._beat, name="remote-heartbeat",
                                         daemon=True)

    def __enter__(self) -> "RemoteRegistration":
        try:
            self._upload()
        except StoreError:
            if self.required:
                raise
            return self  # a reader with read-only credentials reads unregistered
        try:
            self._check_alone()
        except BaseException:
            self._remove()
            raise
        self.registered = True
        self._beating.start()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if not self.registered:
            return
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
        # No rate limit on a token (a heartbeat must not wait behind the chunks), and no
        # cancel: a cancelled job still takes its token away.
        self.store.write(f"{JOBS_FOLDER}/{self.token}",
                         json.dumps(self.job.as_dict()).encode() + b"\n", options=(),
                         cancellable=False)

    def _remove(self) -> None:
        with contextlib.suppress(StoreError):  # left behind, it goes stale; gc removes it
            self.store.delete_file(f"{JOBS_FOLDER}/{self.token}", cancellable=False)

    def _beat(self) -> None:
        last = time.monotonic()
        while not self._stopped.wait(REMOTE_HEARTBEAT):
            silent = time.monotonic() - last
            try:
                if silent > REMOTE_LAPSE:
                    raise StoreError(f"no heartbeat for {silent:.0f} s")
                self._upload()
            except ImagingError as exc:
                self.error = StoreError(f"{self.job.what} stopped: its heartbeat at "
                                        f"{self.store.name} failed ({exc})")
                if self.progress is not None:
                    self.progress.abort(self.error)
                return
            last = time.monotonic()


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
    found = RFC3339.match(text)
    if found is None:
        raise ValueError(text)
    head, fraction, zone = found.groups()
    return dt.datetime.fromisoformat(
        f"{head}{(fraction or '')[:7]}{'+00:00' if zone in 'Zz' else zone}").timestamp()
