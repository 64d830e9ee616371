"""Progress events: small structured records, rate limited, no UI.

The engine calls `Progress.advance(...)` as it goes; subscribers (the CLI's bar,
a JSON-lines writer, the web worker's channel-layer sender) receive
`ProgressEvent`s at most every `interval` seconds, one at the start of each
phase, and exactly one `finished` event at the very end of the whole job.
"""
from __future__ import annotations

import dataclasses
import threading
import time
from typing import Callable, Optional

from .errors import ImagingError

# What `done` and `total` count: disk bytes for every job that reads or writes
# a disk, whole images for prune, chunks for garbage collection, seconds for a boot test.
UNIT_BYTES = "bytes"
UNIT_IMAGES = "images"
UNIT_CHUNKS = "chunks"
UNIT_SECONDS = "seconds"  # of a wait with a deadline: a boot test's
ProgressCallback = Callable[["ProgressEvent"], None]


@dataclasses.dataclass(frozen=True)
class ProgressEvent:
    phase: str  # what is being done: "backup", "restore", "verify", ...
    done: int  # units processed
    total: int  # units to process
    rate: float  # units per second, averaged over the phase so far
    eta: Optional[float]  # seconds left, None when unknown
    elapsed: float
    bad_bytes: int = 0
    stored_bytes: int = 0
    new_bytes: int = 0
    finished: bool = False
    unit: str = UNIT_BYTES  # a UNIT_* constant

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


class Progress:
    """Accumulates counters and forwards rate-limited events to a callback.

    `cancel` is polled by the engine between chunks; a caller stops a job by
    setting it (cooperative cancel). `abort(error)` makes the next poll raise
    that error instead: how a helper thread (a failing heartbeat) fails the job.
    """

    def __init__(self, phase: str, total: int, callback: Optional[ProgressCallback] = None,
                 interval: float = 0.25, cancel: Optional[threading.Event] = None,
                 clock: Callable[[], float] = time.monotonic, unit: str = UNIT_BYTES) -> None:
        self.phase = phase
        self.unit = unit
        self.total = total
        self.done = 0
        self.bad_bytes = 0
        self.stored_bytes = 0
        self.new_bytes = 0
        self._callback = callback
        self._interval = interval
        self._clock = clock
        self._started = clock()
        self._last_sent = float("-inf")
        self._finished = False
        self._aborted: Optional[ImagingError] = None
        self.cancel = cancel or threading.Event()

    def start_phase(self, phase: str, total: int, unit: str = UNIT_BYTES) -> None:
        """Begin the next stage of the same job (restore, then verify) from zero."""
        self.phase, self.total, self.done, self.unit = phase, total, 0, unit
        self._started = self._clock()
        self._last_sent = self._started
        self._emit(finished=False)

    @property
    def elapsed(self) -> float:
        return self._clock() - self._started

    def advance(self, nbytes: int, *, bad: int = 0, stored: int = 0, new: int = 0) -> None:
        self.done += nbytes
        self.bad_bytes += bad
        self.stored_bytes += stored
        self.new_bytes += new
        now = self._clock()
        if now - self._last_sent >= self._interval:
            self._last_sent = now
            self._emit(finished=False)

    def finish(self) -> None:
        """The whole job is over: the one `finished` event; later calls send nothing."""
        if not self._finished:
            self._finished = True
            self._emit(finished=True)

    def abort(self, error: ImagingError) -> None:
        self._aborted = error

    def cancelled(self) -> bool:
        """Polled between chunks: True to stop; raises the error given to `abort`."""
        if self._aborted is not None:
            raise self._aborted
        return self.cancel.is_set()

    def event(self, finished: bool = False) -> ProgressEvent:
        elapsed = self.elapsed
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - self.done) / rate if rate > 0 and self.total else None
        return ProgressEvent(self.phase, self.done, self.total, rate, eta, elapsed,
                             self.bad_bytes, self.stored_bytes, self.new_bytes, finished,
                             self.unit)

    def _emit(self, finished: bool) -> None:
        if self._callback is not None:
            self._callback(self.event(finished))
