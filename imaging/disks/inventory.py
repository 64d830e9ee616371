"""This host's disks: block devices from `lsblk --json`, plus configured disk-image files.

A disk's id must survive reboots and cabling changes, so it comes from the WWN,
the serial number or a /dev/disk/by-id name, never from /dev/sdX alone. It must
also differ from every other host's disks, which share one datastore and one
catalog: a disk with none of those, or with QEMU's, which repeat on every VM, is
named with its host (see host_local_id), as disk files and loop devices are.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
from pathlib import Path
from typing import Optional

from ..base import tools
from ..base.errors import SourceError, reason
from . import layout

LSBLK_COLUMNS = ("NAME,PATH,KNAME,MAJ:MIN,TYPE,SIZE,MODEL,SERIAL,WWN,TRAN,RO,RM,LOG-SEC,"
                 "MOUNTPOINTS,START,FSTYPE,LABEL,PARTLABEL")
BY_ID = Path("/dev/disk/by-id")
# The kernel counts a partition's START in 512-byte units whatever the disk's sector size.
KERNEL_SECTOR = 512


def host_name() -> str:
    return os.environ.get("HOST_NAME") or socket.gethostname()


def configured_disk_files() -> list[str]:
    return [p for p in os.environ.get("IMAGING_DISK_FILES", "").split(":") if p]


def safe_id(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._:+-]+", "_", text.strip()).strip("_.") or "disk"


def _lsblk(path: Optional[str] = None) -> list[dict]:
    arguments = ["--json", "--bytes", "--output", LSBLK_COLUMNS, *([path] if path else [])]
    result = tools.run("lsblk", "util-linux", arguments, kind=SourceError, text=True,
                       failure="lsblk failed")
    try:
        devices = json.loads(result.stdout).get("blockdevices", [])
        if not all(isinstance(device, dict) and "name" in device and "path" in device
                   for device in devices):
            raise ValueError("a device without a name or path")
    except (ValueError, AttributeError, TypeError) as exc:
        raise SourceError(f"unexpected JSON from lsblk ({exc})") from None
    return devices


def _mountpoints(device: dict) -> list[str]:
    points = [m for m in device.get("mountpoints") or [] if m]
    for child in device.get("children") or []:
        points.extend(_mountpoints(child))
    return points


def _by_id_name(device_path: str) -> Optional[str]:
    target = os.path.realpath(device_path)
    try:
        links = list(BY_ID.iterdir())
    except OSError:
        return None  # no udev (a container, a rescue system): the other ids must do
    names = sorted(link.name for link in links
                   if os.path.realpath(link) == target and not link.name.startswith("nvme-eui"))
    return names[0] if names else None


def _loop_backing_file(kname: str) -> Optional[str]:
    backing = Path("/sys/block") / kname / "loop" / "backing_file"
    try:
        return backing.read_text().strip() or None
    except OSError:
        return None


def _emulated_by_qemu(model: Optional[str], by_id: Optional[str] = None) -> bool:
    """Whether a disk is one QEMU emulates (IDE, SATA, SCSI, NVMe): its identities repeat
    across machines. QEMU gives every VM the same default serials ("QM00001" on the
    first IDE or SATA disk; Proxmox's virtio-scsi disks show the drive's name,
    "drive-scsi0"), and a cloned VM copies whatever serial or WWN its config sets."""
    return (model or "").startswith("QEMU") or "QEMU" in (by_id or "")


def host_local_id(host: str, name: str, model: Optional[str], serial: Optional[str]) -> str:
    """The id of a disk whose identity is unique on its host only, `name` its kernel name:
    QEMU's serial where it has one (it names the drive's slot, steadier than sdX),
    else the kernel name; both under the host's name, like file and loop disks."""
    if serial and _emulated_by_qemu(model):
        return safe_id(f"qemu-{host}-{serial}")
    return safe_id(f"dev-{host}-{name}")


# An older engine's id of a disk with nothing but a kernel name (which holds no "-").
_HOST_LESS_DEVICE_ID = re.compile(r"^dev-([^-]+)$")


def host_less(disk_id: str, model: Optional[str] = None) -> bool:
    """Whether `disk_id` is how an older engine named a disk, of `model` if known, that
    host_local_id now names with its host."""
    return bool(_HOST_LESS_DEVICE_ID.match(disk_id)) or (
        _emulated_by_qemu(model, disk_id) and not disk_id.startswith(("qemu-", "dev-")))


def rehomed_id(disk_id: str, identity: dict) -> Optional[str]:
    """The id this engine gives a disk an older one named `disk_id` without its host, by
    what an image's manifest (or the catalog) records of it: `identity` with its host,
    model, serial and path. None if `disk_id` is no such id, or the host is unknown."""
    host, model, serial = identity.get("host"), identity.get("model"), identity.get("serial")
    if not host or not host_less(disk_id, model):
        return None
    device = _HOST_LESS_DEVICE_ID.match(disk_id)
    name = device[1] if device else Path(identity.get("path") or "").name
    return host_local_id(host, name, model, serial) if serial or name else None


def _block_disk(device: dict) -> dict:
    wwn = (device.get("wwn") or "").strip() or None
    serial = (device.get("serial") or "").strip() or None
    model = (device.get("model") or "").strip() or None
    backing = _loop_backing_file(device.get("kname") or device["name"])
    if _emulated_by_qemu(model):
        disk_id = host_local_id(host_name(), device["name"], model, serial)
    elif wwn:
        disk_id = safe_id(f"wwn-{wwn}")
    elif serial:
        disk_id = safe_id(f"{model or 'disk'}_{serial}")
    elif (by_id := _by_id_name(device["path"])) and not _emulated_by_qemu(None, by_id):
        disk_id = safe_id(by_id)
    elif backing:
        disk_id = safe_id(f"loop-{host_name()}-{Path(backing).name}")
    else:
        # Nothing but the kernel's name: every VM has a /dev/vda.
        disk_id = host_local_id(host_name(), device["name"], model, serial)
    points = _mountpoints(device)
    return {
        "id": disk_id, "path": device["path"], "type": device.get("type"),
        "model": model, "serial": serial, "wwn": wwn, "size": int(device.get("size") or 0),
        "sector_size": int(device.get("log-sec") or 512), "transport": device.get("tran"),
        "read_only": bool(device.get("ro")), "removable": bool(device.get("rm")),
        "mounted": bool(points), "mountpoints": points, "backing_file": backing,
        "host": host_name(),
    }


def _file_disk(path: str) -> dict:
    real = os.path.realpath(path)
    try:
        size = os.stat(real).st_size
    except OSError as exc:
        raise SourceError(f"cannot use disk file {path}: {reason(exc)}") from None
    return {
        # A file's name is unique on its host only: two hosts may each have a "vm.img".
        "id": safe_id(f"file-{host_name()}-{Path(real).name}"), "path": real, "type": "file",
        "model": None, "serial": None, "wwn": None, "size": size, "sector_size": 512,
        "transport": None, "read_only": not os.access(real, os.W_OK), "removable": False,
        "mounted": False, "mountpoints": [], "backing_file": None, "host": host_name(),
    }


def inventory() -> list[dict]:
    """Every whole disk of this host and every configured disk file, with its partitions.

    A configured path may also be a block device lsblk does not call a disk
    (a loop device over a VM's disk image): it is described as a block device.
    """
    # zram is compressed memory, and an empty slot (card reader) holds nothing to image.
    devices = [d for d in _lsblk() if d.get("type") == "disk" and int(d.get("size") or 0) > 0
               and not d["name"].startswith("zram")]
    disks = []
    for device in devices:
        disk = _block_disk(device)
        disk["partitions"] = listed_partitions(device)
        disks.append(disk)
    listed = {disk["path"] for disk in disks}
    for path in configured_disk_files():
        if os.path.exists(path) and os.path.realpath(path) not in listed:
            disk = identify(path)
            disk["partitions"] = read_partitions(disk["path"], disk["size"])
            disks.append(disk)
    return disks


def listed_partitions(device: dict) -> list[dict]:
    """What overwriting a disk destroys, as lsblk lists it: each partition's place (bytes),
    filesystem and label, or the filesystem filling the whole disk.

    From what the kernel and udev know, without reading the disk: the inventory
    runs every minute, and must not wake a spun-down disk to do so.
    """
    found = [{"name": child["name"], "start": int(child.get("start") or 0) * KERNEL_SECTOR,
              "size": int(child.get("size") or 0), "fstype": child.get("fstype"),
              "label": child.get("label") or child.get("partlabel")}
             for child in device.get("children") or [] if child.get("type") == "part"]
    if not found and device.get("fstype"):
        found = [{"name": device["name"], "start": 0, "size": int(device.get("size") or 0),
                  "fstype": device["fstype"], "label": device.get("label")}]
    return found


def read_partitions(path: str, size: int) -> list[dict]:
    """The partitions of a disk file or a loop device, read from it: sfdisk's table, each
    filesystem as blkid finds it in place (the kernel has no partitions of a file, nor
    of a loop device without partition scanning). [] if the table cannot be read."""
    try:
        found = [{"name": Path(entry.get("node") or "").name,
                  "start": entry["start"] * entry["sectorsize"],
                  "size": entry["size"] * entry["sectorsize"], "fstype": None,
                  "label": entry.get("name")} for entry in layout.partitions(path)]
        if not found:
            # No partition table: a filesystem may fill the whole disk.
            fstype, label = _probe(path, 0, size)
            return [{"name": Path(path).name, "start": 0, "size": size, "fstype": fstype,
                     "label": label}] if fstype else []
        for entry in found:
            fstype, label = _probe(path, entry["start"], entry["size"])
            entry["fstype"], entry["label"] = fstype, label or entry["label"]
    except SourceError:
        return []
    return found


def _probe(path: str, start: int, size: int) -> tuple[Optional[str], Optional[str]]:
    """(TYPE, LABEL) of the filesystem blkid finds at start..start+size, (None, None) if none."""
    result = tools.run("blkid", "util-linux", ["--probe", "--output", "export", "--offset",
                                               str(start), "--size", str(size), path],
                       kind=SourceError, text=True)
    if result.returncode != 0:
        return None, None
    found = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return found.get("TYPE"), found.get("LABEL")


def identify(path: str) -> dict:
    """The identity of one source (block device or disk file) for its manifest."""
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise SourceError(f"cannot open source {path}: {reason(exc)}") from None
    if stat.S_ISBLK(mode):
        devices = _lsblk(path)
        if not devices:
            raise SourceError(f"{path}: lsblk does not know this device")
        return _block_disk(devices[0])
    return _file_disk(path)
