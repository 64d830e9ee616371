"""Reading a source disk: sizes from ioctls, large reads, and ddrescue-style recovery.

A chunk is read with one large buffered read. When that fails, the chunk is
read again with O_DIRECT (a buffered read of a block device fails a whole page
or readahead window): first in clusters, then the failing clusters sector by
sector, the way GNU ddrescue's trimming and scraping passes do. Sectors that
stay unreadable become zeros and are reported as bad ranges.
"""
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from dataclasses import dataclass
from typing import Callable, Optional

from ..base.errors import Cancelled, SourceError, describe

BLKGETSIZE64 = 0x80081272
BLKSSZGET = 0x1268
CLUSTER = 64 * 1024
# Errors that mean "this sector is unreadable" rather than "the device is gone".
MEDIA_ERRORS = {errno.EIO, errno.ENODATA, errno.EILSEQ, errno.EBADMSG}

Range = tuple[int, int]  # (offset, length) in bytes


def merge(ranges: list[Range]) -> list[Range]:
    """Sorted, with the ranges that overlap or touch joined."""
    merged: list[Range] = []
    for start, size in sorted(ranges):
        if merged and merged[-1][0] + merged[-1][1] >= start:
            last_start, last_size = merged[-1]
            merged[-1] = (last_start, max(last_start + last_size, start + size) - last_start)
        else:
            merged.append((start, size))
    return merged


def block_size_of(fd: int) -> tuple[int, int]:
    size = struct.unpack("Q", fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8))[0]
    sector = struct.unpack("i", fcntl.ioctl(fd, BLKSSZGET, b"\0" * 4))[0]
    return size, sector


@dataclass
class Source:
    path: str
    fd: int
    size: int
    sector_size: int
    is_block: bool
    _direct_fd: Optional[int] = None

    @classmethod
    def open(cls, path: str) -> "Source":
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise SourceError(f"cannot open source {path}: {describe(exc)}") from None
        try:
            info = os.fstat(fd)
            if stat.S_ISBLK(info.st_mode):
                size, sector = block_size_of(fd)
                is_block = True
            elif stat.S_ISREG(info.st_mode):
                size, sector, is_block = info.st_size, 512, False
            else:
                raise SourceError(f"{path}: not a block device or a regular file")
            if size == 0:
                raise SourceError(f"{path}: source is empty")
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        except OSError as exc:
            os.close(fd)
            raise SourceError(f"cannot use source {path}: {describe(exc)}") from None
        except SourceError:
            os.close(fd)
            raise
        return cls(path, fd, size, sector, is_block)

    def close(self) -> None:
        for fd in (self.fd, self._direct_fd):
            if fd is not None and fd >= 0:
                os.close(fd)
        self.fd = -1
        self._direct_fd = None

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def read(self, offset: int, length: int, wanted: Optional[list[Range]] = None,
             cancelled: Callable[[], bool] = lambda: False) -> tuple[bytearray, list[Range]]:
        """Read `length` bytes at `offset`; return the data and the unreadable ranges.

        `wanted` (absolute ranges inside the chunk) limits the read to those
        ranges; everything else stays zero without being read.
        """
        buf = bytearray(length)
        bad: list[Range] = []
        ranges = [(offset, length)] if wanted is None else wanted
        view = memoryview(buf)
        for start, size in ranges:
            part = view[start - offset:start - offset + size]
            if not self._read_fully(start, part):
                bad.extend(self._recover(start, part, cancelled))
        return buf, bad

    def _read_fully(self, offset: int, view: memoryview) -> bool:
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self.fd, [view[done:]], offset + done)
            except OSError as exc:
                if exc.errno in MEDIA_ERRORS:
                    return False
                raise SourceError(f"cannot read {self.path} at byte {offset + done}: "
                                  f"{describe(exc)}") from None
            if got == 0:
                raise SourceError(f"{self.path} ended at byte {offset + done}, "
                                  f"before its size of {self.size} bytes")
            done += got
        return True

    def _direct(self) -> int:
        if self._direct_fd is None:
            try:
                self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
            except OSError:
                # Filesystems without O_DIRECT (tmpfs): plain reads are then exact anyway.
                try:
                    self._direct_fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as exc:
                    raise SourceError(f"cannot reopen {self.path} to recover a failed read: "
                                      f"{describe(exc)}") from None
        return self._direct_fd

    def _recover(self, offset: int, view: memoryview,
                 cancelled: Callable[[], bool]) -> list[Range]:
        """Re-read a failed span in clusters, then sectors; zero what stays bad."""
        fd = self._direct()
        sector = self.sector_size
        # O_DIRECT needs an aligned buffer: an anonymous mmap is page aligned.
        aligned = mmap.mmap(-1, CLUSTER)
        bounce = memoryview(aligned)
        try:
            failed_clusters = []
            for start in range(0, len(view), CLUSTER):
                size = min(CLUSTER, len(view) - start)
                if not self._direct_read(fd, offset + start, bounce, view[start:start + size]):
                    failed_clusters.append((start, size))
            bad: list[Range] = []
            for start, size in failed_clusters:
                for pos in range(start, start + size, sector):
                    if cancelled():
                        raise Cancelled()
                    length = min(sector, start + size - pos)
                    if not self._direct_read(fd, offset + pos, bounce, view[pos:pos + length]):
                        view[pos:pos + length] = bytes(length)
                        if bad and bad[-1][0] + bad[-1][1] == offset + pos:
                            bad[-1] = (bad[-1][0], bad[-1][1] + length)
                        else:
                            bad.append((offset + pos, length))
        finally:
            bounce.release()
            aligned.close()
        return bad

    def _direct_read(self, fd: int, offset: int, bounce: memoryview, out: memoryview) -> bool:
        # O_DIRECT transfers whole sectors; the tail of an odd-sized file comes back short.
        aligned = -(-len(out) // self.sector_size) * self.sector_size
        try:
            got = os.preadv(fd, [bounce[:aligned]], offset)
        except OSError as exc:
            if exc.errno in MEDIA_ERRORS:
                return False
            raise SourceError(f"cannot read {self.path} at byte {offset}: {describe(exc)}") from None
        got = min(got, len(out))
        out[:got] = bounce[:got]
        return got == len(out)
