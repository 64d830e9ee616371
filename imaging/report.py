"""How progress reaches a person or a program: a pv-like bar, or JSON lines."""
from __future__ import annotations

import json
import sys
from typing import TextIO

from .base.progress import UNIT_BYTES, ProgressEvent

UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_bytes(count: float) -> str:
    value = float(count)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def human_count(count: float, unit: str) -> str:
    """Bytes in binary units; images or chunks as plain counts."""
    return human_bytes(count) if unit == UNIT_BYTES else f"{count:.0f} {unit}"


class TerminalBar:
    """One self-overwriting line, like pv: done/total, bar, percent, rate, ETA."""

    WIDTH = 30

    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        fraction = event.done / event.total if event.total else 1.0
        filled = int(fraction * self.WIDTH)
        bar = "=" * filled + (">" if filled < self.WIDTH else "") + " " * (self.WIDTH - filled - 1)
        eta = "done" if event.finished else (f"ETA {human_seconds(event.eta)}" if event.eta is not None else "ETA --")
        extra = f"  bad {human_bytes(event.bad_bytes)}" if event.bad_bytes else ""
        rate = (f"{human_bytes(event.rate)}/s" if event.unit == UNIT_BYTES
                else f"{event.rate:.1f} {event.unit}/s")
        line = (f"{event.phase:>8} {human_count(event.done, event.unit):>10} / "
                f"{human_count(event.total, event.unit):<10} "
                f"[{bar}] {fraction:4.0%} {rate}  {eta}{extra}")
        self.stream.write("\r" + line + "\x1b[K")
        if event.finished:
            self.stream.write("\n")
        self.stream.flush()


class JsonLines:
    def __init__(self, stream: TextIO = sys.stderr) -> None:
        self.stream = stream

    def __call__(self, event: ProgressEvent) -> None:
        self.stream.write(json.dumps(event.as_dict()) + "\n")
        self.stream.flush()
