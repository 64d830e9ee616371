"""Part names the way coreutils `split` makes them (its size syntax is tools.parse_size).

With its default suffix length split never runs out of names: after NAME.yz
comes NAME.zaaa, after NAME.zyzz comes NAME.zzaaaa, and so on (likewise
00..89, 9000.. with -d). Every such sequence sorts in its own order, so a shell
glob like `NAME.*` lists the parts in the order to concatenate them.
"""
from __future__ import annotations

import itertools
import string
from typing import Iterator, Optional

ALPHABETIC = string.ascii_lowercase
NUMERIC = string.digits


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

