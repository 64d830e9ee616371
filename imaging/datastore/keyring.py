"""The keys this process holds, found by fingerprint when an encrypted datastore needs one.

A key enters by `hold` (the command line's `--key FILE`) or, the first time a store
needs one, from the file IMAGING_KEY_FILE names (how a worker's service gets it), its
passphrase from IMAGING_PASSPHRASE. Nothing that only lists, syncs, prunes or
collects an encrypted store asks for its key (docs/architecture.md, "Encrypted
datastores").
"""
from __future__ import annotations

import os
import threading

from ..base.errors import BadKey
from . import keys
from .sealing import Sealer

KEY_FILE_VARIABLE = "IMAGING_KEY_FILE"
PASSPHRASE_VARIABLE = "IMAGING_PASSPHRASE"

_held: dict[str, Sealer] = {}
_lock = threading.Lock()


class KeyNeeded(BadKey):
    """An encrypted datastore was to be read or written without its key."""

    def __init__(self, message: str, where: object = None, fingerprint: str = "",
                 given: str = "") -> None:
        super().__init__(message)
        self.where, self.fingerprint, self.given = where, fingerprint, given


def hold(key: keys.Key) -> Sealer:
    with _lock:
        return _held.setdefault(key.fingerprint, Sealer(key))


def load(path: os.PathLike | str, passphrase: str | None = None) -> keys.Key:
    """The key in file `path`, held from now on."""
    key = keys.load(path, passphrase if passphrase is not None
                    else os.environ.get(PASSPHRASE_VARIABLE))
    hold(key)
    return key


def from_environment() -> keys.Key | None:
    """The key IMAGING_KEY_FILE names, held; None when it names none."""
    path = os.environ.get(KEY_FILE_VARIABLE)
    return load(path) if path else None


def sealer_for(fingerprint: str, where: object) -> Sealer:
    """The sealer of the key named `fingerprint`; KeyNeeded, saying which key, without it."""
    with _lock:
        found = _held.get(fingerprint)
    if found is None and fingerprint not in _held:
        from_environment()
        found = _held.get(fingerprint)
    if found is not None:
        return found
    given = f"; the key given is {', '.join(sorted(_held))}" if _held else ""
    raise KeyNeeded(f"{where} is encrypted with key {fingerprint}, which this process does not "
                    f"hold (a worker reads it from the file {KEY_FILE_VARIABLE} names){given}",
                    where, fingerprint, given)


def forget() -> None:
    """Drop every key held (tests, and a worker between jobs of different keys' stores)."""
    with _lock:
        _held.clear()
