"""RESTORE.txt: how to restore an image with nothing but a shell, zstd, dd, od and tr."""
from __future__ import annotations

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


def render(*, disk_id: str, created: str, size: int, chunk_size: int, sha256: str,
           image_dir: str) -> str:
    chunks = -(-size // chunk_size)
    return TEMPLATE.format(disk_id=disk_id, created=created, size=size, chunks=chunks,
                           chunk_size=chunk_size, sha256=sha256, image_dir=image_dir)
