"""The history benchmark's nightly change follows its seed and really changes the disk; its
chart draws one line per tool. Sizes and speeds are not asserted here: `make bench` judges them."""
import hashlib
import os
import shutil
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest
from support.devices import loop_device, mounted, requires_loop

from bench import history
from bench.disk import build_disk
from bench.system import LINUX_TYPE, MiB, partition_of_type

DISK_SIZE = 160 * MiB


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    requires_loop()
    disk = tmp_path_factory.mktemp("history") / "pristine.img"
    build_disk(disk, DISK_SIZE)
    return disk


def tree(disk: Path, mountpoint: Path) -> dict[str, str]:
    """SHA-256 of every regular file in the disk's ext4 partition, by relative path."""
    part = partition_of_type(disk, LINUX_TYPE)
    with loop_device(disk, part.offset, part.size, read_only=True) as device, \
            mounted(device, mountpoint, read_only=True) as root:
        return {path: hashlib.sha256((root / path).read_bytes()).hexdigest()
                for path, _ in history.list_files(root)}


def test_a_night_changes_the_disk_the_same_way_from_the_same_seed(pristine, tmp_path):
    copies = [tmp_path / "a.img", tmp_path / "b.img"]
    for copy in copies:
        shutil.copyfile(pristine, copy)
    before = tree(pristine, tmp_path / "mnt")
    (plan, written), (plan_again, written_again) = (history.change_disk(copy, 1)
                                                    for copy in copies)
    after, after_again = (tree(copy, tmp_path / "mnt") for copy in copies)

    assert plan == plan_again and written == written_again
    assert after == after_again, "the same seed and night changed the copies' files differently"
    assert 200 <= len(plan.upgrade) <= history.UPGRADE_MAX_FILES
    assert plan.rewrites and plan.deletions
    for path in plan.rewrites + plan.upgrade:
        assert after[path] != before[path], f"{path} was not changed"
    assert not set(plan.deletions) & set(after)
    source, target = plan.move
    assert source not in after and after[target] == before[source]
    for log, count in plan.logs:
        assert log not in before and log in after
    assert written >= sum(count for _, count in plan.logs)
    assert history.block_digests(copies[0]) != history.block_digests(pristine)


def test_the_plan_depends_on_the_seed_and_the_night_only():
    files = [(f"usr/lib/pkg{number // 50}/module{number}.py", 4096 + 97 * number)
             for number in range(2000)]
    files += [(f"usr/bin/tool{number}", (number + 5) * MiB) for number in range(12)]
    plan = history.plan_night(files, 3, seed=7)
    assert history.plan_night(list(files), 3, seed=7) == plan
    assert history.plan_night(files, 3, seed=8) != plan
    assert history.plan_night(files, 4, seed=7) != plan
    largest = {path for path, _ in sorted(files, key=lambda entry: -entry[1])[:10]}
    assert plan.move[0] in largest
    assert not {plan.move[0]} & set(plan.upgrade + plan.rewrites + plan.deletions)
    assert not set(plan.upgrade) & set(plan.rewrites) and not set(plan.rewrites) & set(
        plan.deletions)


def test_the_chart_draws_one_polyline_per_tool(tmp_path):
    series = {"ours, raw mode": [300 + 5 * night for night in range(15)],
              "borg": [310 + 9 * night for night in range(15)],
              "dd | gzip -9 <sum>": [340 * (night + 1) for night in range(15)]}
    path = tmp_path / "history.svg"
    path.write_text(history.svg_chart(series, "Repository size"))

    svg = ElementTree.parse(path).getroot()
    namespace = {"svg": "http://www.w3.org/2000/svg"}
    lines = svg.findall("svg:polyline", namespace)
    assert len(lines) == len(series)
    assert all(len(line.get("points").split()) == 15 for line in lines)
    texts = {text.text for text in svg.iter("{http://www.w3.org/2000/svg}text")}
    assert set(series) <= texts and "Night" in texts
    assert len({line.get("stroke") for line in lines}) == len(series)
    assert os.path.getsize(path) < 20_000
