"""Shared helpers for the engine's tests: run the CLI, hash files, build small disks."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024


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


def write_random(path: Path, size: int, seed: int = 1) -> None:
    import random
    rng = random.Random(seed)
    with open(path, "wb") as handle:
        for _ in range(size // MiB):
            handle.write(rng.randbytes(MiB))
