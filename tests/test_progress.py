"""Progress: structured, rate-limited events; a bar for people, JSON lines for programs."""
from __future__ import annotations

import datetime as dt
import io
import json
import os
import shutil

import pytest
from engine import MiB, imaging, write_random

from imaging.backup import backup
from imaging.base.progress import UNIT_BYTES, UNIT_CHUNKS, UNIT_IMAGES, Progress
from imaging.datastore.store import Datastore
from imaging.export import export
from imaging.gc import collect
from imaging.importer import import_archive
from imaging.prune import Retention, prune
from imaging.recompress import recompress
from imaging.report import TerminalBar
from imaging.restore import restore
from imaging.verify import verify


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


# --- every command: a phase and a unit on each event, one finished event last ------

CHUNK = 64 * 1024


@pytest.fixture
def recorded(tmp_path):
    """(datastore, an image in it, a function making a Progress that records its events)."""
    store = tmp_path / "store"
    Datastore.open_or_create(store, CHUNK)
    write_random(tmp_path / "disk.img", 4 * MiB)
    image = backup(str(tmp_path / "disk.img"), store, disk_id="sda").image
    events: list = []

    def progress() -> Progress:
        events.clear()
        return Progress("starting", 0, events.append, interval=0)

    return store, image, progress, events


def _prune_setup(store, image, tmp_path):
    for day in (1, 2):
        archive = tmp_path / f"day{day}.img"
        write_random(archive, MiB, seed=day)
        moment = dt.datetime(2026, 2, day, 12, tzinfo=dt.timezone.utc).timestamp()
        os.utime(archive, (moment, moment))
        import_archive([archive], store, disk_id="old")


def _gc_setup(store, image, tmp_path):
    gone = backup(str(tmp_path / "disk.img"), store, disk_id="gone").image
    shutil.rmtree(gone)


COMMANDS = {
    # name: (setup, run, the phases in order, unit)
    "backup": (None, lambda store, image, tmp, p: backup(str(tmp / "disk.img"), store,
                                                         disk_id="sdb", progress=p),
               ["backup"], UNIT_BYTES),
    "import": (None, lambda store, image, tmp, p: import_archive([tmp / "disk.img"], store,
                                                                 disk_id="sdc", progress=p),
               ["import"], UNIT_BYTES),
    "restore": (None, lambda store, image, tmp, p: restore(str(image), str(tmp / "t.img"),
                                                           progress=p),
                ["restore", "verify"], UNIT_BYTES),
    "restore --no-verify": (None, lambda store, image, tmp, p: restore(
        str(image), str(tmp / "t.img"), verify=False, progress=p), ["restore"], UNIT_BYTES),
    "verify": (None, lambda store, image, tmp, p: verify(str(image), progress=p), ["verify"],
               UNIT_BYTES),
    "export": (None, lambda store, image, tmp, p: export(image, tmp / "x.zst", progress=p),
               ["export"], UNIT_BYTES),
    "recompress": (None, lambda store, image, tmp, p: recompress(image, 5, progress=p),
                   ["recompress"], UNIT_BYTES),
    "prune": (_prune_setup, lambda store, image, tmp, p: prune(store, "old", Retention(last=1),
                                                               progress=p),
              ["prune"], UNIT_IMAGES),
    "gc": (_gc_setup, lambda store, image, tmp, p: collect(store, safety_margin=0, progress=p),
           ["gc"], UNIT_CHUNKS),
}


@pytest.mark.parametrize("command", COMMANDS)
def test_every_event_has_a_phase_and_unit_and_one_finished_event_ends_the_job(
        command, recorded, tmp_path):
    store, image, make_progress, events = recorded
    setup, run, phases, unit = COMMANDS[command]
    if setup:
        setup(store, image, tmp_path)
    run(store, image, tmp_path, make_progress())
    assert events, "no progress at all"
    seen = [event.phase for event in events]
    assert [phase for n, phase in enumerate(seen) if phase not in seen[:n]] == phases
    assert {event.unit for event in events} == {unit}
    assert [event.finished for event in events] == [False] * (len(events) - 1) + [True]
    last = events[-1]
    assert last.phase == phases[-1] and last.done == last.total > 0


def test_terminal_bar_counts_images_and_chunks_as_such():
    stream = io.StringIO()
    clock = FakeClock()
    progress = Progress("prune", 4, TerminalBar(stream), interval=0, clock=clock, unit=UNIT_IMAGES)
    clock.now += 2
    progress.advance(1)
    line = stream.getvalue()
    assert "1 images / 4 images" in line and "25%" in line and "0.5 images/s" in line
