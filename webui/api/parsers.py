"""The API's parser: JSON, and every body it cannot take a 400 with the reason.

DRF's JSONParser answers malformed JSON with a ParseError, but hands on what
parses and still cannot be used: nesting a thousand levels deep (where Python's
parser gives up with a RecursionError, a 500), numbers past a float's range
(1e999 is infinity, which no column holds), and strings with lone UTF-16
surrogates (which no database stores). The API's bodies are flat objects.
"""
from __future__ import annotations

import math

from rest_framework import parsers
from rest_framework.exceptions import ParseError

MAX_DEPTH = 20
TOO_DEEP = f"JSON parse error - nested deeper than {MAX_DEPTH} levels"


class JSONParser(parsers.JSONParser):
    def parse(self, stream, media_type=None, parser_context=None):
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError:
            raise ParseError(TOO_DEEP) from None
        _check(data)
        return data


def _check(data) -> None:
    """Walks the parsed body without recursing: depth, numbers, strings (keys too)."""
    pending = [([data], 0)]  # (a container, how deep it is nested: the body itself is 1 deep)
    while pending:
        container, depth = pending.pop()
        if depth > MAX_DEPTH:
            raise ParseError(TOO_DEEP)
        items = container if isinstance(container, list) else [*container, *container.values()]
        for item in items:
            if isinstance(item, (dict, list)):
                pending.append((item, depth + 1))
            elif isinstance(item, float) and not math.isfinite(item):
                raise ParseError("JSON parse error - a number out of range")
            elif isinstance(item, str) and not item.isascii():
                try:
                    item.encode()
                except UnicodeEncodeError:
                    raise ParseError("JSON parse error - a lone UTF-16 surrogate in a string") \
                        from None
