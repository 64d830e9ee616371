"""Boot tests: an image booted in a throwaway qemu VM from its read-only view, watched to a
verdict. The disks boot a tiny Linux (bench/bootable.py) that prints a login prompt."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from engine import REPO, MiB, imaging
from support.devices import loop_device, mounted, requires_root_loop_fuse
from support.disks import PartSpec, build_disk
from support.fuse import no_mount_left_behind  # noqa: F401 (autouse fixture)
from support.requirements import requirement_missing
from support.services import wait_for

from bench import bootable
from imaging import boot
from imaging.backup import backup
from imaging.base.errors import ImagingError
from imaging.gc import collect
from imaging.prune import Retention, prune
from imaging.verify import verify

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def requires_qemu_and_payload() -> None:
    requires_root_loop_fuse()
    for tool in (boot.QEMU, "qemu-img"):
        if shutil.which(tool) is None:
            requirement_missing(f"{tool} is missing: install qemu-system-x86 and qemu-utils")
    try:
        bootable.payload()
    except RuntimeError as missing:
        requirement_missing(str(missing))


@pytest.fixture(scope="module")
def disks(tmp_path_factory):
    """{name: disk image}: a BIOS disk that boots, the same without boot code, the same with
    a corrupted kernel, and a UEFI disk that boots."""
    requires_qemu_and_payload()
    folder = tmp_path_factory.mktemp("boot-disks")
    made = {}
    bios = build_disk(folder / "bios.img", 48 * MiB, "dos", [PartSpec(40 * MiB, "ext4")],
                      seed=31, tail_noise=False).path
    bootable.make_bios_bootable(bios, 1)
    made["bios"] = bios
    made["blank"] = folder / "blank.img"
    shutil.copyfile(bios, made["blank"])
    with open(made["blank"], "r+b") as disk:
        disk.write(bytes(bootable.MBR_CODE_SIZE))
    made["corrupt"] = folder / "corrupt.img"
    shutil.copyfile(bios, made["corrupt"])
    with loop_device(made["corrupt"], MiB, 40 * MiB) as device, \
            mounted(device, folder / "corrupt") as root:
        with open(root / "boot" / bootable.KERNEL_NAME, "r+b") as kernel:
            kernel.seek(3 * MiB)
            kernel.write(os.urandom(MiB))
    made["uefi"] = folder / "uefi.img"
    bootable.build_uefi_disk(made["uefi"])
    return made


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """The accelerator's answer kept in the test's folder, not the machine's."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


def _image(disk: Path, store: Path, **options) -> Path:
    return backup(str(disk), store, disk_id=disk.stem, **options).image


def test_the_probe_is_the_assembled_source(tmp_path):
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            requirement_missing(f"{tool} is missing: install binutils")
    source = REPO / "imaging" / "boot-probe.S"
    subprocess.run(["as", "--32", "-o", tmp_path / "probe.o", source], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                    "-o", tmp_path / "probe.bin", tmp_path / "probe.o"], check=True)
    assert (tmp_path / "probe.bin").read_bytes() == boot.PROBE_SECTOR


def test_the_accelerator_is_probed_once_and_tcg_boots_the_probe(tmp_path, monkeypatch):
    requires_qemu_and_payload()
    assert boot.probe(boot.TCG)
    cache = tmp_path / "accelerator.json"
    first = boot.accelerator(cache)
    assert first in (boot.KVM, boot.TCG)
    if os.access("/dev/kvm", os.R_OK | os.W_OK):
        assert json.loads(cache.read_text())["accelerator"] == first
        monkeypatch.setattr(boot, "probe", lambda accel: pytest.fail("probed again"))
        assert boot.accelerator(cache) == first


def test_a_raw_and_a_used_mode_image_boot_to_the_login_prompt_with_bios(disks, tmp_path):
    raw = _image(disks["bios"], tmp_path / "store")
    done = imaging("boot", raw, "--json", "--screenshot", tmp_path / "raw.png", "-q")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["verdict"], result["firmware"]) == ("booted", "bios")
    assert result["accelerator"] in ("kvm", "tcg") and 0 < result["seconds"] < 120
    assert result["console"][-1].strip() == bootable.LOGIN_PROMPT
    assert result["detail"] == bootable.LOGIN_PROMPT
    picture = (tmp_path / "raw.png").read_bytes()
    assert picture.startswith(PNG_MAGIC) and boot._png_size(picture) == boot.TEXT_SCREEN
    used = _image(disks["bios"], tmp_path / "used-store", mode="used")
    booted = boot.boot(used)
    assert (booted.verdict, booted.firmware) == (boot.BOOTED, boot.BIOS)
    assert booted.screenshot is None


def test_a_gpt_disk_with_an_efi_system_partition_boots_with_uefi(disks, tmp_path):
    image = _image(disks["uefi"], tmp_path / "store")
    result = boot.boot(image, screenshot=tmp_path / "uefi.png")
    assert (result.verdict, result.firmware) == (boot.BOOTED, boot.UEFI)
    assert (tmp_path / "uefi.png").read_bytes().startswith(PNG_MAGIC)


def test_no_boot_code_and_a_corrupted_kernel_are_failures_with_a_screenshot(disks, tmp_path):
    blank = boot.boot(_image(disks["blank"], tmp_path / "store"), timeout=60)
    assert (blank.verdict, blank.detail) == (
        boot.NO_BOOTLOADER, "the firmware started the disk's boot code, which is all zeros")
    corrupt = _image(disks["corrupt"], tmp_path / "store")
    done = imaging("boot", corrupt, "--timeout", "60", "--screenshot", tmp_path / "shot.png",
                   "-q", check=False)
    assert done.returncode == 1
    assert re.fullmatch(rf"{re.escape(str(corrupt))}: panic in [0-9.]+ s \(bios, (kvm|tcg)\): "
                        r"-- System halted", done.stdout.strip().splitlines()[-1])
    assert (tmp_path / "shot.png").read_bytes().startswith(PNG_MAGIC)


def test_a_bad_expectation_or_firmware_is_one_clear_line(disks, tmp_path):
    image = _image(disks["bios"], tmp_path / "store")
    bad = imaging("boot", image, "--expect", "login[", check=False)
    assert bad.stderr.strip() == ("imaging: error: the expected text 'login[' is no regular "
                                  "expression: unterminated character set at position 5")
    assert imaging("boot", image, "--firmware", "coreboot", check=False).returncode == 2


def _qemu_of(work_prefix: str) -> list[int]:
    """The qemu processes whose command line names a boot test's work folder."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                line = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if line.startswith(boot.QEMU.encode()) and work_prefix.encode() in line:
                found.append(int(entry.name))
    return found


def test_prune_and_gc_spare_a_booting_image_and_a_cancel_leaves_nothing(disks, tmp_path):
    store = tmp_path / "store"
    older = _image(disks["bios"], store)
    newer = _image(disks["bios"], store)
    temporary = Path(os.environ.get("TMPDIR", "/tmp"))
    before = set(temporary.glob("imaging-boot-*"))
    running = subprocess.Popen(
        [sys.executable, "-m", "imaging", "boot", str(older), "--expect", "never printed",
         "-q"], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _qemu_of("imaging-boot-"), timeout=60, what="qemu to start")
        result = prune(store, older.parent.name, Retention(last=1))
        assert result.deferred == [older] and older.is_dir()
        collect(store)
        assert verify(older).ok and newer.is_dir()
        running.send_signal(signal.SIGTERM)
        _, errors = running.communicate(timeout=30)
    finally:
        if running.poll() is None:
            running.kill()
            running.wait()
    assert running.returncode != 0 and "cancelled" in errors
    wait_for(lambda: not _qemu_of("imaging-boot-"), timeout=10, what="qemu to stop")
    assert set(temporary.glob("imaging-boot-*")) == before
    assert prune(store, older.parent.name, Retention(last=1)).removed == [older]


def test_a_qcow2_export_boots_the_same_way(disks, tmp_path):
    image = _image(disks["bios"], tmp_path / "store")
    out = tmp_path / "bios.qcow2"
    imaging("export", image, out, "--format", "qcow2", "-q")
    result = boot.boot_file(out, disk_format="qcow2")
    assert (result.verdict, result.detail) == (boot.BOOTED, bootable.LOGIN_PROMPT)


def test_a_console_is_read_on_from_where_it_was_and_only_its_tail_kept(tmp_path):
    log = tmp_path / "serial.log"
    tail = boot._Tail(log)
    assert tail.read() == b""
    log.write_bytes(b"a" * (boot.TAIL_BYTES + 10) + b"\nlogin: ")
    assert tail.read() == (b"a" * (boot.TAIL_BYTES + 10) + b"\nlogin: ")[-boot.TAIL_BYTES:]
    with open(log, "ab") as more:
        more.write(b"root\n")
    assert tail.read().endswith(b"\nlogin: root\n") and len(tail.read()) == boot.TAIL_BYTES
    assert tail.size == boot.TAIL_BYTES + 10 + len(b"\nlogin: root\n")


def test_a_disk_file_that_names_another_file_is_refused(tmp_path):
    if shutil.which("qemu-img") is None:
        requirement_missing("qemu-img is missing: install qemu-utils")
    secret = tmp_path / "host-file"
    secret.write_bytes(b"not the guest's" * 1000)
    backed = tmp_path / "backed.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "raw", "-b", secret,
                    backed], check=True)
    with pytest.raises(ImagingError, match="names other files"):
        boot.boot_file(backed, disk_format="qcow2")
