"""Reading a stored chunk back, checked against its name.

Whatever re-encodes chunks (recompress, export) checks each one first, so a
corrupt chunk is never given a fresh, valid-looking frame or shipped inside
an archive.

A delta chunk's frame names its base (see codec); the base always stands
alone, so reading any chunk takes at most two frames.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Iterable, Optional, Sequence

from ..base.errors import ImageError
from ..base.pipeline import ordered_map
from . import codec
from .sealing import Tampered
from .store import Datastore


def base_bytes(store: Datastore, base: str, digest: str, *, checked: bool = True) -> bytes:
    """The raw bytes of `base` that delta chunk `digest` is compressed against.

    Unless `checked`, the base's SHA-256 is not computed: a wrong base cannot
    get past the delta frame's own checksum of what it decodes to.
    """
    try:
        frame = store.read_frame(base)
    except Tampered:
        raise
    except ImageError:
        raise ImageError(f"chunk {digest} needs chunk {base}, which is missing from "
                         f"{store.root}") from None
    if codec.delta_base(frame) is not None:
        raise ImageError(f"chunk {digest} is corrupt: its base {base} is itself a delta")
    data = codec.decompress(frame, base)
    if checked and store.name(data) != base:
        raise ImageError(f"chunk {base} is corrupt (content does not match its name)")
    return data


def decode(store: Datastore, digest: str, frame: bytes) -> bytes:
    """The raw bytes of the stored `frame` of chunk `digest`, unchecked but for zstd's checksum."""
    base = codec.delta_base(frame)
    return codec.decompress(frame, digest, None if base is None else
                            base_bytes(store, base, digest, checked=False))


def decode_into(store: Datastore, digest: str, frame: bytes, out: memoryview) -> None:
    """`decode` into `out`, which the chunk's contents must fill exactly."""
    base = codec.delta_base(frame)
    codec.decompress_into(frame, out, digest, None if base is None else
                          base_bytes(store, base, digest, checked=False))


def read_chunk(store: Datastore, digest: str, length: int) -> bytes:
    """The `length` raw bytes named `digest`; ImageError if missing or corrupt."""
    if digest == store.zero_name(length):
        return codec.zeros(length)
    data = decode(store, digest, store.read_frame(digest))
    if len(data) != length or store.name(data) != digest:
        raise ImageError(f"chunk {digest} is corrupt (content does not match its name)")
    return data


@dataclasses.dataclass(frozen=True)
class Contents:
    """A chunk's bytes as consecutive pieces of memory: one buffer, or its frame's raw blocks."""

    pieces: Sequence[memoryview]

    def span(self, start: int, length: int) -> list[memoryview]:
        """Views of bytes `start` to `start + length`."""
        views = []
        for piece in self.pieces:
            if length <= 0:
                break
            if start < len(piece):
                views.append(piece[start:start + length])
                length -= len(views[-1])
                start = 0
            else:
                start -= len(piece)
        return views


def read_chunk_into(store: Datastore, digest: str, frames: bytearray,
                    contents: memoryview) -> Contents:
    """Like `read_chunk`, in the caller's buffers: the frame in `frames` if it fits.

    For callers that reuse buffers: fresh ones for each 4 MiB frame and its
    contents cost the kernel more, mapping and zeroing their pages, than zstd
    takes to decode them. A frame of raw blocks only (incompressible data)
    is not decoded: its blocks are the contents. The chunk must not be all
    zeros (those are not read).
    """
    frame = store.read_frame_into(digest, frames)
    base = codec.delta_base(frame)
    pieces = codec.raw_blocks(frame) if base is None else None
    if pieces is None or sum(len(piece) for piece in pieces) != len(contents):
        codec.decompress_into(frame, contents, digest, None if base is None else
                              base_bytes(store, base, digest, checked=False))
        pieces = [contents]
    if store.name_of_pieces(pieces) != digest:
        raise ImageError(f"chunk {digest} is corrupt (content does not match its name)")
    return Contents(pieces)


def bases_named_by_files(store: Datastore, digests: Iterable[str]) -> set[str]:
    """The bases that the stored files of `digests` need (the missing ones need none).

    An index records how a chunk was stored when its image was taken; another
    backup may have stored the same chunk since, as a delta, and landed first,
    so the files have the last word.
    """
    def needs(digest: str) -> Optional[str]:
        try:
            return store.stored_base(digest)
        except ImageError:
            return None  # missing: reported by whoever needs it

    named = ordered_map(needs, sorted(set(digests)), name="bases")
    with contextlib.closing(named):
        return {base for _, base in named if base}


def missing_chunks(store: Datastore, digests: Iterable[str]) -> list[str]:
    """The chunks among `digests`, and the bases their files need, that are not stored."""
    digests = set(digests)
    needed = digests | bases_named_by_files(store, digests)
    return sorted(name for name in needed if not store.chunk_path(name).exists())
