"""Time one command: wall seconds, CPU seconds and peak memory of its process tree,
and how much CPU the rest of the machine used meanwhile.

Every measurement starts from flushed dirty pages and ends with a sync that
is inside the timed span, so a tool that fsyncs as it goes (borg) and one
that leaves its output in the page cache (zstd > file) pay the same price
for getting their output onto the disk.
"""

import contextlib
import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SAMPLE_INTERVAL = 0.05
IDLE_THRESHOLD = 0.1
IDLE_PROBE_SECONDS = 1.0


@dataclass
class Timing:
    seconds: float
    cpu_seconds: float
    peak_memory: int
    stdout: str
    # CPU the machine spent on anything but the command while it ran: other
    # people's jobs on a shared machine, writeback, this sampler. Large values
    # mean the wall seconds are not the command's alone.
    other_cpu_seconds: float = 0.0


class CommandFailed(Exception):
    pass


def timed(argv: list[str], *, stdin: Path | None = None, stdout: Path | None = None,
          cwd: Path | None = None, env: dict[str, str] | None = None) -> Timing:
    """Run argv with /usr/bin/time around it. stdout goes to the given file, or is
    captured and returned when no file is given."""
    os.sync()
    with tempfile.NamedTemporaryFile(mode="r") as report, \
            open(stdin or os.devnull, "rb") as stdin_file, \
            open(stdout, "wb") if stdout else contextlib.nullcontext() as stdout_file:
        start = time.perf_counter()
        busy_at_start = _machine_busy_seconds()
        process = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M %U %S", "-o", report.name, *argv],
            stdin=stdin_file, stdout=stdout_file or subprocess.PIPE, stderr=subprocess.PIPE,
            cwd=cwd, env=env,
        )
        sampler = TreeMemorySampler(process.pid)
        sampler.start()
        captured, errors = process.communicate()
        os.sync()
        seconds = time.perf_counter() - start
        busy = _machine_busy_seconds() - busy_at_start
        sampler.stop()
        if process.returncode != 0:
            tail = errors.decode(errors="replace").strip().splitlines()[-3:]
            command = " ".join([Path(argv[0]).name, *argv[1:3]])
            raise CommandFailed(f"{command} exited {process.returncode}: {' | '.join(tail)}")
        max_rss_kib, user, system = report.read().split("\n")[-2].split()
    cpu_seconds = float(user) + float(system)
    return Timing(
        seconds=seconds,
        cpu_seconds=cpu_seconds,
        peak_memory=max(int(max_rss_kib) * 1024, sampler.peak),
        stdout=(captured or b"").decode(errors="replace"),
        other_cpu_seconds=max(0.0, busy - cpu_seconds),
    )


def wait_until_idle(max_wait: float, threshold: float = IDLE_THRESHOLD) -> None:
    """On a shared machine, hold the next measurement until the rest of the
    machine uses less than `threshold` of one CPU, for at most max_wait seconds."""
    deadline = time.monotonic() + max_wait
    while time.monotonic() < deadline:
        busy_before = _machine_busy_seconds()
        time.sleep(IDLE_PROBE_SECONDS)
        if (_machine_busy_seconds() - busy_before) / IDLE_PROBE_SECONDS < threshold:
            return


def _machine_busy_seconds() -> float:
    """Non-idle CPU seconds of the whole machine since boot (/proc/stat)."""
    with open("/proc/stat") as stat:
        jiffies = [int(field) for field in stat.readline().split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, steal = jiffies
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


class TreeMemorySampler(threading.Thread):
    """Peak of the summed PSS of a process and all its descendants.

    /usr/bin/time's %M is exact but per process: it misses a tool whose memory
    is spread over worker processes or pipeline stages. Summing PSS (not RSS)
    counts pages shared between forked workers once. The larger of the two
    is reported."""

    def __init__(self, root_pid: int):
        super().__init__(daemon=True)
        self.root_pid = root_pid
        self.peak = 0
        self._stopped = threading.Event()

    def run(self) -> None:
        while not self._stopped.wait(SAMPLE_INTERVAL):
            # The root is /usr/bin/time itself, not part of the measured tool.
            tree = _descendants(self.root_pid)[1:]
            self.peak = max(self.peak, sum(_pss(pid) for pid in tree))

    def stop(self) -> None:
        self._stopped.set()
        self.join()


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        found.append(pid)
        frontier.extend(children.get(pid, []))
    return found


def _pss(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
