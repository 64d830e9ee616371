"""The benchmark's web section runs end to end on a tiny disk: real Redis, server and worker,
one round of each backup, a few WebSocket watchers and API clients, the pages rendered; every
target row gets a figure and a verdict. Speed is not asserted here: `make bench` judges it."""
import os
import re
import shutil
import subprocess
import sys

from support.requirements import requirement_missing
from webui.testing import REPO

DISK_SIZE = 16 * 1024 * 1024
CRITERIA = [
    "Backup through the API and a worker vs the CLI",
    "API backup watched by 3 more WebSocket clients vs by one",
    "Progress events reaching a WebSocket client",
    "Progress delay, worker (sent_at) to WebSocket client",
    "Progress delay with 3 more clients watching",
    "GET /api/images/?disk=… with 2 concurrent clients",
    "GET /api/disks/ with 2 concurrent clients",
    "Dashboard render, server-side",
    "Disk page render with 1,000 images",
    "A page's own CSS and JavaScript",
]


def test_web_section_reports_every_target_with_a_figure(tmp_path):
    if shutil.which("redis-server") is None:
        requirement_missing("redis-server is not installed (make install)")
    disk = tmp_path / "disk.img"
    disk.write_bytes(os.urandom(DISK_SIZE))
    finished = subprocess.run(
        [sys.executable, "-m", "bench.web", "--disk", str(disk), "--rounds", "1",
         "--watchers", "3", "--clients", "2", "--requests", "2", "--workdir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]

    rows = {cells[0]: cells for cells in (
        [cell.strip() for cell in line.strip("| ").split(" | ")]
        for line in finished.stdout.splitlines() if line.startswith("| "))}
    for criterion in CRITERIA:
        row = next((cells for name, cells in rows.items() if name.startswith(criterion)), None)
        assert row is not None, f"no row for {criterion!r} in:\n{finished.stdout}"
        _, ours, _, _, _, verdict = row
        assert verdict in ("PASS", "FAIL", "info"), (row, finished.stderr[-3000:])
        assert re.search(r"\d", ours), row
    for comparison in CRITERIA[:2]:
        ratio = next(cells[3] for name, cells in rows.items() if name.startswith(comparison))
        assert re.fullmatch(r"\d+\.\d{3}x", ratio), ratio
    for label in ("web: backup by the CLI", "web: backup through the API",
                  "web: API backup, 3 more WebSocket clients watching"):
        assert re.search(rf"^- {re.escape(label)}[^:]*: \d+\.\d\d s[^,]*, \d+ MiB/s",
                         finished.stdout, re.MULTILINE), finished.stdout
    assert not list(tmp_path.glob("web-*")), "the run left its working directory behind"
