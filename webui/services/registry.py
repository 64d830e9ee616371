"""The registry of job kinds: each kind's entry (services/kinds.py), by its name.

Below the code that runs, finishes and fails jobs, which asks a job's entry what its kind
does; the entries, which start jobs, stand above that code. An entry joins by being defined.
"""
from __future__ import annotations

import functools
import operator
from typing import TYPE_CHECKING, Iterable

from django.db.models import Q

from ..models import Disk, Job

if TYPE_CHECKING:
    from .kinds import JobKind

KINDS: dict[str, "JobKind"] = {}


def held_disk_ids(job: Job) -> list[int]:
    """The disks `job` holds while it is queued or running (one job per disk)."""
    return [getattr(job, f"{field}_id") for field in KINDS[job.kind].holds
            if getattr(job, f"{field}_id") is not None]


def holding(disks: Iterable[Disk]) -> Q:
    """Jobs that hold one of `disks`."""
    disks = list(disks)
    fields = sorted({field for kind in KINDS.values() for field in kind.holds})
    return functools.reduce(operator.or_, (
        Q(kind__in=[kind.name for kind in KINDS.values() if field in kind.holds],
          **{f"{field}__in": disks}) for field in fields))


def phase_words() -> dict[str, str]:
    """What a progress bar says of each phase; the engine names phases after their kind."""
    return {kind.name: kind.doing for kind in KINDS.values()}
