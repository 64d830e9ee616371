"""Domain errors, and the one place where OS errors become them.

Every error the engine raises for bad input or a failing device is an
ImagingError whose str() is one line a user can act on; the CLI prints it and
exits 1. Anything else escaping is a bug and keeps its traceback.
"""
from __future__ import annotations

import contextlib
import errno


class ImagingError(Exception):
    """A failure explained in one line."""


class SourceError(ImagingError):
    """The disk or file to read cannot be used."""


class TargetError(ImagingError):
    """The disk or file to write is refused or failed."""


class StoreError(ImagingError):
    """The datastore is missing, full or damaged."""


class ImageError(ImagingError):
    """An image directory is missing, incomplete or corrupt."""


class BadKey(ImagingError):
    """A key file or key text that cannot be used: missing, damaged, or a wrong passphrase."""


class SourceInUse(SourceError):
    """The source is mounted read-write; imaging it anyway takes the caller's explicit force."""


class Cancelled(ImagingError):
    """The caller asked the job to stop."""

    def __init__(self, message: str = "cancelled") -> None:
        super().__init__(message)


_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOENT: "no such file or directory",
    errno.EIO: "input/output error",
    errno.EBUSY: "device or resource busy",
    errno.ENOTDIR: "not a directory",
    errno.EISDIR: "is a directory",
}


def reason(exc: OSError) -> str:
    """What went wrong, in lower case, without the file name."""
    return _REASONS.get(exc.errno) or (exc.strerror or str(exc)).lower()


def describe(exc: OSError) -> str:
    """The file the error is about, if it names one, and what went wrong."""
    return f"{exc.filename}: {reason(exc)}" if exc.filename else reason(exc)


@contextlib.contextmanager
def translated(kind: type[ImagingError], what: str):
    """Re-raise any OSError inside the block as `kind`, prefixed with `what`."""
    try:
        yield
    except ImagingError:
        raise
    except OSError as exc:
        raise kind(f"{what}: {describe(exc)}") from exc


@contextlib.contextmanager
def running(tool: str, package: str, kind: type[ImagingError] = SourceError):
    """Re-raise a failure to start the system program `tool` as `kind`.

    subprocess reports a missing program as FileNotFoundError, which would
    otherwise read like a missing disk or datastore file.
    """
    try:
        yield
    except FileNotFoundError:
        raise kind(f"{tool} not found: install the {package} package") from None
    except OSError as exc:
        raise kind(f"cannot run {tool}: {describe(exc)}") from exc


__all__ = [
    "ImagingError", "SourceError", "SourceInUse", "TargetError", "StoreError", "ImageError",
    "Cancelled", "translated", "running", "describe", "reason",
]
