"""How many file sessions the web server runs at once: per user, and in all.

A file session is a folder listed, or a file or folder downloaded, from an image:
each mounts the image through a private FUSE mount and runs a filesystem's tools,
and a download holds its session until its last byte is sent (or the response is
closed without it). Past FILE_SESSIONS_PER_USER sessions of one user, or
FILE_SESSIONS in all, a request is refused at once (TooMany) rather than queued:
a queue would hold the request's thread and connection for as long as it waits.

The bound holds across the web server's processes, and a session ends with
whatever held it: each holds an exclusive flock on one slot file of the user's
and one of all, in a private folder under DATA_DIR, and the kernel drops a lock
when the last descriptor of its open file closes, which a process's death does:
a killed worker leaves no session behind, with no expiry to guess. flock rather
than fcntl's record locks: those belong to the process, so two threads of one
worker would share a slot, and closing either descriptor would drop both. The
descriptors are not inherited by the tools the engine starts, which would
otherwise keep a dead worker's slots. A session that is never ended (a response
dropped unclosed) ends when it is garbage-collected, as its files close.
"""
from __future__ import annotations

import fcntl
import io
import os
from pathlib import Path
from typing import Optional

from django.conf import settings

from .errors import Refused

SLOTS_FOLDER = "file-sessions"
# What a refusal's Retry-After says: a listing ends within a second or two.
RETRY_AFTER_SECONDS = 5


class TooMany(Refused):
    """Every slot of the user's, or of all, is taken; `for_user` says which."""

    def __init__(self, message: str, for_user: bool) -> None:
        super().__init__(message)
        self.for_user = for_user
        self.retry_after = RETRY_AFTER_SECONDS


class Session:
    """An admitted file session: ended by end() (more than once is fine), or by leaving a with."""

    def __init__(self, slots: list[io.FileIO]) -> None:
        self._slots = slots

    def end(self) -> None:
        for slot in self._slots:
            slot.close()  # FileIO.close: once only, also from two threads at once

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc_info) -> None:
        self.end()


def begin(user_id: int) -> Session:
    """A session of user `user_id`, or TooMany if they, or all, have as many as allowed."""
    try:
        folder = settings.DATA_DIR / SLOTS_FOLDER
        folder.mkdir(mode=0o700, exist_ok=True)
        mine = _take(folder, f"user-{user_id}", settings.FILE_SESSIONS_PER_USER)
        if mine is None:
            raise TooMany(f"You are already reading {settings.FILE_SESSIONS_PER_USER} folders or "
                          f"files of images at once, as many as one user may.", for_user=True)
        everyone = _take(folder, "all", settings.FILE_SESSIONS)
    except OSError as exc:  # out of descriptors, most likely: busy too
        raise TooMany(f"The server cannot count another reader of images' files now "
                      f"({exc.strerror}).", for_user=False) from None
    if everyone is None:
        mine.close()
        raise TooMany(f"The server is already reading {settings.FILE_SESSIONS} folders or files "
                      f"of images at once, as many as it allows.", for_user=False)
    return Session([everyone, mine])


def _take(folder: Path, prefix: str, count: int) -> Optional[io.FileIO]:
    """The first of slot files PREFIX-0 ... PREFIX-(count-1) no one holds, locked; or None."""
    for number in range(count):
        slot = io.FileIO(os.open(folder / f"{prefix}-{number}",
                                 os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), "r+")
        try:
            fcntl.flock(slot.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            slot.close()
            continue
        except BaseException:
            slot.close()
            raise
        return slot
    return None
