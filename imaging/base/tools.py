"""The system's tools, loop devices over byte ranges, and sizes as people write them.

Every external program the engine runs starts here. A program that is not
installed is one domain error naming the Debian package that ships it (see
errors.running, where OS errors become domain errors); a program that fails is
judged by its caller, or, given the words for it, is an error ending in the
last line the program printed. A program reads nothing unless it is given
input, so a tool that would prompt never waits on the terminal or on a pipe
of the web server.

Loop devices are attached by losetup and always detached when their block
ends, also when it raises. Sizes follow coreutils' `split -b`: K, M, G, T, P
(and KiB, MiB...) are powers of 1024, KB, MB, GB, TB, PB powers of 1000.
"""
from __future__ import annotations

import contextlib
import os
import re
import subprocess
import tempfile
import time
from typing import BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

from .errors import Cancelled, ImagingError, running

# How often a running tool's caller looks at its cancel poll, in seconds.
CANCEL_POLL = 0.05
_SIZE = re.compile(r"([0-9]+) *(?:([KMGTP])(i?B)?)?", re.IGNORECASE | re.ASCII)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def started(tool: str, package: str, arguments: Sequence[str], *,
            kind: type[ImagingError] = ImagingError, **popen) -> subprocess.Popen:
    """`tool` running with `popen`'s options, for a caller that streams through its pipes.

    `package` is the Debian package that ships it; a tool missing or that
    cannot start raises `kind` saying so.
    """
    with running(tool, package, kind):
        return subprocess.Popen([tool, *arguments], **popen)


# A boot test's throwaway overlays and the VM disks an export writes.
QEMU_IMG, QEMU_IMG_PACKAGE = "qemu-img", "qemu-utils"
# Seconds a terminated process has to end before it is killed.
STOP_GRACE = 5.0


@contextlib.contextmanager
def stopping(process: subprocess.Popen) -> Iterator[subprocess.Popen]:
    """The process, ended when the block ends: terminated, killed if it lingers."""
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_GRACE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(tool: str, package: str, arguments: Sequence[str], *,
        kind: type[ImagingError] = ImagingError, failure: Optional[str] = None,
        input: Optional[bytes] = None, text: bool = False, stdout=subprocess.PIPE,
        pass_fds: Iterable[int] = (), env: Optional[dict] = None,
        timeout: Optional[float] = None,
        cancelled: Optional[Callable[[], bool]] = None) -> subprocess.CompletedProcess:
    """Run `tool` to its end, what it prints captured (as bytes, or as text with `text`).

    With `failure` ("cannot read the partition table of /dev/sda"), an exit
    status other than 0 raises `kind` with those words and the tool's last
    line; without it, the caller reads the status. Standard input is
    /dev/null unless `input` is given. Past `timeout` seconds the tool is
    killed and `kind` raised; `cancelled` is asked every CANCEL_POLL seconds,
    and when it says so the tool is killed and Cancelled raised.
    """
    if cancelled is not None and cancelled():
        raise Cancelled()
    with _readable(input) as stdin:
        process = started(tool, package, arguments, kind=kind, stdin=stdin, stdout=stdout,
                          stderr=subprocess.PIPE, pass_fds=tuple(pass_fds), env=env, text=text,
                          errors="replace" if text else None)
    deadline = None if timeout is None else time.monotonic() + timeout
    with process:
        try:
            while True:
                wait = CANCEL_POLL if cancelled is not None else None
                if deadline is not None:
                    left = max(deadline - time.monotonic(), 0)
                    wait = left if wait is None else min(wait, left)
                try:
                    output, errors = process.communicate(timeout=wait)
                    break
                except subprocess.TimeoutExpired:
                    if cancelled is not None and cancelled():
                        raise Cancelled() from None
                    if deadline is not None and time.monotonic() >= deadline:
                        raise kind(f"{tool} did not finish within {timeout:g} s") from None
        except BaseException:
            process.kill()
            raise
    done = subprocess.CompletedProcess([tool, *arguments], process.returncode, output, errors)
    if failure is not None and done.returncode != 0:
        raise kind(f"{failure}: {complaint(done)}")
    return done


@contextlib.contextmanager
def _readable(input: Optional[bytes]) -> Iterator[int | BinaryIO]:
    """/dev/null, or a file holding `input`.

    Not a pipe: Popen.communicate cannot go on feeding one after a timeout
    (its retry refuses input, and without input it stops writing).
    """
    if input is None:
        yield subprocess.DEVNULL
        return
    with tempfile.TemporaryFile(prefix="imaging-input-") as feed:
        feed.write(input)
        feed.seek(0)
        yield feed


def last_line(*outputs: Optional[str | bytes]) -> str:
    """The last line holding more than blanks, stripped, of the first output that has one.

    "" when none has: the caller says what it knows instead.
    """
    for output in outputs:
        if isinstance(output, bytes):
            output = output.decode(errors="replace")
        for line in reversed((output or "").splitlines()):
            if line.strip():
                return line.strip()
    return ""


def complaint(done: subprocess.CompletedProcess) -> str:
    """What a finished tool last said, on stderr before stdout, or its exit status."""
    return last_line(done.stderr, done.stdout) or f"{done.args[0]} exited {done.returncode}"


# -- loop devices ----------------------------------------------------------------

def attach_loop(path: str | os.PathLike, offset: int = 0, size: Optional[int] = None, *,
                read_only: bool = False, kind: type[ImagingError] = ImagingError) -> str:
    """A free loop device attached to bytes offset..offset+size of `path` (to its end without
    `size`); `kind` says why not. Prefer loop_device, which detaches it."""
    arguments = ["--find", "--show", "--offset", str(offset),
                 *(["--sizelimit", str(size)] if size is not None else []),
                 *(["--read-only"] if read_only else []), os.fspath(path)]
    return run("losetup", "util-linux", arguments, kind=kind, text=True,
               failure=f"cannot attach a loop device to {os.fspath(path)}").stdout.strip()


def detach_loop(device: str) -> None:
    """Detach a loop device; failing leaves a device attached, which is this machine's
    problem rather than a source's or a target's, hence the plain ImagingError."""
    run("losetup", "util-linux", ["--detach", device], failure=f"cannot detach {device}")


@contextlib.contextmanager
def loop_device(path: str | os.PathLike, offset: int = 0, size: Optional[int] = None, *,
                read_only: bool = False,
                kind: type[ImagingError] = ImagingError) -> Iterator[str]:
    """A loop device over bytes offset..offset+size of `path` for the length of the block.

    Attaching is never cancelled: a losetup killed after attaching would leave
    a device nobody knows about.
    """
    device = attach_loop(path, offset, size, read_only=read_only, kind=kind)
    try:
        yield device
    finally:
        detach_loop(device)


# -- sizes -----------------------------------------------------------------------

def parse_size(text: str) -> int:
    """Bytes from "4096", "2G" or "700MiB" (powers of 1024) or "2GB" (powers of 1000)."""
    found = _SIZE.fullmatch(text.strip()) if isinstance(text, str) else None
    number = int(found.group(1)) if found else 0
    if number == 0:
        raise ImagingError(f"invalid size {text!r}: give a whole number of bytes above 0, alone "
                           "or with K, M, G, T or P (powers of 1024: 2G, 700MiB) or KB, MB, GB, "
                           "TB or PB (powers of 1000: 2GB)")
    unit, bytes_suffix = found.group(2), found.group(3)
    if unit is None:
        return number
    base = 1000 if bytes_suffix is not None and bytes_suffix.lower() == "b" else 1024
    return number * base ** _POWERS[unit.lower()]
