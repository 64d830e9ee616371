"""Part names the way coreutils `split` makes them, and its size syntax.

With its default suffix length split never runs out of names: after NAME.yz
comes NAME.zaaa, after NAME.zyzz comes NAME.zzaaaa, and so on (likewise
00..89, 9000.. with -d). Every such sequence sorts in its own order, so a shell
glob like `NAME.*` lists the parts in the order to concatenate them.
"""
from __future__ import annotations

import itertools
import re
import string
from typing import Iterator, Optional

from .errors import ImagingError

ALPHABETIC = string.ascii_lowercase
NUMERIC = string.digits
_SIZE_RE = re.compile(r"^(\d+)(?:([kmgtp])(i?b)?)?$", re.IGNORECASE)
_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5}


def suffixes(alphabet: str = ALPHABETIC, width: Optional[int] = None) -> Iterator[str]:
    """split's suffixes in order: widening from two characters, or all of one `width`."""
    if width is not None:
        for letters in itertools.product(alphabet, repeat=width):
            yield "".join(letters)
        return
    last = alphabet[-1]
    for widened in itertools.count():
        for first in alphabet[:-1]:
            for rest in itertools.product(alphabet, repeat=widened + 1):
                yield last * widened + first + "".join(rest)


def parse_size(text: str) -> int:
    """A part size as split -b takes it: bytes, or 2048m, 2G (powers of 1024), 2GB (of 1000)."""
    match = _SIZE_RE.match(text.strip())
    if not match or int(match.group(1)) == 0:
        raise ImagingError(f"invalid size {text!r}: use bytes or a number with K, M, G or T "
                           "(e.g. 2048m, 2G; KB, MB, GB are powers of 1000)")
    number, unit, bytes_suffix = match.groups()
    if not unit:
        return int(number)
    base = 1000 if bytes_suffix and bytes_suffix.lower() == "b" else 1024
    return int(number) * base ** _POWERS[unit.lower()]
