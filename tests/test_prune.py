"""Prune: Proxmox Backup Server's keep rules, and removal that never leaves a half image."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
from pathlib import Path

import pytest
from engine import MiB, imaging, last_line, one_error_line
from support.disks import PartSpec, build_disk

from imaging.base.errors import StoreError
from imaging.base.progress import Progress
from imaging.datastore.store import Datastore
from imaging.prune import Retention, prune, remove_image, select

UTC = dt.timezone.utc


def at(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text).replace(tzinfo=UTC)


def kept(moments: list[str], **rules) -> list[str]:
    named = {moment: at(moment) for moment in moments}
    return sorted(select(named, Retention(**rules), UTC), reverse=True)


def test_keep_last_keeps_the_newest():
    moments = ["2026-01-01T10:00", "2026-01-01T11:00", "2026-01-02T09:00", "2026-01-03T08:00"]
    assert kept(moments, last=2) == ["2026-01-03T08:00", "2026-01-02T09:00"]


def test_keep_daily_takes_the_newest_of_each_day_that_has_images():
    moments = ["2026-01-01T01:00", "2026-01-01T23:00",  # two on the 1st: the later one counts
               "2026-01-03T05:00", "2026-01-03T06:00",  # nothing on the 2nd: it is not a period
               "2026-01-04T12:00", "2026-01-05T12:00"]
    assert kept(moments, daily=3) == ["2026-01-05T12:00", "2026-01-04T12:00", "2026-01-03T06:00"]
    assert kept(moments, daily=4)[-1] == "2026-01-01T23:00"


def test_a_period_already_kept_by_an_earlier_rule_is_not_counted_again():
    moments = ["2026-01-03T10:00", "2026-01-03T12:00", "2026-01-02T12:00",
               "2026-01-01T12:00", "2025-12-31T12:00"]
    # keep-last takes both images of the 3rd; keep-daily 2 then skips the 3rd entirely.
    assert kept(moments, last=2, daily=2) == [
        "2026-01-03T12:00", "2026-01-03T10:00", "2026-01-02T12:00", "2026-01-01T12:00"]


def test_weekly_monthly_yearly_use_iso_weeks_months_and_years():
    # Sunday 2026-01-04 ends ISO week 1; Monday 2026-01-05 starts week 2.
    moments = ["2026-01-05T08:00", "2026-01-04T20:00", "2026-01-03T20:00",
               "2025-12-29T08:00", "2025-12-28T08:00", "2025-11-15T08:00", "2024-06-01T08:00"]
    assert kept(moments, weekly=3) == ["2026-01-05T08:00", "2026-01-04T20:00", "2025-12-28T08:00"]
    assert kept(moments, monthly=3) == ["2026-01-05T08:00", "2025-12-29T08:00", "2025-11-15T08:00"]
    assert kept(moments, yearly=5) == ["2026-01-05T08:00", "2025-12-29T08:00", "2024-06-01T08:00"]


def test_a_typical_schedule():
    # Every 6 hours from Sunday 1 March to Thursday 9 April 2026 18:00.
    start = at("2026-03-01T00:00")
    moments = [(start + dt.timedelta(hours=6 * n)).isoformat()[:16] for n in range(160)]
    assert moments[-1] == "2026-04-09T18:00"
    assert kept(moments, last=2, daily=7, weekly=4, monthly=3) == [
        "2026-04-09T18:00", "2026-04-09T12:00",  # last 2
        *(f"2026-04-0{day}T18:00" for day in range(8, 1, -1)),  # daily: the 9th is kept already
        # weekly: the ISO weeks of 6 April and 30 March hold kept images already
        "2026-03-29T18:00", "2026-03-22T18:00", "2026-03-15T18:00", "2026-03-08T18:00",
        # monthly: April and March are kept already, February has no image: nothing more
    ]


@pytest.fixture
def history(tmp_path):
    """Six images of one disk taken on six days, imported from archives with those dates."""
    disk = build_disk(tmp_path / "disk.img", 8 * MiB, "dos", [PartSpec(6 * MiB, "fat16")], seed=9)
    store = tmp_path / "store"
    images = []
    for day in range(1, 7):
        archive = tmp_path / f"day{day}.img"
        shutil.copyfile(disk.path, archive)
        moment = at(f"2026-02-0{day}T12:00").timestamp()
        os.utime(archive, (moment, moment))
        images.append(last_line(imaging("import", archive, "--store", store, "--disk", "sda").stdout))
    return store, images


def test_prune_removes_what_no_rule_keeps_and_lists_both(history):
    store, images = history
    names = [image.rsplit("/", 1)[1] for image in images]
    assert names[0].startswith("2026-02-01T12-00-00")
    env = dict(os.environ, TZ="UTC")
    dry = imaging("prune", "--store", store, "--disk", "sda", "--keep-last", "1", "--keep-daily",
                  "2", "--dry-run", env=env)
    assert all((store / "images" / "sda" / name).is_dir() for name in names)
    assert "would remove 3 of 6 images" in dry.stdout
    real = imaging("prune", "--store", store, "--disk", "sda", "--keep-last", "1", "--keep-daily",
                   "2", env=env)
    lines = real.stdout.splitlines()
    assert lines[:3] == [f"keep          {names[5]}  last 1", f"keep          {names[4]}  daily 1",
                         f"keep          {names[3]}  daily 2"]
    assert lines[3:6] == [f"removed       {name}" for name in reversed(names[:3])]
    assert sorted(p.name for p in (store / "images" / "sda").iterdir()) == names[3:]
    for image in images[3:]:
        assert "intact" in imaging("verify", image).stdout


def test_bad_input_is_one_clear_line(history):
    store, _ = history
    for arguments, words in [(["--store", store, "--disk", "sda"], "name what to keep"),
                             (["--store", store, "--disk", "sda", "--keep-last", "-1"], "negative"),
                             (["--store", store / "nowhere", "--disk", "sda", "--keep-last", "1"],
                              "not a datastore"),
                             (["--store", store, "--disk", "../x", "--keep-last", "1"],
                              "invalid disk id")]:
        line = one_error_line(imaging("prune", *arguments, check=False))
        assert words in line, line
    assert len(list((store / "images" / "sda").iterdir())) == 6


def test_prune_counts_images_and_its_result_is_json_safe(history):
    store, images = history
    events = []
    result = prune(store, "sda", Retention(last=2),
                   progress=Progress("prune", 0, events.append, interval=0))
    assert {(event.phase, event.unit) for event in events} == {("prune", "images")}
    assert [event.finished for event in events].count(True) == 1 and events[-1].finished
    assert events[-1].done == events[-1].total == 4
    assert result.removed == [Path(image) for image in reversed(images[:4])]
    assert result.deferred == [] and not any(Path(image).exists() for image in images[:4])
    record = json.loads(json.dumps(result.as_dict()))
    assert record["removed"] == list(reversed(images[:4]))
    assert [decision["keep"] for decision in record["decisions"]] == [True] * 2 + [False] * 4
    assert record["decisions"][0] == {"image": images[5], "keep": True, "reason": "last 1"}


def test_a_protected_image_is_kept_uncounted_and_cannot_be_deleted(history):
    store, images = history
    names = [image.rsplit("/", 1)[1] for image in images]
    said = imaging("protect", images[4], "--note", "before the upgrade").stdout
    assert said.strip().endswith("protected: prune and deletion keep it until `imaging unprotect`")
    listed = json.loads(imaging("list", "--store", store, "--json").stdout)
    assert [record["protected"]["note"] if record["protected"] else None
            for record in listed] == [None] * 4 + ["before the upgrade", None]
    env = dict(os.environ, TZ="UTC")
    lines = imaging("prune", "--store", store, "--disk", "sda", "--keep-last", "2",
                    env=env).stdout.splitlines()
    # Not counted: the two newest unprotected images are kept besides it.
    assert lines[:3] == [f"keep          {names[5]}  last 1",
                         f"keep          {names[4]}  protected",
                         f"keep          {names[3]}  last 2"]
    assert sorted(p.name for p in (store / "images" / "sda").iterdir()) == names[3:]
    with Datastore.open(store).pruning(), pytest.raises(StoreError, match="is protected: "
                                                        r"unprotect it first \(imaging unprotect\)"):
        remove_image(Datastore.open(store), Path(images[4]))
    assert "no longer protected" in imaging("unprotect", images[4]).stdout
    imaging("prune", "--store", store, "--disk", "sda", "--keep-last", "2", env=env)
    assert sorted(p.name for p in (store / "images" / "sda").iterdir()) == names[4:]
