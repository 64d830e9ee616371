"""verify.json: what the last verification of an image found, as typed records.

{"at": UTC time, "ok": bool, "chunks": n, "problems": [{"digest", "reason"}]},
and after a restore drill "filesystems": [{"number", "type", "result": "clean",
"dirty" or "not checked", "detail"}]. The catalog reports it; verify writes it.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
from pathlib import Path
from typing import Optional

from ..base import errors
from ..base.errors import ImageError
from ..disks.lvm import place
from .codec import DIGEST_RE
from .manifest import TIME_FORMAT

RECORD_NAME = "verify.json"
CLEAN, DIRTY, NOT_CHECKED = "clean", "dirty", "not checked"
FILESYSTEM_RESULTS = (CLEAN, DIRTY, NOT_CHECKED)


@dataclasses.dataclass
class ChunkProblem:
    digest: str
    reason: str


@dataclasses.dataclass(frozen=True)
class FilesystemCheck:
    """A restore drill's finding on one partition."""

    number: int  # partition number (of the PV, for a logical volume)
    type: Optional[str]  # the filesystem blkid found, None if none
    result: str  # CLEAN, DIRTY or NOT_CHECKED
    detail: str  # the checker's last line of output, or why it was not checked
    volume: Optional[str] = None  # "vg0/root": an LVM logical volume in the partition

    @property
    def shown(self) -> str:
        return place(self.number, self.volume)

    @property
    def said(self) -> str:
        """The finding in a few words: "partition 1 (ext4): clean"."""
        return f"{self.shown} ({self.type or 'no filesystem'}): {self.result}"

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "FilesystemCheck":
        """One entry of verify.json's "filesystems"; ValueError if malformed."""
        try:
            check = cls(record["number"], record["type"], record["result"], record["detail"],
                        record.get("volume"))
        except (KeyError, TypeError):
            raise ValueError("not a filesystem check") from None
        if type(check.number) is not int or check.result not in FILESYSTEM_RESULTS \
                or not isinstance(check.detail, str) \
                or not (check.type is None or isinstance(check.type, str)) \
                or not (check.volume is None or isinstance(check.volume, str)):
            raise ValueError("not a filesystem check")
        return check


@dataclasses.dataclass
class VerifyResult:
    image: str
    chunks: int  # distinct chunks checked
    problems: list[ChunkProblem]
    at: str  # when the check ended, UTC
    filesystems: Optional[list[FilesystemCheck]] = None  # a restore drill's, per partition

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def filesystems_clean(self) -> Optional[bool]:
        """No checked filesystem dirty; None when there was no restore drill."""
        if self.filesystems is None:
            return None
        return all(check.result != DIRTY for check in self.filesystems)

    def as_dict(self) -> dict:
        """The result; "filesystems" only after a restore drill."""
        found = dict(dataclasses.asdict(self), ok=self.ok)
        if self.filesystems is None:
            del found["filesystems"]
        return found

    def record(self) -> dict:
        """What verify.json holds."""
        record = {"at": self.at, "ok": self.ok, "chunks": self.chunks,
                  "problems": [dataclasses.asdict(problem) for problem in self.problems]}
        if self.filesystems is not None:
            record["filesystems"] = [check.as_dict() for check in self.filesystems]
        return record

    @classmethod
    def read(cls, image_dir: Path) -> Optional["VerifyResult"]:
        """The last verification recorded in `image_dir`; None if it was never verified."""
        path = image_dir / RECORD_NAME
        try:
            record = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise ImageError(f"{path}: unreadable verification record ({errors.reason(exc)})") from None
        except ValueError as exc:
            raise ImageError(f"{path}: unreadable verification record (not JSON: {exc})") from None
        try:
            filesystems = record.get("filesystems")
            result = cls(str(image_dir), record["chunks"],
                         [ChunkProblem(problem["digest"], problem["reason"])
                          for problem in record["problems"]], record["at"],
                         None if filesystems is None else
                         [FilesystemCheck.from_dict(check) for check in filesystems])
            well_formed = record["ok"] is result.ok and _well_formed(result)
        except (KeyError, TypeError, ValueError):
            well_formed = False
        if not well_formed:
            raise ImageError(f"{path}: invalid verification record")
        return result


def _well_formed(result: VerifyResult) -> bool:
    try:
        dt.datetime.strptime(result.at, TIME_FORMAT)
    except (TypeError, ValueError):
        return False
    return (type(result.chunks) is int and result.chunks >= 0
            and all(isinstance(p.digest, str) and DIGEST_RE.match(p.digest)
                    and isinstance(p.reason, str) for p in result.problems))
