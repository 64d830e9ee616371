"""Boot tests: from request to verdict for the demo disk, against plain qemu booting a
restored copy of it.

The disk is the demo's (bench/disk.py at 256 MiB, made to boot by bench/bootable.py), backed
up in used mode. Each the median of ROUNDS runs, taking turns:
  - ours: `python -m imaging boot IMAGE --json`, from the command's start to its end (the
    image's view mounted, the overlay made, qemu started and watched to the login prompt,
    everything undone): target ≤ 30 s on TCG;
  - plain: `qemu-system-x86_64` on the restored copy (`-snapshot`, the same machine, memory
    and accelerator), from its start to the login prompt on its serial console: ours / plain
    ≤ 1.5.

`python -m bench.boot [WORKDIR]` runs it alone.
"""

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.bootable import LOGIN_PROMPT, make_bios_bootable
from bench.disk import build_disk
from bench.peers import imaging_command
from bench.system import MiB, measured, run_alone
from imaging import boot
from imaging.backup import backup
from imaging.restore import restore

REPO_ROOT = Path(__file__).resolve().parent.parent
DISK_SIZE = 256 * MiB
ROUNDS = 3
VERDICT_TARGET_SECONDS = 30.0
RATIO_TARGET = 1.5
PLAIN_TIMEOUT = 120.0


def _ours(image: Path) -> tuple[float, dict]:
    started = time.perf_counter()
    done = subprocess.run(imaging_command("boot", str(image), "--json", "-q"), cwd=REPO_ROOT,
                          capture_output=True, text=True)
    seconds = time.perf_counter() - started
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["verdict"] != boot.BOOTED:
        raise RuntimeError(f"the image did not boot: {result['verdict']}: {result['detail']}")
    return seconds, result


def _plain(disk: Path, accelerator: str, workdir: Path) -> float:
    """Seconds from qemu's start to the login prompt on its serial console."""
    serial = workdir / "serial.log"
    serial.unlink(missing_ok=True)
    started = time.perf_counter()
    process = subprocess.Popen(
        [boot.QEMU, "-machine", "pc", "-accel", accelerator, "-m", str(boot.MEMORY_MIB),
         "-nodefaults", "-vga", "std", "-display", "none", "-nic", "none", "-no-reboot",
         "-serial", f"file:{serial}", "-drive", f"file={disk},format=raw,if=ide,snapshot=on"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while time.perf_counter() - started < PLAIN_TIMEOUT:
            if serial.exists() and LOGIN_PROMPT.encode() in serial.read_bytes():
                return time.perf_counter() - started
            if process.poll() is not None:
                raise RuntimeError(f"qemu ended with status {process.returncode}")
            time.sleep(0.05)
        raise RuntimeError(f"no login prompt within {PLAIN_TIMEOUT:g} s")
    finally:
        process.kill()
        process.wait()


def measure(workdir: Path) -> dict:
    disk = workdir / "demo.img"
    build_disk(disk, DISK_SIZE)
    make_bios_bootable(disk, 1)
    image = backup(str(disk), workdir / "store", disk_id="demo", mode="used").image
    restored = workdir / "restored.img"
    restore(str(image), str(restored))
    ours, plain, accelerator = [], [], None
    for _ in range(ROUNDS):
        seconds, result = _ours(image)
        ours.append(seconds)
        accelerator = result["accelerator"]
        plain.append(_plain(restored, accelerator, workdir))
    return {"ours": statistics.median(ours), "plain": statistics.median(plain),
            "accelerator": accelerator}


def report_lines(workdir: Path) -> list[str]:
    """The benchmark's lines for the report: each figure against its target, or why it failed."""
    verdict = ("Boot test: `imaging boot` of the demo disk's used-mode image, from the "
               "command's start to its verdict (median of 3)")
    against = "Boot test against plain qemu booting a restored copy to the same prompt"
    figures, failed = measured([verdict, against], [boot.QEMU, "qemu-img"], workdir, measure)
    if figures is None:
        return failed
    ratio = figures["ours"] / figures["plain"]
    return [
        f"{verdict}: {figures['ours']:.1f} s ({figures['accelerator']}), target ≤ "
        f"{VERDICT_TARGET_SECONDS:g} s: "
        f"{'PASS' if figures['ours'] <= VERDICT_TARGET_SECONDS else 'FAIL'}",
        f"{against}: {figures['ours']:.1f} s against {figures['plain']:.1f} s, ratio "
        f"{ratio:.3f}, target ≤ {RATIO_TARGET:g}: {'PASS' if ratio <= RATIO_TARGET else 'FAIL'}",
    ]


def main() -> None:
    run_alone("boot", report_lines, sys.argv[1] if len(sys.argv) > 1 else None)


if __name__ == "__main__":
    main()
