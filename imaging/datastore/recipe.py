"""RESTORE.txt: how to restore an image with nothing but a shell, zstd, dd, od and tr
(and openssl, for an image in an encrypted datastore)."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

NAME = "RESTORE.txt"

TEMPLATE = """\
# Restore this disk image with stock tools only: a POSIX shell, zstd, dd, od and tr.
#
#   disk      {disk_id}
#   taken     {created}
#   size      {size} bytes ({chunks} chunks of {chunk_size} bytes)
#   sha256    {sha256}
#
# Run it as a script, naming the target disk (everything on it is overwritten):
#
#   sh {image_dir}/RESTORE.txt /dev/sdX
#
# It reads each chunk named in `index` from the datastore three folders up
# (chunks/<first two hex digits>/<sha256>.zst) and writes it at its place.
# A chunk file that starts with a zstd skippable frame (5e 2a 4d 18, length
# 32, then a SHA-256) is a delta: that base chunk, decompressed, is the zstd
# dictionary it needs (zstd -dc -D BASE CHUNK). Each chunk is decompressed to
# a temporary file before dd writes it, so any failure stops the script.
# The partition table and boot sector are part of the data; nothing else is
# needed. To check the result afterwards:  head -c {size} /dev/sdX | sha256sum
set -eu
target="${{1:?usage: sh RESTORE.txt TARGET}}"
image=$(cd "$(dirname "$0")" && pwd)
chunks="$image/../../../chunks"
raw=$(mktemp)
base_raw=$(mktemp)
trap 'rm -f "$raw" "$base_raw"' EXIT
chunk() {{ rest=${{1#??}}; printf '%s\n' "$chunks/${{1%"$rest"}}/$1.zst"; }}
base_of() {{
    head=$(od -An -tx1 -N40 "$1" | tr -d ' \n')
    case $head in 5e2a4d1820000000*) printf '%s\n' "${{head#5e2a4d1820000000}}" ;; esac
}}
n=0
while read -r name _; do
    file=$(chunk "$name")
    base=$(base_of "$file")
    if [ -n "$base" ]; then
        zstd -dcq "$(chunk "$base")" > "$base_raw"
        zstd -dcq -D "$base_raw" "$file" > "$raw"
    else
        zstd -dcq "$file" > "$raw"
    fi
    dd if="$raw" of="$target" bs={chunk_size} seek=$n conv=notrunc status=none
    n=$((n + 1))
done < "$image/index"
echo "restored $n chunks to $target"
"""


SEALED_TEMPLATE = """\
# Restore this disk image with stock tools only: a POSIX shell, openssl, zstd, dd, od,
# tr, head, tail and sed. The datastore is encrypted: the key's line of text (what
# `imaging key show` prints last, and the paper copy holds) opens it.
#
#   disk      {disk_id}
#   taken     {created}
#   size      {size} bytes ({chunks} chunks of {chunk_size} bytes)
#   key       {fingerprint}
#
# Run it as a script, naming the target disk (everything on it is overwritten):
#
#   IMAGING_KEY='imaging-key-1-...' sh {image_dir}/RESTORE.txt /dev/sdX
#
# Every file it reads is sealed (docs/architecture.md, "Sealed files"): `imgseal2`,
# a 16-byte IV, AES-256-CTR ciphertext, and a 16-byte AES-256-GMAC tag (its nonce the
# IV's first 12 bytes) over a line naming the file and everything before the tag. The
# keys come from the master key by HMAC-SHA256(master, "imaging <purpose> v1" 0x01). A
# file that fails its tag stops the script before anything of it is written. Opened,
# `index` lists the chunks in disk order; each chunk opens to a zstd frame, or to a
# delta (a skippable frame naming its base, then a frame to decompress with the base
# as dictionary).
set -eu
target="${{1:?usage: IMAGING_KEY=... sh RESTORE.txt TARGET}}"
image=$(cd "$(dirname "$0")" && pwd)
chunks="$image/../../../chunks"
place="images/$(basename "$(dirname "$image")")/$(basename "$image")"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
{unseal}fingerprint=$(subkey fingerprint | cut -c1-16 | sed 's/..../&-/g; s/-$//')
[ "$fingerprint" = "{fingerprint}" ] || {{ echo "IMAGING_KEY is key $fingerprint, not {fingerprint}" >&2; exit 2; }}
chunk() {{ rest=${{1#??}}; printf '%s\n' "$chunks/${{1%"$rest"}}/$1.zst"; }}
unseal "$image/index" "index $place" > "$work/index"
n=0
while read -r name _; do
    unseal "$(chunk "$name")" "chunk $name" > "$work/frame"
    head=$(od -An -tx1 -N40 "$work/frame" | tr -d ' \n')
    case $head in
    5e2a4d1820000000*)
        base=${{head#5e2a4d1820000000}}
        unseal "$(chunk "$base")" "chunk $base" > "$work/base"
        zstd -dcq "$work/base" > "$work/base_raw"
        zstd -dcq -D "$work/base_raw" "$work/frame" > "$work/raw" ;;
    *)
        zstd -dcq "$work/frame" > "$work/raw" ;;
    esac
    dd if="$work/raw" of="$target" bs={chunk_size} seek=$n conv=notrunc status=none
    n=$((n + 1))
done < "$work/index"
echo "restored $n chunks to $target"
"""

# The subkeys from IMAGING_KEY, and `unseal FILE CONTEXT`: the plain bytes of a sealed
# file once its tag is right, exit 3 if not; it needs $work, a private folder. Shared by
# RESTORE.txt and its tests.
UNSEAL = r"""hex=$(printf '%s' "${IMAGING_KEY:?set IMAGING_KEY to the key as imaging key show prints it}" |
      tr -d ' \n' | tr 'A-F' 'a-f')
hex=${hex#imaging-key-1-}
hex=$(printf '%s' "$hex" | tr -d '-' | cut -c1-64)
subkey() { printf "imaging $1 v1\001" | openssl dgst -sha256 -mac HMAC -macopt "hexkey:$hex" | sed 's/.*= //'; }
enc=$(subkey encryption)
mac=$(subkey gmac)
unseal() {  # read from a copy in $work: the file checked is the file decrypted
    [ -f "$1" ] || { echo "$2: missing ($1)" >&2; exit 3; }
    cp "$1" "$work/sealed"
    body=$(( $(wc -c < "$work/sealed") - 16 ))
    [ "$body" -ge 24 ] || { echo "$2: not a sealed file" >&2; exit 3; }
    iv=$(head -c 24 "$work/sealed" | tail -c 16 | od -An -v -tx1 | tr -d ' \n')
    want=$(tail -c 16 "$work/sealed" | od -An -v -tx1 | tr -d ' \n')
    got=$({ printf '%s\n' "$2"; head -c "$body" "$work/sealed"; } |
          openssl mac -cipher AES-256-GCM -macopt "hexkey:$mac" -macopt "hexiv:$(printf '%s' "$iv" | cut -c1-24)" GMAC |
          tr 'A-F' 'a-f')
    [ "$got" = "$want" ] || { echo "$2: fails its check: changed, moved or another key" >&2; exit 3; }
    head -c "$body" "$work/sealed" | tail -c +25 | openssl enc -d -aes-256-ctr -K "$enc" -iv "$iv"
}
"""


def render(manifest, image_dir: Path, fingerprint: Optional[str] = None) -> str:
    """The script restoring the image `manifest` describes, placed at `image_dir`, in a
    datastore encrypted with the key of `fingerprint` if one is named."""
    fields = dict(disk_id=image_dir.parent.name, created=manifest.created, size=manifest.size,
                  chunks=manifest.chunks, chunk_size=manifest.chunk_size, image_dir=image_dir)
    if fingerprint:
        return SEALED_TEMPLATE.format(fingerprint=fingerprint, unseal=UNSEAL, **fields)
    return TEMPLATE.format(sha256=manifest.sha256, **fields)
