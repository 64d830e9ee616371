"""Sealed files (encrypt-then-MAC), opened by the engine and by a shell with stock openssl,
zstd, od and tr given only the key's line of text; any change, move or other key refused."""
from __future__ import annotations

import random
import subprocess

import pytest
import zstandard

from imaging.datastore import keys, recipe
from imaging.datastore.sealing import MAGIC, OVERHEAD, Sealer, Tampered

# What an encrypted image's RESTORE.txt does for each chunk: derive the subkeys from the
# key's line, check the tag, then decrypt; here also decompress.
SHELL_OPEN = ("set -eu\nwork=$(mktemp -d)\ntrap 'rm -rf \"$work\"' EXIT\n" + recipe.UNSEAL
              + 'unseal "$1" "$2" > "$work/frame"\nzstd -dcq "$work/frame"\n')


@pytest.fixture
def key():
    return keys.generate()


def raw_chunk(size: int = 1024 * 1024, seed: int = 3) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(512) + bytes(512) for _ in range(size // 1024))


def test_a_sealed_chunk_opens_with_its_key_and_tells_nothing_of_its_content(key):
    sealer = Sealer(key)
    raw = raw_chunk()
    frame = zstandard.ZstdCompressor(level=3).compress(raw)
    sealed = sealer.seal(frame, "chunk x")
    assert sealed.startswith(MAGIC) and len(sealed) == len(frame) + OVERHEAD
    assert frame[:64] not in sealed and raw[:64] not in sealed
    assert sealer.open(sealed, "chunk x") == frame
    assert sealer.seal(frame, "chunk x") != sealed  # a fresh IV each time


def test_chunk_names_are_keyed(key):
    raw = raw_chunk()
    assert Sealer(key).chunk_name(raw) == Sealer(key).chunk_name(bytearray(raw))
    assert Sealer(key).chunk_name(raw) != Sealer(keys.generate()).chunk_name(raw)
    assert Sealer(key).chunk_name(raw) != Sealer(key).chunk_name(raw[:-1] + b"\1")


@pytest.mark.parametrize("where", ["magic", "iv", "ciphertext", "tag", "truncated"])
def test_any_changed_byte_is_refused(key, where):
    sealer = Sealer(key)
    sealed = bytearray(sealer.seal(b"x" * 5000, "index images/d/s"))
    position = {"magic": 0, "iv": 10, "ciphertext": 100, "tag": len(sealed) - 1}.get(where)
    if position is None:
        del sealed[-1]
    else:
        sealed[position] ^= 0x01
    with pytest.raises(Tampered, match=r"^index images/d/s: (fails its check|not a sealed)"):
        sealer.open(bytes(sealed), "index images/d/s")


def test_a_file_moved_to_another_name_or_opened_with_another_key_is_refused(key):
    sealed = Sealer(key).seal(b"manifest", "manifest images/d/2026-01-01T00-00-00Z")
    with pytest.raises(Tampered, match="fails its check: changed, moved or sealed under "
                                       "another key since it was written$"):
        Sealer(key).open(sealed, "manifest images/d/2026-01-02T00-00-00Z")
    with pytest.raises(Tampered):
        Sealer(keys.generate()).open(sealed, "manifest images/d/2026-01-01T00-00-00Z")


def test_a_shell_with_openssl_opens_a_sealed_chunk_from_the_keys_line(key, tmp_path):
    raw = raw_chunk(4 * 1024 * 1024)
    sealer = Sealer(key)
    name = sealer.chunk_name(raw)
    path = tmp_path / "chunk"
    path.write_bytes(sealer.seal(zstandard.ZstdCompressor(level=3).compress(raw), f"chunk {name}"))
    opened = subprocess.run(["sh", "-c", SHELL_OPEN, "sh", str(path), f"chunk {name}"],
                            env={"PATH": "/usr/bin:/bin", "IMAGING_KEY": key.text()},
                            capture_output=True, timeout=60)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout == raw

    other = subprocess.run(["sh", "-c", SHELL_OPEN, "sh", str(path), "chunk other"],
                           env={"PATH": "/usr/bin:/bin", "IMAGING_KEY": key.text()},
                           capture_output=True, timeout=60)
    assert (other.returncode, other.stdout, other.stderr) == (
        3, b"", b"chunk other: fails its check: changed, moved or another key\n")


def test_a_file_of_the_first_seal_format_is_named_as_such(key):
    first = b"imgseal1" + bytes(16) + b"frame" + bytes(32)
    with pytest.raises(Tampered, match=r"^chunk x: sealed in the first format \(imgseal1, "
                                       r"HMAC-SHA256\), which this version does not open$"):
        Sealer(key).open(first, "chunk x")
