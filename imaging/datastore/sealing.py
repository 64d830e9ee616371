"""Sealing: what an encrypted datastore writes in place of a chunk's frame or an image's file
(docs/architecture.md, "Sealed files").

Encrypt-then-MAC with AES-256-CTR and HMAC-SHA256 under the key's `encryption` and `mac`
subkeys, chosen because stock openssl opens it (`openssl enc` has no AEAD mode), so a
sealed image restores with a shell: a sealed file is MAGIC, a random 16-byte IV, the
ciphertext, and the HMAC of the context, a newline, MAGIC, IV and ciphertext. The context
names what the file is (`chunk NAME`, `index images/DISK/STAMP`...; one line), so a file
moved to another name fails its check like an edited one. A chunk's name is the HMAC of its raw bytes under
the `chunk-id` subkey: whoever holds the store alone cannot match it to known content,
and sees only which chunks images share.
"""
from __future__ import annotations

import hashlib
import hmac
import secrets

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from ..base.errors import ImageError
from .keys import Key

MAGIC = b"imgseal1"
IV_SIZE = 16
TAG_SIZE = 32
OVERHEAD = len(MAGIC) + IV_SIZE + TAG_SIZE


def looks_sealed(data: bytes | memoryview) -> bool:
    """Whether `data` has a sealed file's shape (its check needs the key)."""
    return len(data) >= OVERHEAD and data[:len(MAGIC)] == MAGIC


class Tampered(ImageError):
    """A sealed file whose check fails: changed, moved, or sealed under another key."""

    def __init__(self, context: str, problem: str) -> None:
        super().__init__(f"{context}: {problem}")
        self.problem = problem


class Sealer:
    def __init__(self, key: Key) -> None:
        self.fingerprint = key.fingerprint
        self._encryption = key.derived("encryption")
        self._mac = key.derived("mac")
        self._chunk_id = key.derived("chunk-id")

    def chunk_name(self, raw: bytes | memoryview) -> str:
        """The name of a chunk holding `raw`: keyed, so equal only for equal bytes."""
        return hmac.new(self._chunk_id, raw, hashlib.sha256).hexdigest()

    def chunk_name_of(self, pieces) -> str:
        """`chunk_name` of the bytes of consecutive `pieces`."""
        mac = hmac.new(self._chunk_id, digestmod=hashlib.sha256)
        for piece in pieces:
            mac.update(piece)
        return mac.hexdigest()

    def seal(self, plain: bytes | memoryview, context: str) -> bytes:
        iv = secrets.token_bytes(IV_SIZE)
        encryptor = Cipher(algorithms.AES(self._encryption), modes.CTR(iv)).encryptor()
        body = MAGIC + iv + encryptor.update(plain) + encryptor.finalize()
        return body + self._tag(context, body)

    def open(self, sealed: bytes | memoryview, context: str) -> bytes:
        """The plain bytes of `sealed`, once its check passes; Tampered if it does not."""
        sealed = memoryview(sealed)
        if not looks_sealed(sealed):
            raise Tampered(context, f"not a sealed file (no {MAGIC.decode()} header)")
        body, tag = sealed[:-TAG_SIZE], sealed[-TAG_SIZE:]
        if not hmac.compare_digest(self._tag(context, body), tag):
            raise Tampered(context, "fails its check: changed, moved or sealed under another key "
                                    "since it was written")
        iv = bytes(body[len(MAGIC):len(MAGIC) + IV_SIZE])
        decryptor = Cipher(algorithms.AES(self._encryption), modes.CTR(iv)).decryptor()
        return decryptor.update(body[len(MAGIC) + IV_SIZE:]) + decryptor.finalize()

    def peek(self, head: bytes) -> bytes:
        """The first plain bytes of a sealed file from its first bytes, unchecked (its tag
        is at its end): for a decision that a later full read checks anyway."""
        start = len(MAGIC) + IV_SIZE
        if len(head) < start or head[:len(MAGIC)] != MAGIC:
            return b""
        decryptor = Cipher(algorithms.AES(self._encryption),
                           modes.CTR(bytes(head[len(MAGIC):start]))).decryptor()
        return decryptor.update(head[start:])

    def _tag(self, context: str, body: bytes | memoryview) -> bytes:
        if "\n" in context:
            raise ValueError(f"a sealed file's context is one line: {context!r}")
        mac = hmac.new(self._mac, context.encode() + b"\n", hashlib.sha256)
        mac.update(body)
        return mac.digest()
