"""Bad input gets one clear line on stderr, exit 1, and loses nothing."""
from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import threading

import pytest
from engine import REPO, MiB, imaging, last_line, one_error_line, sha256_of, write_random
from support.devices import loop_device, mounted, requires_loop, run
from support.disks import PartSpec

from imaging.backup import backup
from imaging.base.errors import Cancelled
from imaging.base.progress import Progress
from imaging.datastore.image import Image
from imaging.datastore.store import Datastore


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "disk.img"
    write_random(path, 16 * MiB)
    return path


def test_usage_errors_exit_2(tmp_path):
    assert imaging("backup", check=False).returncode == 2
    assert imaging("backup", tmp_path, "--store", tmp_path, "--level", "99", check=False).returncode == 2


def test_missing_source(tmp_path):
    message = one_error_line(imaging("backup", tmp_path / "nope", "--store", tmp_path / "s", check=False))
    assert "nope" in message and "no such file or directory" in message


def test_directory_is_not_a_source(tmp_path):
    message = one_error_line(imaging("backup", tmp_path, "--store", tmp_path / "s", check=False))
    assert "not a block device or a regular file" in message


def test_forged_disk_id_is_refused(source, tmp_path):
    message = one_error_line(imaging("backup", source, "--store", tmp_path / "s", "--disk", "../../etc", check=False))
    assert "invalid disk id" in message
    assert not (tmp_path / "etc").exists()


@pytest.mark.parametrize("damage, expected", [
    (lambda index: index.write_text(index.read_text().splitlines()[0] + "\n"), "corrupt or truncated index"),
    (lambda index: index.write_text(index.read_text().replace("a", "b", 1)), "corrupt index"),
    (lambda index: index.unlink(), "missing index"),
])
def test_damaged_index_is_refused_without_touching_the_target(source, tmp_path, damage, expected):
    result = backup(str(source), tmp_path / "store", disk_id="d")
    damage(result.image / "index")
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    for command in (("restore", result.image, target), ("verify", result.image)):
        assert expected in one_error_line(imaging(*command, check=False))
    assert target.read_bytes() == b"precious"


def test_missing_chunk_is_refused_before_the_target_is_written(source, tmp_path):
    result = backup(str(source), tmp_path / "store", disk_id="d")
    digest = (result.image / "index").read_text().split()[3]
    chunk = tmp_path / "store" / "chunks" / digest[:2] / f"{digest}.zst"
    chunk.unlink()
    target = tmp_path / "target.img"
    target.write_bytes(b"precious")
    message = one_error_line(imaging("restore", result.image, target, check=False))
    assert "1 chunk(s) missing" in message and digest in message
    assert target.read_bytes() == b"precious"


def test_full_datastore_fails_cleanly_and_lists_nothing(source, tmp_path):
    requires_loop()
    fs = tmp_path / "small-store.img"
    fs.write_bytes(b"")
    os.truncate(fs, 12 * MiB)
    run("mkfs.ext4", "-q", "-m", "0", fs)
    with loop_device(fs) as device, mounted(device, tmp_path / "store") as store:
        message = one_error_line(imaging("backup", source, "--store", store, "--disk", "d", check=False))
        assert "no space left on device" in message
        assert "no images" in imaging("list", "--store", store).stdout
        assert not list(store.glob("images/d/.*.tmp")), "the unfinished image was removed"
        smaller = tmp_path / "small.img"
        write_random(smaller, 4 * MiB, seed=3)
        # Once there is room, the same store takes a backup that verifies.
        for leftover in store.glob("chunks/*/*.zst"):
            leftover.unlink()
        out = imaging("backup", smaller, "--store", store, "--disk", "d")
        assert imaging("verify", out.stdout.splitlines()[-1]).returncode == 0


def test_sigkill_mid_backup_leaves_nothing_that_looks_complete(tmp_path):
    source = tmp_path / "big.img"
    write_random(source, 256 * MiB)
    store = tmp_path / "store"
    process = subprocess.Popen(
        [sys.executable, "-m", "imaging", "backup", source, "--store", store, "--disk", "d",
         "--level", "19", "--json-progress"],
        cwd=REPO, stderr=subprocess.PIPE, text=True)
    for line in process.stderr:
        if json.loads(line)["done"] >= 8 * MiB:
            break
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL
    assert "no images" in imaging("list", "--store", store).stdout
    assert not any(p.name.endswith(".zst") and p.stat().st_size == 0 for p in store.rglob("*.zst"))
    again = imaging("backup", source, "--store", store, "--disk", "d", "--level", "1")
    image = again.stdout.splitlines()[-1]
    assert imaging("verify", image).returncode == 0
    assert len(imaging("list", "--store", store).stdout.splitlines()) == 2


def test_cancel_between_chunks_leaves_no_image(tmp_path):
    source = tmp_path / "disk.img"
    write_random(source, 64 * MiB)
    before = sha256_of(source)
    cancel = threading.Event()

    def stop_after_the_first_chunk(event):
        if event.done:
            cancel.set()

    progress = Progress("backup", 0, stop_after_the_first_chunk, interval=0, cancel=cancel)
    with pytest.raises(Cancelled):
        backup(str(source), tmp_path / "store", disk_id="d", progress=progress)
    assert 0 < progress.done < 64 * MiB
    assert list((tmp_path / "store" / "images" / "d").iterdir()) == []
    assert Datastore.open(tmp_path / "store").running_jobs() == []
    assert sha256_of(source) == before


# --- the tools and files the engine relies on, missing or misbehaving -------------

def _path_without(tool: str, tmp_path) -> str:
    """A PATH like ours, but where `tool` cannot be found."""
    shadow = tmp_path / "bin"
    shadow.mkdir(exist_ok=True)
    for folder in os.environ["PATH"].split(os.pathsep):
        for entry in os.scandir(folder) if os.path.isdir(folder) else ():
            target = shadow / entry.name
            if entry.name != tool and not target.exists():
                target.symlink_to(entry.path)
    return str(shadow)


def _tool_printing(tool: str, output: str, tmp_path) -> str:
    """A PATH whose `tool` prints `output` and exits 0, ahead of the real one."""
    shadow = tmp_path / "fake-bin"
    shadow.mkdir(exist_ok=True)
    script = shadow / tool
    script.write_text(f"#!/bin/sh\ncat <<'EOF'\n{output}\nEOF\n")
    script.chmod(0o755)
    return f"{shadow}{os.pathsep}{os.environ['PATH']}"


@pytest.mark.parametrize("tool, command", [
    ("sfdisk", ["layout", "{source}"]),
    ("lsblk", ["disks"]),
])
def test_a_missing_tool_is_named(tool, command, source, tmp_path):
    env = dict(os.environ, PATH=_path_without(tool, tmp_path))
    arguments = [part.format(source=source) for part in command]
    message = one_error_line(imaging(*arguments, check=False, env=env))
    assert message.endswith(f"{tool} not found: install the "
                            f"{'fdisk' if tool == 'sfdisk' else 'util-linux'} package")


def test_a_missing_decoder_is_named_and_imports_nothing(source, tmp_path):
    archive = tmp_path / "disk.img.xz"
    archive.write_bytes(subprocess.run(["xz", "-0", "-c", source], capture_output=True,
                                       check=True).stdout)
    env = dict(os.environ, PATH=_path_without("xz", tmp_path))
    message = one_error_line(imaging("import", archive, "--store", tmp_path / "s", "--disk", "d",
                                     check=False, env=env))
    assert message.endswith("xz not found: install the xz-utils package")
    assert not list((tmp_path / "s").glob("images/d/*"))


def test_a_partition_whose_mapping_tool_is_missing_is_read_whole_naming_the_package(
        disk_factory, tmp_path):
    disk = disk_factory("fat.img", 48 * MiB, "dos", [PartSpec(40 * MiB, "fat32")])
    env = dict(os.environ, PATH=_path_without("partclone.fat", tmp_path))
    result = imaging("backup", disk.path, "--store", tmp_path / "s", "--mode", "used", "--json",
                     env=env)
    manifest = Image.open(json.loads(last_line(result.stdout))["image"]).manifest
    assert [entry["mapped"] for entry in manifest.partitions] == [
        "full: partclone.fat not found: install the partclone package"]


def test_unexpected_output_of_lsblk_is_one_line(tmp_path):
    env = dict(os.environ, PATH=_tool_printing("lsblk", '{"blockdevices": [{"size": 1}', tmp_path))
    assert "unexpected JSON from lsblk" in one_error_line(imaging("disks", check=False, env=env))


def test_unexpected_output_of_sfdisk_fails_used_mode_in_one_line(source, tmp_path):
    env = dict(os.environ, PATH=_tool_printing("sfdisk", '{"partitiontable": {"partitions": '
                                               '[{"node": "x1"}]}}', tmp_path))
    message = one_error_line(imaging("backup", source, "--store", tmp_path / "s", "--disk", "d",
                                     "--mode", "used", check=False, env=env))
    assert f"cannot read the partition table of {source}: unexpected JSON from sfdisk" in message
    assert not list((tmp_path / "s").glob("images/d/*"))


def test_gc_of_a_datastore_without_its_chunks_folder_is_one_line(source, tmp_path):
    store = tmp_path / "store"
    image = backup(str(source), store, disk_id="d").image
    for chunk in store.glob("chunks/*/*"):
        chunk.unlink()
    for folder in store.glob("chunks/*"):
        folder.rmdir()
    (store / "chunks").rmdir()
    message = one_error_line(imaging("gc", "--store", store, check=False))
    assert str(store / "chunks") in message and "no such file or directory" in message
    assert (image / "manifest.json").exists()


def test_library_errors_name_no_command_line_flags():
    """Errors reach web users too: only cli.py may speak of --flags."""
    flag = re.compile(r"(?<![\w-])--[a-z]")
    found = []
    for module in sorted((REPO / "imaging").rglob("*.py")):
        if module.name == "cli.py":
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            if isinstance(node, ast.Raise) and node.exc is not None:
                texts = [part.value for part in ast.walk(node.exc)
                         if isinstance(part, ast.Constant) and isinstance(part.value, str)]
                if any(flag.search(text) for text in texts):
                    found.append(f"{module.relative_to(REPO)}:{node.lineno}")
    assert found == []
