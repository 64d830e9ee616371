"""Shared helpers for the engine's tests: run the CLI, hash files, build small disks."""
from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import random
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# A page of the page cache, and the block restore writes with O_DIRECT.
BLOCK = 4096


def imaging(*args: object, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m imaging ARGS` and return the completed process (text mode)."""
    result = subprocess.run([sys.executable, "-m", "imaging", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"imaging {args} failed ({result.returncode}): {result.stderr}")
    return result


def sha256_of(path: os.PathLike | str, length: int | None = None) -> str:
    digest = hashlib.sha256()
    remaining = length
    with open(path, "rb") as handle:
        while remaining is None or remaining > 0:
            block = handle.read(4 * MiB if remaining is None else min(4 * MiB, remaining))
            if not block:
                break
            digest.update(block)
            if remaining is not None:
                remaining -= len(block)
    return digest.hexdigest()


def last_line(text: str) -> str:
    return text.strip().splitlines()[-1]


def one_error_line(result: subprocess.CompletedProcess) -> str:
    """Assert the command failed with exit 1 and exactly one stderr line; return it."""
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def text_like(size: int, seed: int) -> bytearray:
    """Bytes that compress about as well as a filesystem of text and programs, so a small
    edit makes a small delta."""
    rng = random.Random(seed)
    words = [bytes(rng.choice(b"abcdefghijklmnop") for _ in range(rng.randrange(3, 9)))
             for _ in range(800)]
    data = bytearray()
    while len(data) < size:
        data += b" ".join(rng.choices(words, k=4096)) + b"\n"
    return data[:size]


def write_random(path: Path, size: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(rng.randbytes(MiB))


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                       ctypes.c_int, ctypes.c_long]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


def cached_blocks(path) -> set[int]:
    """The file's pages that are in the page cache, as mincore(2) reports them (reads nothing)."""
    assert mmap.PAGESIZE == BLOCK
    size = os.path.getsize(path)
    pages = -(-size // BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        assert address != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
        try:
            resident = ctypes.create_string_buffer(pages)
            assert _libc.mincore(address, size, resident) == 0, os.strerror(ctypes.get_errno())
        finally:
            _libc.munmap(address, size)
    finally:
        os.close(fd)
    return {page for page in range(pages) if resident.raw[page] & 1}
