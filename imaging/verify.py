"""Verify: re-hash every chunk an image needs; set corrupt ones aside.

A chunk whose content no longer matches its name is renamed `<name>.bad`, so
the next backup holding that data stores a healthy copy (self-healing). The
outcome is recorded in the image directory as verify.json, which the catalog
reports: {"at": UTC time, "ok": bool, "chunks": n, "problems": [{"digest",
"reason"}]}. A restore drill (`fsck`) also checks every partition's filesystem
through a read-only mount of the image and adds "filesystems": [{"number",
"type", "result": "clean", "dirty" or "not checked", "detail"}], which only a
verification that found every chunk intact attempts.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
from pathlib import Path
from typing import Optional

import zstandard

from . import codec, errors
from .chunks import base_bytes, bases_named_by_files
from .errors import ImageError, StoreError, translated
from .image import Image
from .manifest import TIME_FORMAT, utc_text
from .pipeline import ordered_map
from .progress import Progress
from .store import DIGEST_RE, reads_image, write_atomically

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

    number: int  # partition number
    type: Optional[str]  # the filesystem blkid found, None if none
    result: str  # CLEAN, DIRTY or NOT_CHECKED
    detail: str  # the checker's last line of output, or why it was not checked

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "FilesystemCheck":
        """One entry of verify.json's "filesystems"; ValueError if malformed."""
        try:
            check = cls(record["number"], record["type"], record["result"], record["detail"])
        except (KeyError, TypeError):
            raise ValueError("not a filesystem check") from None
        if type(check.number) is not int or check.result not in FILESYSTEM_RESULTS \
                or not isinstance(check.detail, str) \
                or not (check.type is None or isinstance(check.type, str)):
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


BASE_PROBLEM = "unreadable: its base"


def check_chunk(image: Image, digest: str) -> Optional[str]:
    """Why the stored chunk is unusable, or None if it is intact.

    A delta whose base is missing or corrupt is reported as such, the base
    being the chunk to set aside (its own check says so).
    """
    try:
        frame = image.store.read_frame(digest)
    except ImageError:
        return "missing"
    needs = codec.delta_base(frame)
    try:
        base = None if needs is None else base_bytes(image.store, needs, digest)
    except ImageError as exc:
        return f"{BASE_PROBLEM} {needs} is missing or corrupt ({exc})"
    try:
        data = codec.decompress(frame, digest, base)
    except zstandard.ZstdError as exc:
        return f"corrupt ({exc})"
    if hashlib.sha256(data).hexdigest() != digest:
        return "corrupt (content does not match its name)"
    return None


@reads_image("verify")
def verify(image_dir: str, *, fsck: bool = False, progress: Optional[Progress] = None,
           workers: Optional[int] = None) -> VerifyResult:
    """Re-hash every chunk the image needs; with `fsck`, then check its filesystems too."""
    image = Image.open(image_dir)
    lengths: dict[str, int] = {}
    for position, digest in enumerate(image.index()):
        lengths[digest] = lengths.get(digest, 0) + image.chunk_length(position)
    for base in bases_named_by_files(image.store, set(lengths)):
        lengths.setdefault(base, 0)  # stored for the deltas' sake: no disk bytes of its own
    progress = progress or Progress("verify", image.size)
    progress.start_phase("verify", image.size)
    problems: list[ChunkProblem] = []
    checked = ordered_map(lambda digest: check_chunk(image, digest), lengths,
                          workers=workers, cancelled=progress.cancelled, name="verify")
    with contextlib.closing(checked):
        for digest, reason in checked:
            if reason:
                if reason != "missing" and not reason.startswith(BASE_PROBLEM):
                    image.store.quarantine(digest)
                problems.append(ChunkProblem(digest, reason))
            progress.advance(lengths[digest])
    filesystems = None
    if fsck:
        # The drill mounts the image, which reads its layout through the catalog,
        # which reports verifications: imported here, once all of them exist.
        from .filesystems import check_image
        from .mount import partitions
        filesystems = (check_image(image, progress) if not problems else
                       [FilesystemCheck(part.number, None, NOT_CHECKED, "the image has bad chunks")
                        for part in partitions(image)])
    result = VerifyResult(str(image.path), len(lengths), problems,
                          utc_text(dt.datetime.now(dt.timezone.utc)), filesystems)
    with translated(StoreError, "cannot record the verification"):
        write_atomically(image.path / RECORD_NAME, json.dumps(result.record()).encode() + b"\n")
    progress.finish()
    return result
