"""Datastore keys (docs/architecture.md, "Keys").

A key is 32 random bytes, the master key. The keys an encrypted datastore uses (encryption,
MAC, chunk ids) and the key's fingerprint are derived from it with HKDF-Expand (SHA-256,
one block, an info string per purpose), which a shell can compute with openssl alone:
`printf 'imaging encryption v1\\001' | openssl dgst -sha256 -mac HMAC -macopt hexkey:MASTER`.

The key file is JSON, created readable by its owner only and never overwritten by `create`.
With a passphrase the master key is sealed with AES-256-GCM under a key scrypt derives from
the passphrase; without one it lies in the file as hex. Either way the file names the
fingerprint, so a key can be told from another without its passphrase.

On paper and in `IMAGING_KEY`, a key is one line: `imaging-key-1-` and the master key's hex
in eight groups of eight, then a check group (the first four bytes of its SHA-256).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDFExpand
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..base.errors import BadKey, describe
from ..base.syscalls import fsync_dir

MASTER_SIZE = 32
FILE_FORMAT = 1
TEXT_PREFIX = "imaging-key-1-"
# scrypt's cost: 2^17 x 8 x 128 bytes = 128 MiB and about half a second here, once per run.
SCRYPT_N, SCRYPT_R, SCRYPT_P = 2 ** 17, 8, 1
SCRYPT_MAX_MEMORY = 256 * 1024 * 1024


@dataclass(frozen=True)
class Key:
    master: bytes

    def derived(self, purpose: str) -> bytes:
        """The 32-byte key for `purpose` ("encryption", "gmac", "chunk-id", "fingerprint")."""
        return HKDFExpand(hashes.SHA256(), 32, f"imaging {purpose} v1".encode()).derive(
            self.master)

    @property
    def fingerprint(self) -> str:
        digits = self.derived("fingerprint")[:8].hex()
        return "-".join(digits[i:i + 4] for i in range(0, len(digits), 4))

    def text(self) -> str:
        """The key as one line of text (what `key show` prints last, and IMAGING_KEY holds)."""
        digits = self.master.hex()
        groups = [digits[i:i + 8] for i in range(0, len(digits), 8)]
        return TEXT_PREFIX + "-".join([*groups, _check(self.master)])


def _check(master: bytes) -> str:
    return hashlib.sha256(master).digest()[:4].hex()


def from_text(text: str) -> Key:
    """The key a line of `key show` names; a typo is one clear line."""
    line = "".join(text.split()).lower()
    if not line.startswith(TEXT_PREFIX):
        raise BadKey(f"not an imaging key: it starts with {TEXT_PREFIX!r}")
    groups = line[len(TEXT_PREFIX):].split("-")
    digits = "".join(groups[:-1])
    if len(groups) != 9 or len(digits) != 2 * MASTER_SIZE or any(
            len(group) != 8 for group in groups):
        raise BadKey("not an imaging key: it holds nine groups of eight hex digits")
    try:
        master = bytes.fromhex(digits)
    except ValueError:
        raise BadKey("not an imaging key: only 0-9 and a-f may follow its prefix") from None
    if _check(master) != groups[-1]:
        raise BadKey("the key's check group does not match: a digit is mistyped")
    return Key(master)


def generate() -> Key:
    return Key(secrets.token_bytes(MASTER_SIZE))


def create(path: os.PathLike | str, passphrase: Optional[str] = None) -> Key:
    """A new key in a new file at `path` (never over an existing one)."""
    return save(path, generate(), passphrase)


def save(path: os.PathLike | str, key: Key, passphrase: Optional[str] = None) -> Key:
    """`key` in a new file at `path` (never over an existing one)."""
    _write(Path(path), _file_record(key, passphrase), replace=False)
    return key


def fingerprint_of(path: os.PathLike | str) -> str:
    """The fingerprint a key file names, without its passphrase."""
    return _read(Path(path))["fingerprint"]


def is_protected(path: os.PathLike | str) -> bool:
    return "sealed" in _read(Path(path))


def load(path: os.PathLike | str, passphrase: Optional[str] = None) -> Key:
    """The key in the file at `path`, opened with `passphrase` when it has one."""
    path = Path(path)
    record = _read(path)
    if "sealed" in record:
        if passphrase is None:
            raise BadKey(f"key file {path} is protected by a passphrase: give it "
                            "(IMAGING_PASSPHRASE)")
        try:
            sealed = bytes.fromhex(record["sealed"])
            salt = bytes.fromhex(record["scrypt"]["salt"])
            cost = record["scrypt"]
            wrapping = _scrypt(passphrase, salt, cost["n"], cost["r"], cost["p"])
            master = AESGCM(wrapping).decrypt(sealed[:12], sealed[12:], _associated(record))
        except InvalidTag:
            raise BadKey(f"wrong passphrase for key file {path}") from None
        except (KeyError, TypeError, ValueError):
            raise BadKey(f"key file {path} is damaged: its sealed key cannot be read") \
                from None
    else:
        try:
            master = bytes.fromhex(record["key"])
        except (KeyError, TypeError, ValueError):
            raise BadKey(f"key file {path} is damaged: it holds no key") from None
    key = Key(master)
    if len(master) != MASTER_SIZE or key.fingerprint != record["fingerprint"]:
        raise BadKey(f"key file {path} is damaged: its key does not match its fingerprint")
    return key


def change_passphrase(path: os.PathLike | str, old: Optional[str],
                      new: Optional[str]) -> Key:
    """Seal the key of `path` under `new` (None: no passphrase), replacing the file whole."""
    key = load(path, old)
    _write(Path(path), _file_record(key, new), replace=True)
    return key


def _file_record(key: Key, passphrase: Optional[str]) -> dict:
    record = {"imaging_key": FILE_FORMAT, "fingerprint": key.fingerprint,
              "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    if passphrase is None:
        return {**record, "key": key.master.hex()}
    if not passphrase:
        raise BadKey("an empty passphrase protects nothing: give none, or a real one")
    salt, nonce = secrets.token_bytes(16), secrets.token_bytes(12)
    record["scrypt"] = {"n": SCRYPT_N, "r": SCRYPT_R, "p": SCRYPT_P, "salt": salt.hex()}
    wrapping = _scrypt(passphrase, salt, SCRYPT_N, SCRYPT_R, SCRYPT_P)
    sealed = nonce + AESGCM(wrapping).encrypt(nonce, key.master, _associated(record))
    return {**record, "sealed": sealed.hex()}


def _associated(record: dict) -> bytes:
    """What the seal also vouches for: the file's format and the key's fingerprint."""
    return f"imaging key {record['imaging_key']} {record['fingerprint']}".encode()


def _scrypt(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    if not (isinstance(n, int) and 2 <= n <= 2 ** 20 and isinstance(r, int) and 1 <= r <= 32
            and isinstance(p, int) and 1 <= p <= 4 and 128 * n * r <= SCRYPT_MAX_MEMORY):
        raise ValueError("scrypt cost out of bounds")
    try:
        secret = passphrase.encode()
    except UnicodeEncodeError:
        raise BadKey("the passphrase is not text (UTF-8)") from None
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(secret)


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BadKey(f"key file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = describe(exc) if isinstance(exc, OSError) else "not text"
        raise BadKey(f"cannot read key file {path}: {reason}") from None
    try:
        record = json.loads(text)
    except ValueError:
        raise BadKey(f"{path} is not an imaging key file (not JSON)") from None
    if not isinstance(record, dict) or record.get("imaging_key") != FILE_FORMAT \
            or not isinstance(record.get("fingerprint"), str):
        raise BadKey(f"{path} is not an imaging key file of format {FILE_FORMAT}")
    return record


def _write(path: Path, record: dict, *, replace: bool) -> None:
    """The file complete or absent, readable by its owner only from its first byte."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(record, handle, indent=2)
            handle.write("\n")
            handle.flush()
            os.fsync(handle.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)  # fails if a key file is there: one key is never lost to another
        fsync_dir(path.parent)  # no data sealed under a key whose file a power cut undoes
    except FileExistsError:
        raise BadKey(f"key file {path} exists: a new key never replaces one") from None
    except OSError as exc:
        raise BadKey(f"cannot write key file {path}: {describe(exc)}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
