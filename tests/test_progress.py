"""Progress: structured, rate-limited events; a bar for people, JSON lines for programs."""
from __future__ import annotations

import io
import json

from engine import MiB, imaging, write_random

from imaging.progress import Progress
from imaging.report import TerminalBar


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_events_are_rate_limited_and_the_last_one_is_always_sent():
    clock, events = FakeClock(), []
    progress = Progress("backup", 100 * MiB, events.append, interval=0.5, clock=clock)
    for _ in range(10):  # ten chunks within 0.1 s: one event
        clock.now += 0.01
        progress.advance(MiB, stored=10, new=5)
    clock.now += 1
    progress.advance(MiB, bad=512)
    progress.finish()
    assert len(events) == 3 and events[-1].finished and not events[0].finished
    last = events[-1]
    assert (last.done, last.total, last.bad_bytes, last.stored_bytes, last.new_bytes) == \
        (11 * MiB, 100 * MiB, 512, 100, 50)
    assert abs(last.rate - 11 * MiB / 1.1) < 1
    assert abs(last.eta - 89 * MiB / last.rate) < 1e-6


def test_terminal_bar_shows_rate_and_eta():
    stream = io.StringIO()
    clock = FakeClock()
    progress = Progress("backup", 4 * MiB, TerminalBar(stream), interval=0, clock=clock)
    clock.now += 1
    progress.advance(MiB)
    line = stream.getvalue()
    assert line.startswith("\r") and "1.0 MiB / 4.0 MiB" in line
    assert "25%" in line and "1.0 MiB/s" in line and "ETA 0:00:03" in line


def test_cli_json_progress_lines_end_with_the_finished_total(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 32 * MiB)
    result = imaging("backup", source, "--store", tmp_path / "s", "--disk", "d", "--json-progress")
    events = [json.loads(line) for line in result.stderr.splitlines()]
    assert events and events[-1]["finished"] and events[-1]["done"] == 32 * MiB
    assert all(e["phase"] == "backup" and e["total"] == 32 * MiB for e in events)
    assert [e["done"] for e in events] == sorted(e["done"] for e in events)
