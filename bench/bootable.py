"""Bootable disks for the demo, the tests and the benchmark: a tiny Linux from Debian's
packages that prints a login banner to the screen and the serial port, then waits.

The payload (`python -m bench.bootable PAYLOAD_DIR`, run by `make install`; nothing is
downloaded later): the kernel image of Debian's linux-image-amd64 package (fetched with
`apt-get download`, unpacked with dpkg-deb; the package is never installed) and an
initramfs holding busybox-static and bench/boot-init.sh as /init.

- `make_bios_bootable(disk, partition)`: the kernel and initramfs in /boot of the ext4
  `partition`, extlinux installed there, syslinux's MBR code in the disk's first 440
  bytes and the partition marked active: SeaBIOS boots it as a PC boots a disk.
- `build_uefi_disk(path, size)`: a GPT disk whose EFI system partition (FAT, made with
  mtools) holds systemd-boot as the removable-media loader (EFI/BOOT/BOOTX64.EFI), the
  kernel and initramfs, and a loader entry: OVMF boots it as a PC's firmware does.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from bench.system import MiB, SECTOR, mounted, read_partitions, run
from imaging.base.tools import loop_device

REPO_ROOT = Path(__file__).resolve().parent.parent
PAYLOAD_DIR = REPO_ROOT / "build" / "boot"
KERNEL_NAME = "vmlinuz"
INITRD_NAME = "initrd.img"
INIT_SCRIPT = Path(__file__).resolve().parent / "boot-init.sh"
KERNEL_PACKAGE = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
MBR_CODE = Path("/usr/lib/syslinux/mbr/mbr.bin")
MBR_CODE_SIZE = 440
SYSTEMD_BOOT = Path("/usr/lib/systemd/boot/efi/systemd-bootx64.efi")
# What the banner ends with: the prompt the boot tests wait for.
LOGIN_PROMPT = "imaging-demo login:"
KERNEL_OPTIONS = "console=tty0 console=ttyS0,115200 quiet"
EXTLINUX_CONF = f"""DEFAULT linux
PROMPT 0
TIMEOUT 0
LABEL linux
  LINUX /boot/{KERNEL_NAME}
  INITRD /boot/{INITRD_NAME}
  APPEND {KERNEL_OPTIONS}
"""
LOADER_CONF = "default imaging.conf\ntimeout 0\n"
LOADER_ENTRY = f"""title imaging boot test
linux /{KERNEL_NAME}
initrd /{INITRD_NAME}
options {KERNEL_OPTIONS}
"""
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
ESP_START = MiB


def payload(directory: Path = PAYLOAD_DIR) -> tuple[Path, Path]:
    """(kernel, initramfs) built by `make install`; RuntimeError naming the command if not."""
    kernel, initrd = directory / KERNEL_NAME, directory / INITRD_NAME
    if not (kernel.is_file() and initrd.is_file()):
        raise RuntimeError(f"no boot payload in {directory}: run `make install` "
                           f"(or python -m bench.bootable {directory})")
    return kernel, initrd


def build_payload(directory: Path) -> None:
    """The kernel from Debian's linux-image package and an initramfs of busybox, each
    written under a temporary name and renamed once whole."""
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="payload-", dir=directory) as scratch:
        scratch = Path(scratch)
        package = _kernel_package()
        run(["apt-get", "download", "-q", package], cwd=scratch)
        deb = next(scratch.glob(f"{package}_*.deb"))
        unpacked = scratch / "unpacked"
        unpacked.mkdir()
        run(["sh", "-c", 'dpkg-deb --fsys-tarfile "$0" | tar -x -C "$1" --wildcards '
                         "'./boot/vmlinuz-*'", str(deb), str(unpacked)])
        kernel, = (unpacked / "boot").glob("vmlinuz-*")
        root = scratch / "initramfs"
        for folder in ("bin", "dev", "proc", "sys"):
            (root / folder).mkdir(parents=True)
        shutil.copy2(BUSYBOX, root / "bin" / "busybox")
        shutil.copy2(INIT_SCRIPT, root / "init")
        os.chmod(root / "init", 0o755)
        initrd = scratch / INITRD_NAME
        with open(initrd, "wb") as out:
            subprocess.run(["sh", "-c", "find . | cpio -o -H newc --quiet | gzip -9"],
                           cwd=root, stdout=out, check=True)
        shutil.move(kernel, directory / KERNEL_NAME)
        initrd.replace(directory / INITRD_NAME)


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on (linux-image-6.1.0-NN-amd64)."""
    depends = run(["apt-cache", "depends", KERNEL_PACKAGE]).stdout
    for line in depends.splitlines():
        name = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and name.startswith("linux-image-"):
            return name
    raise RuntimeError(f"apt-cache knows no kernel that {KERNEL_PACKAGE} depends on")


def make_bios_bootable(disk: Path, number: int, directory: Path = PAYLOAD_DIR) -> None:
    """Make the disk boot (BIOS) into the payload from its ext4 partition `number`."""
    kernel, initrd = payload(directory)
    part = next(part for part in read_partitions(disk) if part.number == number)
    with loop_device(disk, part.offset, part.size) as device, mounted(device) as root:
        boot = root / "boot"
        (boot / "extlinux").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(kernel, boot / KERNEL_NAME)
        shutil.copyfile(initrd, boot / INITRD_NAME)
        (boot / "extlinux" / "extlinux.conf").write_text(EXTLINUX_CONF)
        run(["extlinux", "--install", str(boot / "extlinux")])
    with open(disk, "r+b") as out:
        out.write(MBR_CODE.read_bytes()[:MBR_CODE_SIZE])
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", "--activate", str(disk),
         str(number)])


def build_uefi_disk(path: Path, size: int = 64 * MiB, directory: Path = PAYLOAD_DIR) -> None:
    """A GPT disk of one EFI system partition that boots (UEFI) into the payload."""
    kernel, initrd = payload(directory)
    with open(path, "wb") as out:
        out.truncate(size)
    # GPT keeps 33 sectors at the end for its backup header.
    sectors = (size - ESP_START) // SECTOR - 34
    run(["sfdisk", "--quiet", "--no-reread", "--no-tell-kernel", str(path)],
        input=f"label: gpt\nstart={ESP_START // SECTOR}, size={sectors}, type={ESP_TYPE}\n")
    image = f"{path}@@{ESP_START}"
    run(["mformat", "-i", image, "-T", str(sectors), "-h", "64", "-s", "32",
         "-H", str(ESP_START // SECTOR), "-v", "ESP", "::"])
    run(["mmd", "-i", image, "::/EFI", "::/EFI/BOOT", "::/loader", "::/loader/entries"])
    with tempfile.TemporaryDirectory(prefix="esp-") as scratch:
        files = {Path(scratch, "loader.conf"): "::/loader/loader.conf",
                 Path(scratch, "imaging.conf"): "::/loader/entries/imaging.conf"}
        Path(scratch, "loader.conf").write_text(LOADER_CONF)
        Path(scratch, "imaging.conf").write_text(LOADER_ENTRY)
        files |= {SYSTEMD_BOOT: "::/EFI/BOOT/BOOTX64.EFI", kernel: f"::/{KERNEL_NAME}",
                  initrd: f"::/{INITRD_NAME}"}
        for source, target in files.items():
            run(["mcopy", "-i", image, str(source), target])


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.bootable", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", type=Path, nargs="?", default=PAYLOAD_DIR,
                        help=f"where the payload goes (default {PAYLOAD_DIR})")
    directory = parser.parse_args().directory
    build_payload(directory)
    print(f"boot payload: {', '.join(str(path) for path in payload(directory))}")


if __name__ == "__main__":
    main()
