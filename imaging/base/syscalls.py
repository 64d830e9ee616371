"""The Linux calls Python's os module does not offer (through ctypes), and a write to its end."""
from __future__ import annotations

import ctypes
import os
import signal
from pathlib import Path
from typing import Sequence

_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
_libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
_libc.signal.restype = ctypes.c_void_p
SYNC_FILE_RANGE_WRITE = 2


def syncfs(path: Path) -> None:
    """Flush every dirty page of the filesystem holding `path` in one call."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc.syncfs(fd) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code), str(path))
    finally:
        os.close(fd)


def pwrite_all(fd: int, views: Sequence[memoryview], offset: int) -> None:
    """Write the views one after the other from `offset`, however many calls it takes."""
    while views:
        written = os.pwritev(fd, views, offset)
        offset += written
        while views and written >= len(views[0]):
            written -= len(views[0])
            views = views[1:]
        if views and written:
            views = [views[0][written:], *views[1:]]


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range back now, without waiting for it.

    A restore that leaves a gigabyte dirty until its final fsync stalls in
    dirty-page throttling and then waits for all of it at once; starting each
    chunk's writeback as soon as it is written keeps the device busy all along.
    Only a hint: where the call is not supported, the final fsync does the work.
    """
    _libc.sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


def ignore_signal(number: int) -> None:
    """Ignore signal `number`, from any thread (Python's signal.signal: the main thread only)."""
    _libc.signal(number, int(signal.SIG_IGN))


def fsync_dir(path: os.PathLike | str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
