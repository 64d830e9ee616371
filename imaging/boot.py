"""Boot: an image started in a throwaway virtual machine, without restoring it, to see it
come up.

qemu boots the disk of the image's read-only view (reading/mount.py) through a qcow2
overlay in a private temporary folder: whatever the guest writes lands there and is gone
with the folder, so the datastore and every disk stay as they were. The machine has no
network: a copy of a real machine must not answer for it. The image is registered as read
while it runs (prune defers it, gc keeps its chunks).

Firmware: UEFI (OVMF) for a GPT disk with an EFI system partition, BIOS (SeaBIOS)
otherwise. Acceleration: KVM where a probe really boots there (a boot sector that writes
one byte to the serial port), else TCG, qemu's own emulation; the answer is kept per host,
for this kernel and this qemu (`accelerator`).

The test watches, every WATCH_INTERVAL seconds, the serial console, SeaBIOS's debug port
and, while the screen is in text mode (720x400), the screen's text (the VGA text buffer,
read with QMP's pmemsave); the screen itself through QMP's screendump. Verdicts, the
first that holds:
- booted: `expect` (a login prompt by default) matched the console or the screen's text;
- panic, no bootloader: a known failure said so there (a kernel panic, a blue screen's
  text; "No bootable device", "grub rescue>", ...), or a BIOS was handed a boot sector of
  zeros and nothing came of it;
- stuck: neither the screen nor the console changed for SETTLE_SECONDS, or the machine
  stopped;
- timeout: none of those within the timeout.
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from qemu.qmp import QMPError
from qemu.qmp.legacy import QEMUMonitorProtocol

from .base import tools
from .base.errors import Cancelled, ImagingError
from .base.progress import UNIT_SECONDS, Progress
from .datastore.image import Image, reads_image
from .datastore.store import BOOTING, write_atomically
from .reading.mount import ImageReader, layout_text, partitions, privately_mounted

QEMU, QEMU_PACKAGE = "qemu-system-x86_64", "qemu-system-x86"
OVMF_CODE = Path("/usr/share/OVMF/OVMF_CODE_4M.fd")
OVMF_VARS = Path("/usr/share/OVMF/OVMF_VARS_4M.fd")
OVMF_PACKAGE = "ovmf"
BIOS, UEFI = "bios", "uefi"
FIRMWARES = (BIOS, UEFI)
KVM, TCG = "kvm", "tcg"
MEMORY_MIB = 1024
# qemu's seccomp filter: a guest that breaks into qemu through a device it emulates still
# cannot run a program, raise its privileges or change resource limits.
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
DEFAULT_TIMEOUT = 120.0
DEFAULT_EXPECT = r"(?im)\blogin:\s*$"
WATCH_INTERVAL = 0.5
SCREEN_INTERVAL = 2.0
SETTLE_SECONDS = 30.0
CONSOLE_LINES = 20
# What of a console line or a deciding line a result keeps: the guest writes them.
LINE_LIMIT = 200
# What of the serial console and the debug port is read: every pattern is one line.
TAIL_BYTES = 64 * 1024
# A guest past these is stopped: the logs and the overlay lie in a temporary folder.
LOG_LIMIT = 16 * 1024 * 1024
OVERLAY_LIMIT = 2 * 1024 * 1024 * 1024
OVERLAY = "overlay.qcow2"
# A larger screen (a guest may set one of 16 MiB of noise) is neither shown nor kept.
PICTURE_LIMIT = 2 * 1024 * 1024
BOOTED, NO_BOOTLOADER, PANIC, STUCK, TIMEOUT = (
    "booted", "no bootloader", "panic", "stuck", "timeout")
# What firmware, boot loaders and kernels say when they give up.
FAILURES = [(PANIC, re.compile(pattern)) for pattern in (
    r"Kernel panic - not syncing", r"STOP: 0x[0-9A-Fa-f]{8}", r"-- System halted",
    r"Your (?:PC|device) ran into a problem", r"Invalid or corrupt kernel image")] + [
    (NO_BOOTLOADER, re.compile(pattern)) for pattern in (
        r"No bootable device", r"Boot failed: not a bootable disk",
        r"No bootable option or device was found", r"Operating system not found",
        r"Missing operating system", r"BOOTMGR is missing", r"grub rescue>",
        r"Invalid partition table")]
# SeaBIOS, once it jumps to the boot sector it read.
BOOT_SECTOR_STARTED = "Booting from 0000:7c00"
BOOT_CODE_SIZE = 440
ESP_TYPES = {"C12A7328-F81F-11D2-BA4B-00A0C93EC93B", "EF"}
# VGA text mode: 80x25 characters of 9x16 pixels, in a 32 KiB buffer the console scrolls in.
TEXT_SCREEN = (720, 400)
VGA_TEXT, VGA_TEXT_SIZE = 0xB8000, 0x8000
# imaging/boot-probe.S assembled (tests/test_boot.py checks): a boot sector that enters
# long mode as a kernel does, then writes PROBE_MARK to the serial port.
PROBE_SECTOR = bytes.fromhex(
    "fa31c08ed88ec08ed0bc007cbf0010b9001831c0f3ab66c70600100320000066"
    "c70600200330000066c7060030830000000f20e06683c8200f22e066b8001000"
    "000f22d866b9800000c00f32660d000100000f300f0116887c0f20c0660d0100"
    "00800f22c0ea6a7c0800b04b66baf803eefaf4ebfc8d76000000000000000000"
    "00000000009a20000f00787c").ljust(510, b"\0") + b"\x55\xaa"
PROBE_MARK = b"K"
# qemu's words when KVM cannot give the guest the CPU it asks for: a kernel that counts on
# a missing feature hangs (as nested KVM here does, after a boot sector that works).
MISSING_FEATURE = b"doesn't support requested feature"
PROBE_SECONDS = 10.0
QMP_CONNECT_SECONDS = 10.0
QMP_COMMAND_SECONDS = 10.0
# What talking to a qemu that is not (or no longer) there raises.
QMP_FAILURES = (QMPError, OSError, EOFError, asyncio.TimeoutError)


@dataclasses.dataclass
class BootResult:
    image: str
    verdict: str  # BOOTED, NO_BOOTLOADER, PANIC, STUCK or TIMEOUT
    seconds: float  # from the machine's start to the verdict
    accelerator: str  # KVM or TCG
    firmware: str  # BIOS or UEFI
    detail: str  # the line that decided, or why
    console: list[str]  # the serial console's last lines
    screenshot: Optional[str]  # the PNG written, if one was asked for

    @property
    def booted(self) -> bool:
        return self.verdict == BOOTED

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def firmware_of(image: Image) -> str:
    """UEFI for a GPT disk with an EFI system partition, BIOS otherwise."""
    parts = partitions(image)
    gpt = re.search(r"^label:\s*gpt\s*$", layout_text(image) or "", re.MULTILINE) is not None
    return UEFI if gpt and any((part.type or "").upper() in ESP_TYPES for part in parts) \
        else BIOS


def accelerator(cache: Optional[Path] = None) -> str:
    """KVM if a probe boots under it on this host, else TCG; kept in `cache` for this kernel
    and qemu, since a probe costs up to PROBE_SECONDS."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return TCG
    cache = cache or _cache_file()
    key = f"{os.uname().release} {_qemu_version()}"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        known = json.loads(cache.read_text())
        if known.get("for") == key and known.get("accelerator") in (KVM, TCG):
            return known["accelerator"]
    answer = KVM if probe(KVM) else TCG
    with contextlib.suppress(OSError):  # a home that takes no files: probed next time again
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(cache, json.dumps({"for": key, "accelerator": answer}).encode())
    return answer


def _cache_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "imaging" / "accelerator.json"


def _qemu_version() -> str:
    done = tools.run(QEMU, QEMU_PACKAGE, ["--version"], text=True,
                     failure="cannot ask qemu its version")
    return done.stdout.splitlines()[0].strip()


def probe(accel: str) -> bool:
    """Whether PROBE_SECTOR writes PROBE_MARK to the serial port under `accel` within
    PROBE_SECONDS, qemu giving the guest every CPU feature it asks for."""
    with tempfile.TemporaryDirectory(prefix="imaging-probe-") as work:
        disk, serial, log = Path(work, "probe.img"), Path(work, "serial"), Path(work, "log")
        disk.write_bytes(PROBE_SECTOR)
        with open(log, "wb") as errors:
            process = tools.started(QEMU, QEMU_PACKAGE, [
                "-accel", accel, "-m", "16", "-nodefaults", "-display", "none", "-no-reboot",
                "-serial", f"file:{serial}", "-drive", f"file={disk},format=raw,if=ide"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=errors)
        with tools.stopping(process):
            deadline = time.monotonic() + PROBE_SECONDS
            while time.monotonic() < deadline and process.poll() is None:
                if serial.exists() and PROBE_MARK in serial.read_bytes():
                    return MISSING_FEATURE not in log.read_bytes()
                time.sleep(0.1)
        return False


@reads_image(BOOTING)
def boot(image_dir: os.PathLike | str, *, timeout: float = DEFAULT_TIMEOUT,
         expect: str = DEFAULT_EXPECT, firmware: Optional[str] = None,
         screenshot: Optional[os.PathLike | str] = None,
         progress: Optional[Progress] = None,
         on_screen: Optional[Callable[[bytes], None]] = None) -> BootResult:
    """Boot the image in a throwaway VM and say how it went (see the module's notes).
    `on_screen` is given the screen (PNG) each time it changes."""
    image = Image.open(image_dir)
    reader = ImageReader(image)
    with privately_mounted(image, reader) as exposure:
        return boot_file(exposure.root / "disk", timeout=timeout, expect=expect,
                         firmware=firmware or firmware_of(image), screenshot=screenshot,
                         progress=progress, on_screen=on_screen,
                         zero_boot_code=not any(reader.pread(0, BOOT_CODE_SIZE)),
                         name=str(image.path))


def boot_file(disk: os.PathLike | str, *, disk_format: str = "raw",
              timeout: float = DEFAULT_TIMEOUT, expect: str = DEFAULT_EXPECT,
              firmware: str = BIOS, screenshot: Optional[os.PathLike | str] = None,
              progress: Optional[Progress] = None, zero_boot_code: bool = False,
              name: Optional[str] = None,
              on_screen: Optional[Callable[[bytes], None]] = None) -> BootResult:
    """Boot the disk file (of qemu's `disk_format`; never written) in a throwaway VM, as
    `boot` does an image: a restored copy, an export, or an image's view.
    `zero_boot_code`: its first 440 bytes are zeros; `name`: what the result names."""
    progress = progress or Progress("boot", 0)
    try:
        wanted = re.compile(expect)
    except re.error as exc:
        raise ImagingError(f"the expected text {expect!r} is no regular expression: {exc}") \
            from None
    if firmware not in FIRMWARES:
        raise ImagingError(f"firmware {firmware!r}: choose {' or '.join(FIRMWARES)}")
    if timeout <= 0:
        raise ImagingError(f"a timeout of {timeout:g} s leaves no time to boot")
    if firmware == UEFI and not (OVMF_CODE.is_file() and OVMF_VARS.is_file()):
        raise ImagingError(f"UEFI needs {OVMF_CODE}: install the {OVMF_PACKAGE} package")
    disk = Path(disk).resolve()
    if disk_format != "raw":
        _check_alone(disk, disk_format)
    accel = accelerator()
    with tempfile.TemporaryDirectory(prefix="imaging-boot-") as work:
        machine = _Machine(Path(work), disk, disk_format, firmware, accel)
        with machine.running():
            progress.start_phase("boot", int(timeout), unit=UNIT_SECONDS)
            verdict, detail, seconds = _watch(machine, wanted, timeout, progress,
                                              zero_boot_code and firmware == BIOS, on_screen)
            if screenshot:
                machine.look()
        if screenshot and machine.picture:  # the last screen taken, if qemu is gone
            Path(screenshot).write_bytes(machine.picture)
        console = [line[:LINE_LIMIT] for line in
                   _printable(machine.console()).splitlines()[-CONSOLE_LINES:]]
    progress.finish()
    return BootResult(name or str(disk), verdict, round(seconds, 2), accel, firmware,
                      detail[:LINE_LIMIT], console,
                      str(screenshot) if screenshot and machine.picture else None)


def _check_alone(disk: Path, disk_format: str) -> None:
    """Refuse a disk file that names other files (a qcow2 backing file, a data file): the
    guest would read them."""
    done = tools.run(tools.QEMU_IMG, tools.QEMU_IMG_PACKAGE,
                     ["info", "--output=json", "-f", disk_format, str(disk)], text=True,
                     failure=f"cannot read {disk} as {disk_format}")
    try:
        info = json.loads(done.stdout)
    except ValueError:
        raise ImagingError(f"qemu-img says nothing readable of {disk}") from None
    specific = (info.get("format-specific") or {}).get("data") or {}
    if "backing-filename" in info or "data-file" in specific:
        raise ImagingError(f"{disk} names other files (a backing or data file): boot a disk "
                           "file that holds all its data")


def _watch(machine: "_Machine", wanted: re.Pattern, timeout: float, progress: Progress,
           zero_boot_sector: bool, on_screen: Optional[Callable[[bytes], None]]
           ) -> tuple[str, str, float]:
    """(verdict, detail, seconds) of the running machine."""
    started = time.monotonic()
    changed, seen, next_screen, shown = started, None, started, None
    while True:
        if progress.cancelled():
            raise Cancelled("boot test cancelled")
        now = time.monotonic()
        if now >= next_screen:
            machine.look()
            next_screen = now + SCREEN_INTERVAL
            if on_screen is not None and machine.picture and machine.looks != shown:
                shown = machine.looks
                on_screen(machine.picture)
        text = "\n".join((_printable(machine.console()), _printable(machine.firmware_log()),
                          machine.text))
        state = (text, machine.looks)
        if state != seen:
            seen, changed = state, now
        found = wanted.search(text)
        if found:
            return BOOTED, _line_at(text, found.start()), now - started
        for verdict, pattern in FAILURES:
            failed = pattern.search(text)
            if failed:
                return verdict, _line_at(text, failed.start()), now - started
        if zero_boot_sector and BOOT_SECTOR_STARTED in text:
            return NO_BOOTLOADER, "the firmware started the disk's boot code, which is all " \
                                  "zeros", now - started
        if not machine.alive():
            return STUCK, f"the machine stopped ({machine.ending()})", now - started
        flooded = machine.flooded()
        if flooded:
            return STUCK, flooded, now - started
        if now - changed >= SETTLE_SECONDS:
            return STUCK, f"nothing changed on the screen or the console for " \
                          f"{SETTLE_SECONDS:g} s", now - started
        if now - started >= timeout:
            return TIMEOUT, f"no verdict within {timeout:g} s", now - started
        progress.advance(int(now - started) - progress.done)
        time.sleep(WATCH_INTERVAL)


def _line_at(text: str, position: int) -> str:
    """The line of `text` that holds `position`, trimmed."""
    start = text.rfind("\n", 0, position) + 1
    end = text.find("\n", position)
    return text[start:end if end >= 0 else len(text)].strip()


def _printable(data: bytes | str) -> str:
    """Text with the control characters a console sends (escapes, carriage returns) gone."""
    text = data.decode("utf-8", "replace") if isinstance(data, bytes) else data
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[()][A-Za-z0-9]|\r", "", text)
    return "".join(char for char in text if char in "\n\t" or char.isprintable())


class _Machine:
    """qemu with the disk behind a throwaway overlay, its console, firmware log and screen."""

    def __init__(self, work: Path, disk: Path, disk_format: str, firmware: str,
                 accel: str) -> None:
        self.work, self.disk, self.disk_format = work, disk, disk_format
        self.firmware, self.accel = firmware, accel
        self.text = ""  # the screen's text, while it is in text mode
        self.picture = b""  # the screen, PNG
        self.screen_digest: Optional[str] = None
        self._serial = _Tail(work / "serial.log")
        self._debug = _Tail(work / "firmware.log")
        self._screen = work / "screen.png"
        self._qmp_path = work / "qmp.sock"
        self._process: Optional[subprocess.Popen] = None
        self._qmp = None

    def _arguments(self) -> list[str]:
        overlay = self.work / OVERLAY
        tools.run(tools.QEMU_IMG, tools.QEMU_IMG_PACKAGE, [
            "create", "-q", "-f", "qcow2", "-F", self.disk_format, "-b", str(self.disk),
            str(overlay)], failure="cannot make the VM's throwaway overlay")
        arguments = [
            "-machine", "q35" if self.firmware == UEFI else "pc", "-accel", self.accel,
            "-m", str(MEMORY_MIB), "-nodefaults", "-no-user-config", "-vga", "std",
            "-sandbox", SANDBOX,
            "-display", "none", "-nic", "none", "-no-reboot",
            "-serial", f"file:{self._serial.path}",
            "-chardev", f"file,id=firmware,path={self._debug.path}",
            "-device", "isa-debugcon,iobase=0x402,chardev=firmware",
            "-qmp", f"unix:{self._qmp_path},server=on,wait=off",
            "-drive", f"file={overlay},format=qcow2,if=ide,cache=unsafe"]
        if self.firmware == UEFI:
            variables = self.work / "OVMF_VARS.fd"
            shutil.copyfile(OVMF_VARS, variables)
            arguments += ["-drive", f"if=pflash,format=raw,readonly=on,file={OVMF_CODE}",
                          "-drive", f"if=pflash,format=raw,file={variables}"]
        return arguments

    @contextlib.contextmanager
    def running(self) -> Iterator["_Machine"]:
        arguments = self._arguments()
        with open(self.work / "qemu.log", "wb") as log:
            # None of the job's environment (a datastore's passphrase) goes with it.
            self._process = tools.started(QEMU, QEMU_PACKAGE, arguments,
                                          stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=log, env={"PATH": os.environ.get("PATH", "")})
        with tools.stopping(self._process):
            try:
                self._connect()
                yield self
            finally:
                if self._qmp is not None:
                    with contextlib.suppress(*QMP_FAILURES):
                        self._qmp.close()

    def _connect(self) -> None:
        deadline = time.monotonic() + QMP_CONNECT_SECONDS
        while True:
            if not self.alive():
                raise ImagingError(f"qemu did not start: {self.ending()}")
            monitor = QEMUMonitorProtocol(str(self._qmp_path))
            try:
                monitor.connect()
            except QMP_FAILURES as exc:  # the socket not there yet
                if time.monotonic() > deadline:
                    raise ImagingError(f"qemu's monitor did not answer: {exc}") from None
                time.sleep(0.1)
                continue
            monitor.settimeout(QMP_COMMAND_SECONDS)
            self._qmp = monitor
            return

    def alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def ending(self) -> str:
        """How qemu ended: its exit status and last line."""
        log = (self.work / "qemu.log").read_bytes() if (self.work / "qemu.log").exists() else b""
        last = tools.last_line(log)
        status = self._process.returncode if self._process else None
        return f"qemu exited with status {status}" + (f": {last}" if last else "")

    @property
    def looks(self) -> Optional[str]:
        """What tells the screen from the last: in text mode its text (the cursor blinks in
        every other picture), else the picture's digest."""
        return self.text or self.screen_digest

    def console(self) -> bytes:
        return self._serial.read()

    def firmware_log(self) -> bytes:
        return self._debug.read()

    def flooded(self) -> Optional[str]:
        """Why the guest has written more than a boot does, or None."""
        for log, what in ((self._serial, "its serial console"), (self._debug, "the debug port")):
            if log.size > LOG_LIMIT:
                return f"the machine printed more than {LOG_LIMIT >> 20} MiB to {what}"
        with contextlib.suppress(FileNotFoundError):
            if (self.work / OVERLAY).stat().st_blocks * 512 > OVERLAY_LIMIT:
                return f"the machine wrote more than {OVERLAY_LIMIT >> 30} GiB to its disk"
        return None

    def look(self) -> None:
        """Take the screen, and its text if it shows text."""
        shot = self.screenshot()
        if shot is None:
            return
        picture = shot.read_bytes()
        # A guest may set a screen of 16 MiB of noise: it is told by its digest alone.
        self.picture = picture if len(picture) <= PICTURE_LIMIT else b""
        self.screen_digest = hashlib.sha256(picture).hexdigest()
        self.text = ""
        buffer = self.work / "vga-text"
        if _png_size(picture) == TEXT_SCREEN and self._command(
                "pmemsave", val=VGA_TEXT, size=VGA_TEXT_SIZE, filename=str(buffer)):
            cells = buffer.read_bytes()[0::2]
            self.text = "\n".join(_printable(cells[row:row + 80].decode("cp437")).rstrip()
                                  for row in range(0, len(cells), 80))

    def screenshot(self) -> Optional[Path]:
        """The screen as a PNG in the work folder, None if qemu could not take it."""
        if self._command("screendump", filename=str(self._screen), format="png"):
            return self._screen
        return None

    def _command(self, name: str, **arguments) -> bool:
        if self._qmp is None or not self.alive():
            return False
        try:
            self._qmp.cmd(name, **arguments)
        except QMP_FAILURES:  # qemu stopping: the watch sees it stop
            return False
        return True


class _Tail:
    """The last TAIL_BYTES of a file the guest writes to, read on from where the last read
    ended: a guest that prints without end costs neither memory nor time per look."""

    def __init__(self, path: Path) -> None:
        self.path, self.size, self._kept = path, 0, b""

    def read(self) -> bytes:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return self._kept
        start = max(self.size, size - TAIL_BYTES)
        with open(self.path, "rb") as log:
            log.seek(start)
            fresh = log.read(size - start)
        self._kept = ((self._kept if start == self.size else b"") + fresh)[-TAIL_BYTES:]
        self.size = size
        return self._kept


def _png_size(picture: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    return int.from_bytes(picture[16:20], "big"), int.from_bytes(picture[20:24], "big")
