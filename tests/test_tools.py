"""The engine's one way of running a system tool, reading its last word, and using loop devices."""
from __future__ import annotations

import errno
import os
import random
import time
from pathlib import Path

import pytest
from engine import MiB
from support.devices import loops_attached_to, requires_loop

from imaging.base.errors import Cancelled, ImagingError, SourceError, TargetError
from imaging.base.tools import last_line, loop_device, run


def _path_with(tmp_path, **scripts: str) -> dict:
    """The environment with a folder first in PATH holding a shell script for each name."""
    folder = tmp_path / "bin"
    folder.mkdir(exist_ok=True)
    for name, body in scripts.items():
        script = folder / name
        script.write_text(f"#!/bin/sh\n{body}\n")
        script.chmod(0o755)
    return dict(os.environ, PATH=f"{folder}{os.pathsep}{os.environ['PATH']}")


def _gone(pid: int) -> bool:
    """The process has ended and been reaped (or is a zombie nobody waits for)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    return state == "Z"


# -- running a tool ------------------------------------------------------------------

def test_a_missing_tool_is_the_callers_error_naming_its_package():
    with pytest.raises(TargetError) as missing:
        run("imaging-no-such-tool", "imaging-tools-pkg", ["--help"], kind=TargetError)
    assert str(missing.value) == "imaging-no-such-tool not found: install the imaging-tools-pkg " \
                                 "package"


def test_a_failing_tool_ends_the_message_with_its_last_line(tmp_path):
    env = _path_with(tmp_path, complain='echo "progress 50%"\necho "first problem" >&2\n'
                                        'echo "  the last word  " >&2\necho " " >&2\nexit 3')
    with pytest.raises(SourceError) as failed:
        run("complain", "pkg", [], env=env, kind=SourceError, failure="cannot read sda")
    assert str(failed.value) == "cannot read sda: the last word"
    done = run("complain", "pkg", [], env=env)
    assert (done.returncode, done.stdout, done.args) == (3, b"progress 50%\n", ["complain"])


def test_a_silent_failure_gives_its_exit_status(tmp_path):
    env = _path_with(tmp_path, mute="exit 4")
    with pytest.raises(ImagingError, match=r"^mute failed: mute exited 4$"):
        run("mute", "pkg", [], env=env, failure="mute failed")


def test_stdin_is_closed_unless_input_is_given():
    assert run("readlink", "coreutils", ["/proc/self/fd/0"]).stdout == b"/dev/null\n"
    assert run("cat", "coreutils", [], input=b"\xff\x00").stdout == b"\xff\x00"
    assert run("cat", "coreutils", [], input=b"fed\n", text=True).stdout == "fed\n"


def test_output_that_is_not_text_does_not_fail_a_run_as_text():
    done = run("printf", "coreutils", ["ok \\377\\n"], text=True)
    assert done.stdout == "ok \ufffd\n"


def test_a_cancel_kills_the_tool_at_once(tmp_path):
    pid_file = tmp_path / "pid"
    asked = []

    def cancelled() -> bool:
        if pid_file.exists() and pid_file.read_text().strip():
            asked.append(asked[0] if asked else time.monotonic())
        return bool(asked)

    with pytest.raises(Cancelled):
        run("sh", "dash", ["-c", f"echo $$ > {pid_file}; exec sleep 30"], cancelled=cancelled)
    assert time.monotonic() - asked[0] < 1
    assert _gone(int(pid_file.read_text()))


def test_input_goes_whole_to_a_slow_reader_under_a_cancel_poll():
    fed = random.Random(5).randbytes(4 * MiB)
    done = run("sh", "dash", ["-c", "sleep 0.3; cat"], input=fed, cancelled=lambda: False,
               timeout=30)
    assert done.stdout == fed


def test_a_cancel_before_the_start_runs_nothing(tmp_path):
    with pytest.raises(Cancelled):
        run("touch", "coreutils", [str(tmp_path / "made")], cancelled=lambda: True)
    assert not (tmp_path / "made").exists()


def test_a_tool_past_its_timeout_is_killed_and_named(tmp_path):
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"^sh did not finish within 0.5 s$"):
        run("sh", "dash", ["-c", f"echo $$ > {pid_file}; exec sleep 30"], timeout=0.5,
            kind=SourceError)
    assert 0.5 <= time.monotonic() - started < 2
    assert _gone(int(pid_file.read_text()))


def test_a_tool_writes_into_descriptors_it_is_given(tmp_path):
    with open(tmp_path / "passed", "wb") as passed, open(tmp_path / "out", "wb") as out:
        done = run("sh", "dash", ["-c", f"echo passed > /dev/fd/{passed.fileno()}; echo out; "
                                        "echo err >&2"],
                   pass_fds=[passed.fileno()], stdout=out.fileno())
    assert (done.returncode, done.stdout, done.stderr) == (0, None, b"err\n")
    assert (tmp_path / "passed").read_bytes() == b"passed\n"
    assert (tmp_path / "out").read_bytes() == b"out\n"


# -- the last word of a tool ---------------------------------------------------------

@pytest.mark.parametrize("outputs, expected", [
    (("one\ntwo\n",), "two"),
    (("  padded  \n\n  \n",), "padded"),
    ((b"bytes \xff\n",), "bytes \ufffd"),
    (("", None, "\n \n"), ""),
    (("\n", "from the second\n"), "from the second"),
    (("first wins\n", "second\n"), "first wins"),
    (("no newline at the end",), "no newline at the end"),
])
def test_last_line(outputs, expected):
    assert last_line(*outputs) == expected


# -- loop devices ----------------------------------------------------------------------

def test_a_loop_device_exposes_exactly_its_range_read_only(tmp_path):
    requires_loop()
    image = tmp_path / "noise.img"
    data = random.Random(3).randbytes(4 * MiB)
    image.write_bytes(data)
    with loop_device(image, MiB, 2 * MiB, read_only=True) as device:
        assert loops_attached_to(image) == [device]
        with open(device, "rb") as seen:
            assert seen.read() == data[MiB:3 * MiB]
        descriptor = os.open(device, os.O_WRONLY)
        try:
            with pytest.raises(OSError) as refused:
                os.write(descriptor, b"\0" * 512)
            assert refused.value.errno == errno.EPERM
        finally:
            os.close(descriptor)
    assert loops_attached_to(image) == []
    assert image.read_bytes() == data


def test_a_loop_device_is_detached_when_the_block_raises_and_its_error_kept(tmp_path):
    requires_loop()
    image = tmp_path / "zeros.img"
    image.write_bytes(bytes(MiB))
    with pytest.raises(OSError, match="^the block's own error$"):
        with loop_device(image) as device:
            assert loops_attached_to(image) == [device]
            raise OSError("the block's own error")
    assert loops_attached_to(image) == []


def test_a_loop_device_that_cannot_be_attached_is_the_callers_error(tmp_path):
    requires_loop()
    with pytest.raises(TargetError) as refused:
        with loop_device(tmp_path / "absent.img", kind=TargetError):
            pytest.fail("attached to nothing")
    message = str(refused.value)
    assert message.startswith(f"cannot attach a loop device to {tmp_path / 'absent.img'}: ")
    assert "\n" not in message
