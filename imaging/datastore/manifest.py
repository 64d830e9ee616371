"""manifest.json: what an image is, as one typed record.

Every writer builds a `Manifest` and writes `as_json()`; every reader goes
through `Manifest.from_dict`, which checks each field's type and value and
names the file and the field when one is wrong, so nothing past it meets a
half-valid description of an image. Fields this engine does not know (written
by a newer one) are kept as they are and written back unchanged.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Any, Callable, Optional

from ..base.errors import ImageError
from .codec import DIGEST_RE, LEVELS

FORMAT = 1
NAME = "manifest.json"
SUMMARY_FIELDS = ("size", "chunk_size", "chunks", "created", "seconds", "level", "mode", "status",
                  "stored_bytes", "new_bytes", "bad_bytes")
MODES = ("raw", "used")
STATUS_COMPLETE = "complete"
STATUS_READ_ERRORS = "complete-with-read-errors"
STATUSES = (STATUS_COMPLETE, STATUS_READ_ERRORS)
TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"


def utc_text(moment: dt.datetime) -> str:
    """A moment as the manifest writes times: ISO 8601, UTC, whole seconds."""
    return moment.astimezone(dt.timezone.utc).strftime(TIME_FORMAT)


class _Invalid(Exception):
    """A field's problem, worded to follow the field's name."""


def _integer(value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise _Invalid(f"is {_kind(value)}, not an integer")
    if value < minimum:
        raise _Invalid(f"is {value}, less than {minimum}")
    return value


def _positive(value: Any) -> int:
    return _integer(value, 1)


def _seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _Invalid(f"is {_kind(value)}, not a number")
    if not value >= 0:
        raise _Invalid(f"is {value}, not a duration")
    return float(value)


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise _Invalid(f"is {_kind(value)}, not a string")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Invalid(f"is {_kind(value)}, not true or false")
    return value


def _sha256(value: Any) -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise _Invalid(f"is {_shown(value)}, not a lowercase hex SHA-256")
    return value


def _utc_time(value: Any) -> str:
    try:
        dt.datetime.strptime(_text(value), TIME_FORMAT)
    except ValueError:
        raise _Invalid(f"is {_shown(value)}, not a UTC time like 2026-11-26T03:00:00Z") from None
    return value


def _level(value: Any) -> int:
    if _integer(value, LEVELS.start) not in LEVELS:
        raise _Invalid(f"is {value}, not a zstd level ({LEVELS.start} to {LEVELS.stop - 1})")
    return value


def _one_of(choices: tuple) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if value not in choices:
            raise _Invalid(f"is {_shown(value)}, not one of {', '.join(map(str, choices))}")
        return value
    return check


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _list_of(check: Callable[[Any], Any]) -> Callable[[Any], list]:
    def checked(value: Any) -> list:
        if not isinstance(value, list):
            raise _Invalid(f"is {_kind(value)}, not a list")
        items = []
        for number, item in enumerate(value):
            try:
                items.append(check(item))
            except _Invalid as problem:
                raise _Invalid(f"item {number} {problem}") from None
        return items
    return checked


def _range(value: Any) -> list[int]:
    if not isinstance(value, list) or len(value) != 2:
        raise _Invalid(f"is {_shown(value)}, not an [offset, length] pair")
    return [_integer(value[0]), _integer(value[1])]


def _object(fields: dict[str, Callable[[Any], Any]]) -> Callable[[Any], dict]:
    """An object that must hold `fields`, each passing its check; other keys are kept."""
    def checked(value: Any) -> dict:
        if not isinstance(value, dict):
            raise _Invalid(f"is {_kind(value)}, not an object")
        for name, check in fields.items():
            if name not in value:
                raise _Invalid(f"lacks {name!r}")
            try:
                check(value[name])
            except _Invalid as problem:
                raise _Invalid(f"field {name!r} {problem}") from None
        return value
    return checked


def _kind(value: Any) -> str:
    return {type(None): "null", bool: "a boolean", int: "an integer", float: "a number",
            str: "a string", list: "a list", dict: "an object"}.get(type(value), "unknown")


def _shown(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


_optional_text = _optional(_text)
# The identity of the disk: how the inventory named it when the image was taken.
# Everything else the source said about itself (the inventory's other fields, an
# import's archive and files) is kept beside these.
_disk = _object({"id": _text, "size": _integer, "model": _optional_text,
                 "serial": _optional_text, "wwn": _optional_text, "path": _optional_text,
                 "host": _optional_text})
# What a used-mode backup learnt about one partition.
_partition = _object({"number": _integer, "start": _integer, "size": _integer,
                      "filesystem": _optional_text, "used_bytes": _integer, "mapped": _text})


@dataclasses.dataclass(frozen=True)
class Manifest:
    disk: dict
    size: int
    chunk_size: int
    sector_size: int
    sha256: str  # of the whole raw image
    created: str  # UTC, TIME_FORMAT
    seconds: float
    level: int
    stored_bytes: int  # compressed bytes of all its chunks
    new_bytes: int  # compressed bytes this image added to the datastore
    bad_bytes: int  # unreadable, stored as zeros
    mode: str
    status: str
    chunks: int  # lines of the index
    index_sha256: str
    # The disk had a partition mounted read-write while it was read (a forced backup).
    mounted_rw: bool = False
    format: int = FORMAT
    layout_error: Optional[str] = None  # why the partition table could not be read
    forced_past_mount: Optional[str] = None  # the read-write mount a forced backup went past
    imported: Optional[str] = None  # when a classic backup was imported (UTC)
    # Used mode: the ranges read, their total, and how each partition was mapped.
    read_map: Optional[list[list[int]]] = None
    read_bytes: Optional[int] = None
    partitions: Optional[list[dict]] = None
    # Fields of a newer engine, written back as they were.
    unknown: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Any, where: Path | str) -> "Manifest":
        """The manifest `data` (parsed JSON) describes; ImageError naming `where` if invalid."""
        if not isinstance(data, dict):
            raise ImageError(f"{where}: invalid manifest: it is {_kind(data)}, not an object")
        if "format" in data and data["format"] != FORMAT:
            raise ImageError(f"{where}: unsupported manifest format {_shown(data['format'])} "
                             f"(this engine reads format {FORMAT})")
        values = {}
        for name, (check, required) in _CHECKS.items():
            if name not in data:
                if required:
                    raise ImageError(f"{where}: invalid manifest: it lacks {name!r}")
                continue
            try:
                values[name] = check(data[name])
            except _Invalid as problem:
                raise ImageError(f"{where}: invalid manifest: {name!r} {problem}") from None
        if "mounted_rw" not in data:
            # Older engines recorded only the mount a forced used-mode backup went past.
            values["mounted_rw"] = values.get("forced_past_mount") is not None
        expected = -(-values["size"] // values["chunk_size"])
        if values["chunks"] != expected:
            raise ImageError(f"{where}: invalid manifest: 'chunks' is {values['chunks']}, but "
                             f"its 'size' and 'chunk_size' make {expected}")
        unknown = {name: value for name, value in data.items() if name not in _CHECKS}
        return cls(**values, unknown=unknown)

    @classmethod
    def parse(cls, text: bytes, path: Path) -> "Manifest":
        """The manifest in `text`, read from `path`."""
        try:
            data = json.loads(text)
        except ValueError as exc:  # UnicodeDecodeError included
            raise ImageError(f"{path}: unreadable manifest (not JSON: {exc})") from None
        return cls.from_dict(data, path)

    def summary(self) -> dict:
        """What an encrypted image shows without its key (docs/architecture.md, "Encrypted
        datastores"): its sizes and times, nothing of the disk's identity or contents."""
        return {name: getattr(self, name) for name in SUMMARY_FIELDS}

    def as_dict(self) -> dict:
        """The manifest as manifest.json holds it; optional fields that are unset are left out."""
        written = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                   if field.name != "unknown" and getattr(self, field.name) is not None}
        return {**self.unknown, **written}

    def as_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2, sort_keys=True) + "\n"

    def identity(self) -> dict:
        """The disk's identity in the fields every source has."""
        return {name: self.disk.get(name) for name in _IDENTITY_FIELDS}


_IDENTITY_FIELDS = ("id", "model", "serial", "wwn", "size", "path", "host")
# name -> (check, whether a manifest must have it), in the order they are checked.
_CHECKS: dict[str, tuple[Callable[[Any], Any], bool]] = {
    "format": (_integer, True),
    "disk": (_disk, True),
    "size": (_positive, True),
    "chunk_size": (_positive, True),
    "sector_size": (_positive, True),
    "sha256": (_sha256, True),
    "created": (_utc_time, True),
    "seconds": (_seconds, True),
    "level": (_level, True),
    "stored_bytes": (_integer, True),
    "new_bytes": (_integer, True),
    "bad_bytes": (_integer, True),
    "mode": (_one_of(MODES), True),
    "status": (_one_of(STATUSES), True),
    "chunks": (_integer, True),
    "index_sha256": (_sha256, True),
    "mounted_rw": (_flag, False),
    "layout_error": (_optional_text, False),
    "forced_past_mount": (_optional_text, False),
    "imported": (_optional(_utc_time), False),
    "read_map": (_optional(_list_of(_range)), False),
    "read_bytes": (_optional(_integer), False),
    "partitions": (_optional(_list_of(_partition)), False),
}
