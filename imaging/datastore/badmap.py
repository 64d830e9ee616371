"""GNU ddrescue mapfiles: '+' for sectors read, '-' for sectors that stayed unreadable."""
from __future__ import annotations

from ..disks.device import Range, merge

NAME = "badblocks.map"
FINISHED = "+"
BAD_SECTOR = "-"


def render(size: int, bad: list[Range], tool: str = "imaging") -> str:
    """A complete mapfile for a finished read of `size` bytes."""
    lines = [f"# Mapfile. Created by {tool}",
             "# current_pos  current_status  current_pass",
             f"0x{0:08X}     {FINISHED}               1",
             "#      pos        size  status"]
    position = 0
    for start, length in merge(bad):
        if start > position:
            lines.append(f"0x{position:08X}  0x{start - position:08X}  {FINISHED}")
        lines.append(f"0x{start:08X}  0x{length:08X}  {BAD_SECTOR}")
        position = start + length
    if position < size:
        lines.append(f"0x{position:08X}  0x{size - position:08X}  {FINISHED}")
    return "\n".join(lines) + "\n"


def parse_bad(text: str) -> list[Range]:
    """The unreadable ranges of a mapfile, merged."""
    bad: list[Range] = []
    status_line_seen = False
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if not status_line_seen:
            status_line_seen = True
            continue
        if len(fields) >= 3 and fields[2] == BAD_SECTOR:
            bad.append((int(fields[0], 0), int(fields[1], 0)))
    return merge(bad)
