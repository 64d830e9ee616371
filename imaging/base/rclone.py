"""Debian's rclone: the one way the engine reaches a remote datastore (docs/architecture.md,
"Sync" and "Remote datastores").

A remote is `rclone:` and anything rclone takes as a remote path: a configured
`name:path`, or a connection string such as `:webdav,url='http://h:8080':store`. What a
connection string holds secret never shows in a message (`shown`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional, Sequence

from . import tools
from .errors import ImagingError, StoreError

PREFIX = "rclone:"
PACKAGE = "rclone"
# rclone's "directory not found" and "file not found" exit statuses.
NO_DIRECTORY = 3
NO_FILE = 4
# What a connection string may hold that nobody else should read: shown as ***.
SECRET_OPTION = re.compile(r"((?:^|,)[\w-]*(?:pass|key|token|secret|user|credential|grant|"
                           r"connection_string|header|auth|sas|account)[\w-]*=)"
                           r"('(?:[^']|'')*'|\"(?:[^\"]|\"\")*\"|[^,:]*)", re.IGNORECASE)
URL_USER = re.compile(r"(://)[^/@'\"]*@")
URL_QUERY = re.compile(r"(://[^?'\"\s]*\?)[^'\"\s,]*")
# How long a mount may take to appear: rclone reaches the remote first.
MOUNT_WAIT = 30.0
MOUNT_POLL = 0.05


def is_remote(place: object) -> bool:
    return str(place).startswith(PREFIX)


def remote_of(place: str) -> str:
    """What rclone takes, from `rclone:...`."""
    remote = place[len(PREFIX):]
    if not remote:
        raise StoreError("name the remote after rclone: (rclone:NAME:PATH)")
    if remote.startswith("-") or any(ord(char) < 32 for char in remote):
        # rclone would read a leading dash as one of its own options
        raise StoreError(f"{shown(place)} is no remote: it starts with - or holds a control "
                         "character")
    return remote


def shown(text: str) -> str:
    """`text` with what a remote's connection string holds secret (passwords, keys, tokens,
    users, a URL's user and password) as ***: for messages, results and registrations."""
    return URL_QUERY.sub(r"\1***", URL_USER.sub(r"\1***@", SECRET_OPTION.sub(r"\1***", text)))


def joined(remote: str, relative: str) -> str:
    """The remote path of `relative` below the remote folder `remote`."""
    return f"{remote}{relative}" if remote.endswith(":") else \
        f"{remote.rstrip('/')}/{relative}"


def run(command: str, *arguments: str, options: Sequence[str] = (),
        failure: Optional[str] = None, input: Optional[bytes] = None,
        cancelled: Optional[Callable[[], bool]] = None) -> subprocess.CompletedProcess:
    """`rclone COMMAND ARGUMENTS OPTIONS`, its output as text (unless `input` is given)."""
    try:
        return tools.run("rclone", PACKAGE, [command, *arguments, *options], kind=StoreError,
                         failure=failure, input=input, text=input is None, cancelled=cancelled)
    except StoreError as exc:  # rclone quotes the remote, secrets and all
        raise StoreError(shown(str(exc))) from None


@contextlib.contextmanager
def mounted(remote: str) -> Iterator[Path]:
    """The remote folder, mounted read-only by `rclone mount` in a private folder of this
    process's own (FUSE: no other user enters it) while the block runs."""
    folder = Path(tempfile.mkdtemp(prefix="imaging-remote-"))
    point = folder / "store"
    point.mkdir()
    errors = folder / "rclone.log"
    with open(errors, "wb") as log:
        process = tools.started("rclone", PACKAGE, ["mount", remote, str(point), "--read-only",
                                                    "--dir-cache-time", "5s"],
                                kind=StoreError, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=log)
    try:
        _wait_for_mount(point, process, errors, remote)
        try:
            yield point
        except ImagingError as exc:
            # Messages name the remote, not this private folder.
            if exc.args and isinstance(exc.args[0], str):
                exc.args = (exc.args[0].replace(str(point), shown(PREFIX + remote)),
                            *exc.args[1:])
            raise
    finally:
        if os.path.ismount(point):
            tools.run("fusermount3", "fuse3", ["-u", "-z", str(point)], kind=StoreError)
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


def _wait_for_mount(point: Path, process: subprocess.Popen, errors: Path, remote: str) -> None:
    deadline = time.monotonic() + MOUNT_WAIT
    while not os.path.ismount(point):
        if process.poll() is not None or time.monotonic() > deadline:
            problem = tools.last_line(errors.read_bytes()) or "it did not appear in time"
            raise StoreError(f"cannot mount {shown(PREFIX + remote)}: {shown(problem)}")
        time.sleep(MOUNT_POLL)
