"""Sealing: what an encrypted datastore writes in place of a chunk's frame or an image's file
(docs/architecture.md, "Sealed files").

Encrypt-then-MAC with AES-256-CTR and AES-256-GMAC under the key's `encryption` and `gmac`
subkeys, chosen because stock openssl opens it (`openssl enc` has no AEAD mode; `openssl
mac` computes GMAC), so a sealed image restores with a shell: a sealed file is MAGIC, a
random 16-byte IV, the ciphertext, and the GMAC (its nonce the IV's first 12 bytes) of the
context, a newline, MAGIC, IV and ciphertext. GMAC rather than HMAC-SHA256: it costs a
fifth as much per byte here (AES and carry-less multiply instructions), which is most of
what sealing adds to a backup or a restore. The context
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

MAGIC = b"imgseal2"
FIRST_MAGIC = b"imgseal1"
IV_SIZE = 16
NONCE_SIZE = 12  # GMAC's, taken from the IV: a random 96-bit nonce per file
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + IV_SIZE
OVERHEAD = HEADER_SIZE + TAG_SIZE
BLOCK_SIZE = 16


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
        self._mac = key.derived("gmac")
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

    def seal(self, plain: bytes | memoryview, context: str) -> bytearray:
        # Written in one buffer: a 4 MiB chunk copied or allocated once more costs
        # as much as encrypting it.
        size = len(plain)
        sealed = bytearray(size + OVERHEAD)
        view = memoryview(sealed)
        iv = secrets.token_bytes(IV_SIZE)
        view[:len(MAGIC)], view[len(MAGIC):HEADER_SIZE] = MAGIC, iv
        encryptor = Cipher(algorithms.AES(self._encryption), modes.CTR(iv)).encryptor()
        encryptor.update_into(plain, view[HEADER_SIZE:])  # room for a block's spill: the tag's
        view[HEADER_SIZE + size:] = self._tag(context, view[:HEADER_SIZE + size], iv)
        return sealed

    def open(self, sealed: bytes | memoryview, context: str) -> bytearray:
        """The plain bytes of `sealed`, once its check passes; Tampered if it does not."""
        sealed = memoryview(sealed)
        if not looks_sealed(sealed):
            if sealed[:len(MAGIC)] == FIRST_MAGIC:
                raise Tampered(context, "sealed in the first format (imgseal1, HMAC-SHA256), "
                                        "which this version does not open")
            raise Tampered(context, f"not a sealed file (no {MAGIC.decode()} header)")
        body, tag = sealed[:-TAG_SIZE], sealed[-TAG_SIZE:]
        iv = bytes(body[len(MAGIC):HEADER_SIZE])
        if not hmac.compare_digest(self._tag(context, body, iv), tag):
            raise Tampered(context, "fails its check: changed, moved or sealed under another key "
                                    "since it was written")
        size = len(body) - HEADER_SIZE
        plain = bytearray(size + BLOCK_SIZE - 1)  # update_into's room for a block's spill
        decryptor = Cipher(algorithms.AES(self._encryption), modes.CTR(iv)).decryptor()
        decryptor.update_into(body[HEADER_SIZE:], plain)
        del plain[size:]
        return plain

    def peek(self, head: bytes) -> bytes:
        """The first plain bytes of a sealed file from its first bytes, unchecked (its tag
        is at its end): for a decision that a later full read checks anyway."""
        if len(head) < HEADER_SIZE or head[:len(MAGIC)] != MAGIC:
            return b""
        decryptor = Cipher(algorithms.AES(self._encryption),
                           modes.CTR(bytes(head[len(MAGIC):HEADER_SIZE]))).decryptor()
        return decryptor.update(head[HEADER_SIZE:])

    def _tag(self, context: str, body: memoryview, iv: bytes) -> bytes:
        if "\n" in context:
            raise ValueError(f"a sealed file's context is one line: {context!r}")
        gmac = Cipher(algorithms.AES(self._mac), modes.GCM(iv[:NONCE_SIZE])).encryptor()
        gmac.authenticate_additional_data(context.encode() + b"\n")
        gmac.authenticate_additional_data(body)
        gmac.finalize()
        return gmac.tag
