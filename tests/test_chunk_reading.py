"""Chunks read into reused buffers: raw frames copied out, the rest decoded, every one checked."""
from __future__ import annotations

import concurrent.futures
import os
import random
import threading

import pytest
import zstandard
from engine import MiB

from imaging.backup import backup
from imaging.base.errors import ImageError
from imaging.datastore import codec
from imaging.datastore.chunks import read_chunk_into
from imaging.datastore.image import Image
from imaging.reading.mount import ImageReader

CHUNK = 1 * MiB
BLOCK = 128 * 1024  # zstd's largest block


def joined(pieces) -> bytes:
    return b"".join(bytes(piece) for piece in pieces)


def text(size: int, seed: int) -> bytes:
    words = [b"disk", b"image", b"chunk", b"frame", b"restore", b"backup", b"night"]
    rng = random.Random(seed)
    out = bytearray()
    while len(out) < size:
        out += rng.choice(words) + b" "
    return bytes(out[:size])


@pytest.fixture
def image(tmp_path):
    """An image of four chunks: random, text, zeros, and half random half text."""
    data = (os.urandom(CHUNK) + text(CHUNK, 1) + bytes(CHUNK)
            + os.urandom(CHUNK // 2) + text(CHUNK // 2, 2))
    source = tmp_path / "disk.img"
    source.write_bytes(data)
    image_dir = backup(str(source), tmp_path / "store", disk_id="d", chunk_size=CHUNK).image
    return Image.open(image_dir), data


def test_a_frame_of_raw_blocks_is_its_contents():
    data = os.urandom(CHUNK + 12345)  # eight whole blocks and a short one
    for options in ({"write_checksum": True, "write_content_size": True},
                    {"write_checksum": False, "write_content_size": False}):
        blocks = codec.raw_blocks(zstandard.ZstdCompressor(**options).compress(data))
        assert blocks is not None and len(blocks) == 9 and joined(blocks) == data
    # Streamed: no content size, so a window descriptor instead.
    streaming = zstandard.ZstdCompressor(write_checksum=True).compressobj()
    streamed = streaming.compress(data) + streaming.flush()
    assert zstandard.get_frame_parameters(streamed).content_size == zstandard.CONTENTSIZE_UNKNOWN
    assert joined(codec.raw_blocks(streamed)) == data


def test_any_other_frame_is_left_to_zstd():
    assert codec.raw_blocks(codec.compress(text(CHUNK, 3))) is None
    assert codec.raw_blocks(codec.compress(os.urandom(2 * BLOCK) + bytes(2 * BLOCK))) is None
    whole = codec.compress(os.urandom(CHUNK))  # with a checksum
    assert codec.raw_blocks(whole) is not None
    assert codec.raw_blocks(whole[:-1]) is None  # cut short
    assert codec.raw_blocks(whole + b"\0") is None  # something after the frame
    assert codec.raw_blocks(whole[:BLOCK]) is None  # a block runs past the end
    with_dictionary = bytearray(whole)
    with_dictionary[4] |= 1  # the descriptor says a dictionary ID follows
    assert codec.raw_blocks(with_dictionary) is None
    assert codec.raw_blocks(b"not a zstd frame") is None
    assert codec.raw_blocks(b"") is None


def test_decoding_into_a_buffer_fills_it_exactly_or_fails():
    data = text(CHUNK, 4)
    frame = codec.compress(data)
    out = bytearray(len(data))
    codec.decompress_into(frame, memoryview(out), "abc")
    assert out == data
    for wrong in (len(data) - 1, len(data) + 1):
        with pytest.raises(codec.CorruptFrame,
                           match=f"chunk abc is corrupt: its frame does not hold {wrong} bytes"):
            codec.decompress_into(frame, memoryview(bytearray(wrong)), "abc")
    damaged = bytearray(frame)
    damaged[-1] ^= 1  # zstd's checksum of the contents
    with pytest.raises(codec.CorruptFrame, match="chunk abc is corrupt: undecodable zstd frame"):
        codec.decompress_into(damaged, memoryview(bytearray(len(data))), "abc")


def test_every_kind_of_chunk_reads_back_into_buffers(image):
    opened, data = image
    digests = opened.index()
    frames, contents = bytearray(16), bytearray(CHUNK)  # the frame buffer is too small
    for position in (0, 1, 3):
        got = read_chunk_into(opened.store, digests[position], frames, memoryview(contents))
        assert joined(got.pieces) == data[position * CHUNK:(position + 1) * CHUNK]
        assert joined(got.span(1000, 300000)) == \
            data[position * CHUNK + 1000:position * CHUNK + 301000]
    raw = read_chunk_into(opened.store, digests[0], bytearray(2 * CHUNK), memoryview(contents))
    assert len(raw.pieces) == CHUNK // BLOCK  # copied out of the frame, not decoded


def test_a_chunk_file_holding_other_contents_is_refused(image):
    opened, _ = image
    digest = opened.index()[0]
    # A well-formed frame of raw blocks: only the SHA-256 can tell it is not chunk 0.
    opened.store.chunk_path(digest).write_bytes(codec.compress(os.urandom(CHUNK)))
    with pytest.raises(ImageError, match=f"chunk {digest} is corrupt"):
        read_chunk_into(opened.store, digest, bytearray(2 * CHUNK), memoryview(bytearray(CHUNK)))


def test_loans_are_shared_out_and_a_chunk_given_back_stays_decoded(image):
    opened, data = image
    reader = ImageReader(opened, loans=2)
    positions = [0, 1, 2, 3] * 8

    def copy(position: int) -> bytes:
        with reader.lent(position) as chunk:
            return joined(chunk.pieces)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        got = list(pool.map(copy, positions))
    assert got == [data[p * CHUNK:(p + 1) * CHUNK] for p in positions]
    assert reader._loan_count <= 2
    copy(3)
    before = reader.chunks_read
    assert copy(3) == data[3 * CHUNK:] and reader.chunks_read == before


def test_a_failed_load_gives_its_buffers_back(image):
    opened, data = image
    digest = opened.index()[1]
    opened.store.chunk_path(digest).write_bytes(b"junk")
    reader = ImageReader(opened, loans=1)
    failures: list[str] = []
    got: list[bytes] = []

    def lend() -> None:
        for _ in range(3):
            try:
                with reader.lent(1):
                    pass
            except ImageError as failure:
                failures.append(str(failure))
        with reader.lent(0) as chunk:
            got.append(joined(chunk.pieces))

    lender = threading.Thread(target=lend, daemon=True)  # waits forever if a loan was lost
    lender.start()
    lender.join(30)
    assert len(failures) == 3 and all(f"chunk {digest} is corrupt" in text for text in failures)
    assert got == [data[:CHUNK]]
