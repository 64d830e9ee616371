"""Reading a stored chunk back, checked against its name.

Whatever re-encodes chunks (recompress, export) checks each one first, so a
corrupt chunk is never given a fresh, valid-looking frame or shipped inside
an archive.
"""
from __future__ import annotations

from . import codec
from .errors import ImageError
from .store import Datastore


def read_chunk(store: Datastore, digest: str, length: int) -> bytes:
    """The `length` raw bytes named `digest`; ImageError if missing or corrupt."""
    if digest == codec.zero_digest(length):
        return codec.zeros(length)
    data = codec.decompress(store.read_frame(digest), digest)
    if len(data) != length or codec.digest(data) != digest:
        raise ImageError(f"chunk {digest} is corrupt (content does not match its name)")
    return data
