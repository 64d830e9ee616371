"""`python -m imaging`: the engine's command line.

Exit codes: 0 success, 1 failure, 2 usage error. Failures print one line on
stderr; a traceback means a bug, never bad input.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import getpass
import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Iterator, Optional

from .backup import MODES, backup
from .boot import DEFAULT_EXPECT, DEFAULT_TIMEOUT, FIRMWARES, boot
from .base import rclone
from .base.errors import BadKey, Cancelled, ImagingError, SourceInUse, StoreError
from .base.progress import Progress
from .base.tools import parse_size
from .datastore import codec, keyring, keys
from .datastore.catalog import ImageRecord, list_images
from .datastore.image import protect, unprotect
from .datastore.keyring import KEY_FILE_VARIABLE, PASSPHRASE_VARIABLE
from .datastore.remote import RemoteStore, split_image
from .disks import layout, lvm
from .disks.inventory import inventory
from .export import FORMATS as EXPORT_FORMATS
from .export import ZSTD, export
from .gc import DEFAULT_SAFETY_MARGIN, collect
from .importer import import_archive
from .prune import Retention, prune
from .reading.files import COVERED, extract, list_files, printable
from .reading.mount import mount
from .recompress import recompress
from .rehome import rehome
from .report import JsonLines, TerminalBar, human_bytes
from .restore import restore
from .sync import sync
from .verify import MISSING, verify


def _progress(args: argparse.Namespace, phase: str) -> Progress:
    if getattr(args, "json_progress", False):
        callback = JsonLines()
    elif sys.stderr.isatty() and not getattr(args, "quiet", False):
        callback = TerminalBar()
    else:
        callback = None
    progress = Progress(phase, 0, callback)
    # SIGTERM (a service manager stopping us) cancels cleanly between chunks.
    signal.signal(signal.SIGTERM, lambda *_: progress.cancel.set())
    return progress


def cmd_disks(args: argparse.Namespace) -> int:
    print(json.dumps(inventory(), indent=2))
    return 0


def cmd_layout(args: argparse.Namespace) -> int:
    if not os.path.exists(args.source):
        raise ImagingError(f"cannot open source {args.source}: no such file or directory")
    table = layout.dump(args.source)
    if table is None:
        raise ImagingError(f"{args.source} has no partition table")
    sys.stdout.write(table)
    return 0


def cmd_backup(args: argparse.Namespace) -> int:
    result = backup(args.source, args.store, disk_id=args.disk, level=args.level,
                    mode=args.mode, force=args.force, deltas=not args.no_deltas,
                    progress=_progress(args, "backup"),
                    encrypt_with=args.held_key.fingerprint if args.held_key else None)
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        print(f"{human_bytes(result.size)} in {result.seconds:.1f} s "
              f"({human_bytes(result.size / max(result.seconds, 1e-9))}/s): "
              f"stored {human_bytes(result.stored_bytes)}, new {human_bytes(result.new_bytes)}"
              + (f", UNREADABLE {human_bytes(result.bad_bytes)} (zero-filled, see badblocks.map)"
                 if result.bad_bytes else ""))
        print(result.image)
    return 0


def cmd_restore(args: argparse.Namespace) -> int:
    result = restore(args.image, args.target, verify=not args.no_verify,
                     progress=_progress(args, "restore"), partition=args.partition,
                     grow=args.grow)
    rate = human_bytes(result.size / max(result.seconds, 1e-9))
    what, compared = ("", "every chunk") if result.partition is None else \
        (f" of partition {result.partition}", "every byte")
    print(f"restored {human_bytes(result.size)}{what} to {result.target} in "
          f"{result.seconds:.1f} s ({rate}/s), "
          f"{f'verified: {compared} matches' if result.verified else 'not verified'}")
    if result.relocated:
        print("moved the GPT backup header to the end of the target")
    if result.grown_size is not None:
        print(f"grew the last partition and its filesystem to {human_bytes(result.grown_size)}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    # A remote's chunks are read only when asked: that downloads the whole image.
    read_data = args.read_data or not args.remote
    result = verify(args.image, fsck=args.fsck, read_data=read_data,
                    progress=_progress(args, "verify"))
    name = args.remote or result.image
    for problem in result.problems:
        print(f"chunk {problem.digest}: {problem.reason}"
              + ("" if problem.reason == MISSING or args.remote else " (set aside as .bad)"))
    for check in result.filesystems or ():
        print(f"{check.said}: {printable(check.detail)}")
    if not result.ok:
        print(f"{name}: {len(result.problems)} of {result.chunks} chunks bad", file=sys.stderr)
        return 1
    print(f"{name}: all {result.chunks} distinct chunks intact" if read_data else
          f"{name}: all {result.chunks} distinct chunks there (not read: --read-data "
          "downloads and checks them)")
    if result.filesystems_clean is False:
        dirty = [check.shown for check in result.filesystems if check.result == "dirty"]
        print(f"{name}: filesystem check failed on {', '.join(dirty)}", file=sys.stderr)
        return 1
    return 0


def cmd_boot(args: argparse.Namespace) -> int:
    result = boot(args.image, timeout=args.timeout, expect=args.expect, firmware=args.firmware,
                  screenshot=args.screenshot, progress=_progress(args, "boot"))
    if args.json:
        print(json.dumps(result.as_dict()))
    else:
        for line in result.console:
            print(f"  {line}")
        print(f"{args.remote or result.image}: {result.verdict} in {result.seconds:.1f} s "
              f"({result.firmware}, {result.accelerator}): {result.detail}")
    return 0 if result.booted else 1


def _stop_on_sigterm() -> None:
    """SIGTERM ends the command through its clean-up (unmounting), as Ctrl-C does."""
    def stop(*_) -> None:
        raise Cancelled("stopped by SIGTERM")
    signal.signal(signal.SIGTERM, stop)


def cmd_mount(args: argparse.Namespace) -> int:
    def mounted(names: list[str]) -> None:
        print(f"{args.image} mounted read-only at {args.dir}: {', '.join(names)} "
              f"(umount {args.dir} or Ctrl-C ends it)", flush=True)

    def failed(error: ImagingError) -> None:
        print(f"imaging: error: {error} (the reading program got an I/O error)",
              file=sys.stderr, flush=True)

    result = mount(args.image, args.dir, on_mounted=mounted, on_error=failed)
    print(f"unmounted {result.mountpoint} after {result.seconds:.0f} s; read "
          f"{human_bytes(result.chunk_bytes_read)} of chunks")
    return 0


def cmd_files(args: argparse.Namespace) -> int:
    _stop_on_sigterm()
    listing = list_files(args.image, args.partition, args.path)
    if args.json:
        print(json.dumps(listing.as_dict(), indent=2))
        return 0
    for entry in listing.entries:
        kind = {"directory": stat.S_IFDIR, "symlink": stat.S_IFLNK, "file": stat.S_IFREG}
        mode = stat.filemode(kind.get(entry.type, 0) | entry.mode)
        name = printable(entry.name) + (f" -> {printable(entry.target)}" if entry.target else "")
        print(f"{mode}  {entry.size:>12}  {entry.mtime or '-':<20}  {name}")
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    progress = _progress(args, "extract")
    _stop_on_sigterm()
    result = extract(args.image, args.partition, args.paths, args.to, overwrite=args.overwrite,
                     progress=progress)
    for skipped in result.skipped:
        print(f"not extracted: {printable(skipped['path'])}: {skipped['reason']}")
    print(f"extracted {result.files} files ({human_bytes(result.bytes)}), {result.directories} "
          f"folders and {result.symlinks} symbolic links into {result.to} in "
          f"{result.seconds:.1f} s; read {human_bytes(result.chunk_bytes_read)} of chunks")
    if result.skipped:
        print(f"imaging: error: {len(result.skipped)} entries not extracted", file=sys.stderr)
        return 1
    return 0


def _list_row(record: ImageRecord) -> tuple[str, ...]:
    if record.size is None:
        return (record.disk_id, record.stamp, "-", "-", "-", "-", "-", "-",
                f"unreadable: {record.error}")
    if record.error:
        verified = "unreadable record"
    elif record.verified:
        verified = f"{'ok' if record.verify_ok else 'FAILED'} {record.verified_at}"
    else:
        verified = "no"
    return (record.disk_id, record.stamp, human_bytes(record.size),
            human_bytes(record.stored_bytes), human_bytes(record.new_bytes), record.mode,
            "yes" if record.mounted_rw else "no", verified,
            record.status + (", protected" if record.protected else ""))


def cmd_list(args: argparse.Namespace) -> int:
    records = list_images(args.store, args.disk)
    if args.json:
        print(json.dumps([record.as_dict() for record in records], indent=2))
    elif records:
        rows = [("DISK", "IMAGE", "SIZE", "STORED", "NEW", "MODE", "MOUNTED RW", "VERIFIED",
                 "STATUS")] + [_list_row(record) for record in records]
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
    else:
        print(f"no images in {args.remote or args.store}")
    # Listed with the others, and still a failure: something in the datastore is damaged.
    damaged = [record.error for record in records if record.error]
    if damaged:
        raise ImagingError(damaged[0] + (f" (and {len(damaged) - 1} more damaged images)"
                                         if len(damaged) > 1 else ""))
    return 0


def cmd_protect(args: argparse.Namespace) -> int:
    now = dt.datetime.now(dt.timezone.utc)
    if rclone.is_remote(args.image):
        root, image = split_image(rclone.remote_of(args.image))
        RemoteStore(root).protect(image, args.note or "", now)
    else:
        protect(Path(args.image).resolve(), args.note or "", now)
    print(f"{args.image}: protected: prune and deletion keep it until `imaging unprotect`")
    return 0


def cmd_unprotect(args: argparse.Namespace) -> int:
    if rclone.is_remote(args.image):
        root, image = split_image(rclone.remote_of(args.image))
        was = RemoteStore(root).unprotect(image)
    else:
        was = unprotect(Path(args.image).resolve())
    print(f"{args.image}: {'no longer protected' if was else 'was not protected'}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    result = import_archive(args.files, args.store, disk_id=args.disk, level=args.level,
                            progress=_progress(args, "import"))
    print(f"imported {human_bytes(result.size)} in {result.seconds:.1f} s: "
          f"stored {human_bytes(result.stored_bytes)}, new {human_bytes(result.new_bytes)}")
    print(result.image)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    split_size = parse_size(args.split) if args.split is not None else None
    result = export(args.image, args.out, level=args.level, long_distance=args.long,
                    split_size=split_size, progress=_progress(args, "export"),
                    format=args.format)
    for path in result.files:
        print(path)
    return 0


def cmd_recompress(args: argparse.Namespace) -> int:
    result = recompress(args.image, args.level, progress=_progress(args, "recompress"))
    change = (result.after - result.before) / result.before if result.before else 0.0
    print(f"{result.image}: {result.chunks} chunks re-encoded at level {result.level} "
          f"in {result.seconds:.1f} s: {human_bytes(result.before)} before, "
          f"{human_bytes(result.after)} after ({change:+.1%})")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    retention = Retention(last=args.keep_last, hourly=args.keep_hourly, daily=args.keep_daily,
                          weekly=args.keep_weekly, monthly=args.keep_monthly,
                          yearly=args.keep_yearly)
    result = prune(args.store, args.disk, retention, dry_run=args.dry_run,
                   progress=_progress(args, "prune"))
    gone = "would remove" if args.dry_run else "removed"
    for decision in result.decisions:
        if decision.image in result.deferred:
            verdict = "deferred"
        else:
            verdict = "keep" if decision.keep else gone
        print(f"{verdict:<12}  {decision.image.name}  {decision.reason}".rstrip())
    count = sum(not d.keep for d in result.decisions)
    print(f"{gone} {count} of {len(result.decisions)} images of {args.disk}"
          + (f", deferred {len(result.deferred)} being read" if result.deferred else "")
          + ("; `gc` frees their chunks" if result.removed else ""))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    result = collect(args.store, safety_margin=args.safety_margin,
                     progress=_progress(args, "gc"))
    print(f"freed {human_bytes(result.freed_bytes)}: {result.removed} unreferenced chunks, "
          f"{result.bad_removed} corrupt (.bad) chunks, {result.temp_removed} leftovers of "
          f"interrupted jobs")
    print(f"kept {result.referenced} chunks referenced by {result.images} images"
          + (f", and {result.kept_recent} unreferenced ones a running or recent backup may use"
             if result.kept_recent else ""))
    return 0


def cmd_sync(args: argparse.Namespace) -> int:
    result = sync(args.source, args.destination, disks=args.disk, last=args.last,
                  bwlimit=args.bwlimit, progress=_progress(args, "sync"))
    if args.json:
        print(json.dumps(result.as_dict()))
        return 0
    for name in result.copied:
        print(f"copied {name}")
    print(f"{len(result.copied)} images copied to {result.destination}, "
          f"{len(result.present)} there already: sent {result.chunks_sent} chunks "
          f"({human_bytes(result.bytes_sent)}), {result.chunks_present} there already, "
          f"in {result.seconds:.1f} s")
    return 0


def cmd_rehome(args: argparse.Namespace) -> int:
    result = rehome(args.store)
    for old, new in result.moved:
        print(f"moved {old} to {new}")
    for problem in result.deferred:
        print(f"not yet: {problem}")
    for problem in result.left:
        print(f"left: {problem}")
    print(f"{len(result.moved)} images moved, {len(result.deferred)} to move on a later run, "
          f"{len(result.left)} left where they are")
    return 0


KEY_VARIABLE = "IMAGING_KEY"
NEW_PASSPHRASE_VARIABLE = "IMAGING_NEW_PASSPHRASE"


def _passphrase(path: str) -> Optional[str]:
    """The passphrase of a protected key file: IMAGING_PASSPHRASE, else asked at a terminal."""
    if PASSPHRASE_VARIABLE in os.environ:
        return os.environ[PASSPHRASE_VARIABLE]
    if not keys.is_protected(path):
        return None
    if not sys.stdin.isatty():
        raise BadKey(f"key file {path} is protected by a passphrase: set {PASSPHRASE_VARIABLE}")
    return getpass.getpass(f"Passphrase of {path}: ")


def _new_passphrase(variable: str) -> Optional[str]:
    """A passphrase for a key file: from `variable`, else typed twice at a terminal (empty:
    none), else none."""
    if variable in os.environ:
        return os.environ[variable] or None
    if not sys.stdin.isatty():
        return None
    first = getpass.getpass("New passphrase (empty: none): ")
    if first and getpass.getpass("Again: ") != first:
        raise BadKey("the two passphrases differ: nothing changed")
    return first or None


def cmd_key_create(args: argparse.Namespace) -> int:
    passphrase = _new_passphrase(PASSPHRASE_VARIABLE)
    key = keys.create(args.file, passphrase)
    protected = "protected by a passphrase" if passphrase is not None else \
        "not protected by a passphrase: keep the file where only root reads it"
    print(f"created key {key.fingerprint} in {args.file}, {protected}")
    print("print it with `imaging key show --paper` and keep the paper apart from the disks")
    return 0


def cmd_key_show(args: argparse.Namespace) -> int:
    key = keys.load(args.file, _passphrase(args.file))
    if args.paper:
        import segno  # here: its import costs every other command 20 ms at start

        print(PAPER.format(fingerprint=key.fingerprint, file=args.file))
        segno.make(key.text(), error="m").terminal(compact=True)
    else:
        print(f"fingerprint {key.fingerprint}")
    print(key.text())
    return 0


PAPER = """\
IMAGING DATASTORE KEY  {fingerprint}
(from {file})

Whoever holds this key reads every image of the datastores it encrypts; without
it, nobody does, the owner included. Keep this paper apart from the disks.

Restore an image with stock tools (a shell, openssl, zstd, dd, od and tr):
  IMAGING_KEY='<the line below>' sh IMAGE/RESTORE.txt /dev/sdX
Make a key file of it again (for the app and the workers):
  IMAGING_KEY='<the line below>' imaging key import FILE
"""


def cmd_key_import(args: argparse.Namespace) -> int:
    text = os.environ.get(KEY_VARIABLE) or sys.stdin.readline()
    key = keys.save(args.file, keys.from_text(text), _new_passphrase(PASSPHRASE_VARIABLE))
    print(f"key {key.fingerprint} written to {args.file}")
    return 0


def cmd_key_change_passphrase(args: argparse.Namespace) -> int:
    old = _passphrase(args.file)
    new = None if args.no_passphrase else _new_passphrase(NEW_PASSPHRASE_VARIABLE)
    if new is None and not args.no_passphrase:
        # Never a key left unprotected by a missing variable or a silent terminal.
        raise BadKey(f"no new passphrase ({NEW_PASSPHRASE_VARIABLE}, or typed): nothing "
                     "changed; --no-passphrase removes the protection")
    key = keys.change_passphrase(args.file, old, new)
    now = "now without a passphrase" if new is None else "now protected by the new passphrase"
    print(f"key {key.fingerprint} in {args.file}: {now}")
    return 0


def _level(text: str) -> int:
    try:
        return codec.check_level(int(text))
    except ImagingError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imaging", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in (_disk_commands, _store_commands, _key_commands):
        group(functools.partial(_command, commands))
    return parser


def _command(commands, name: str, handler, help_text: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    sub.set_defaults(handler=handler)
    return sub


def with_key(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--key", metavar="FILE",
                     help=f"the key file of an encrypted datastore (default: {KEY_FILE_VARIABLE}"
                          f"; a passphrase from {PASSPHRASE_VARIABLE} or asked)")


def _held_key(args: argparse.Namespace) -> Optional[keys.Key]:
    """The key the command's --key (or IMAGING_KEY_FILE) names, held for any store of it."""
    if "key" not in args:
        return None
    path = args.key or os.environ.get(KEY_FILE_VARIABLE)
    return keyring.load(path, _passphrase(path)) if path else None


# The commands that read a remote datastore (mounted read-only), by the argument naming it:
# an image (rclone:REMOTE/images/DISK/STAMP) or a datastore (rclone:REMOTE).
READS_REMOTE = {"restore": "image", "verify": "image", "export": "image", "files": "image",
                "extract": "image", "boot": "image", "list": "store"}
# What each registers as at the remote while it reads an image (prune spares the image).
READER_KINDS = {"restore": "restore", "verify": "verify", "export": "export", "files": "mount",
                "extract": "mount", "boot": "boot"}
# The commands that reach an rclone: remote themselves.
TAKES_REMOTE = {"sync", "prune", "gc", "protect", "unprotect"}


@contextlib.contextmanager
def _remote_mounted(args: argparse.Namespace) -> Iterator[None]:
    """Where the command names a datastore or an image on an rclone: remote, that remote
    mounted read-only while it runs, the argument pointing into the mount, and a reader of
    an image registered there; `args.remote` is the name to show (None for a local one)."""
    args.remote = None
    named = [value for value in vars(args).values() if rclone.is_remote(value)]
    if not named or args.command in TAKES_REMOTE:
        yield
        return
    attribute = READS_REMOTE.get(args.command)
    place = getattr(args, attribute, None) if attribute else None
    if not rclone.is_remote(place):
        raise StoreError(f"{args.command} takes a datastore folder, not an rclone: remote "
                         "(on a remote: list, verify, restore, export, files, extract, prune, "
                         "gc, protect, unprotect, and sync to and from it)")
    remote = rclone.remote_of(place)
    root, image = (remote, None) if attribute == "store" else split_image(remote)
    store = RemoteStore(root)
    store.check_datastore()
    with contextlib.ExitStack() as held:
        if image is not None:
            name = image.partition("/")[2]
            # Not required: the disaster drill may hold read-only credentials.
            held.enter_context(store.register(READER_KINDS[args.command],
                                              f"{args.command} {name}", images=[name],
                                              required=False))
        point = held.enter_context(rclone.mounted(root))
        args.remote = rclone.shown(place)
        setattr(args, attribute, str(point if image is None else point / image))
        yield


REMOTE_STORE_HELP = "datastore folder, or rclone:REMOTE for one rclone reaches"
REMOTE_IMAGE_HELP = "image directory, or rclone:REMOTE/images/DISK/STAMP"


def partition_or_volume(text: str) -> int | str:
    """A partition's number, or a logical volume's VG/LV."""
    if text.isdigit():
        return int(text)
    if lvm.VOLUME_NAME.fullmatch(text):
        return text
    raise argparse.ArgumentTypeError(f"{text!r} is neither a partition number nor VG/LV")


def with_progress(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--json-progress", action="store_true",
                     help="progress as JSON lines on stderr")
    sub.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def _disk_commands(add) -> None:
    """This host's disks, and an image's way back to one: back up, restore, verify, read."""
    add("disks", cmd_disks, "inventory of this host's disks, as JSON")

    sub = add("layout", cmd_layout, "print the partition table as `sfdisk --dump` does")
    sub.add_argument("source")

    sub = add("backup", cmd_backup, "take a new image of a disk")
    sub.add_argument("source", help="block device or disk-image file")
    sub.add_argument("--store", required=True, help="datastore directory (created if absent)")
    sub.add_argument("--disk", help="disk id (default: from WWN/serial/by-id)")
    sub.add_argument("--level", type=_level, default=codec.DEFAULT_LEVEL, help="zstd level")
    sub.add_argument("--mode", choices=MODES, default="raw",
                     help="raw: every sector; used: only the blocks filesystems use "
                          "(free space restores as zeros)")
    sub.add_argument("--force", action="store_true",
                     help="image the disk even while a partition of it is mounted read-write "
                          "(the image may mix moments and is marked mounted_rw)")
    sub.add_argument("--no-deltas", action="store_true",
                     help="store changed chunks whole, not as deltas against the previous "
                          "image's: the image then needs no bytes it does not hold, so once "
                          "older images are pruned, gc removes what only they held (the old "
                          "blocks of deleted files included)")
    sub.add_argument("--json", action="store_true", help="print the result as one JSON object")
    with_progress(sub)
    with_key(sub)

    sub = add("restore", cmd_restore, "write an image to a disk or file; onto a larger disk, "
              "a GPT's backup header is moved to the end (a dos label needs nothing)")
    sub.add_argument("image", help="image directory")
    sub.add_argument("target", help="block device or file")
    sub.add_argument("--no-verify", action="store_true", help="skip reading the target back")
    sub.add_argument("--partition", type=int, metavar="N",
                     help="write only partition N of the image, onto a partition-sized target")
    sub.add_argument("--grow", action="store_true",
                     help="grow the last partition and its ext2/3/4 filesystem to fill a larger "
                          "target")
    with_progress(sub)
    with_key(sub)

    sub = add("verify", cmd_verify, "re-hash every chunk an image needs")
    sub.add_argument("image")
    sub.add_argument("--fsck", action="store_true",
                     help="also check every partition's and logical volume's filesystem, "
                          "read-only (e2fsck -fn, fsck.vfat -n, ntfsfix -n, xfs_repair -n, "
                          "btrfs check --readonly), and record the result")
    sub.add_argument("--read-data", action="store_true",
                     help="of an image on an rclone: remote, download and check every chunk "
                          "(without it, only see that each is there); always done on a folder")
    with_progress(sub)
    with_key(sub)

    sub = add("boot", cmd_boot, "boot an image in a throwaway VM (qemu; nothing written, no "
              "network) and say whether it comes up; exit status 0 only if it booted")
    sub.add_argument("image")
    sub.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, metavar="S",
                     help="seconds to wait for a verdict (default %(default)g)")
    sub.add_argument("--expect", default=DEFAULT_EXPECT, metavar="REGEX",
                     help="what the console or the screen shows once it is up (default: a "
                          "login prompt, %(default)s)")
    sub.add_argument("--firmware", choices=FIRMWARES,
                     help="default: uefi for a GPT disk with an EFI system partition, else bios")
    sub.add_argument("--screenshot", metavar="FILE", help="write the last screen as a PNG")
    sub.add_argument("--json", action="store_true",
                     help="the result as one JSON object on the last line")
    with_progress(sub)
    with_key(sub)

    sub = add("mount", cmd_mount, "expose an image read-only through FUSE as DIR/disk and "
              "DIR/p1, DIR/p2, ... until `umount DIR` or Ctrl-C")
    sub.add_argument("image", help="image directory")
    sub.add_argument("dir", help="an existing directory to mount it on")
    with_key(sub)

    sub = add("files", cmd_files, f"list a folder of a partition without mounting it "
              f"(reads {COVERED})")
    sub.add_argument("image", help="image directory")
    sub.add_argument("partition", type=partition_or_volume,
                     help="partition number, or an LVM logical volume as VG/LV (vg0/root)")
    sub.add_argument("path", nargs="?", default="/", help="folder or file (default: /)")
    sub.add_argument("--json", action="store_true", help="print the listing as one JSON object")
    with_key(sub)

    sub = add("extract", cmd_extract, "copy files or folders out of a partition without "
              f"mounting it, with their modes and times (reads {COVERED})")
    sub.add_argument("image", help="image directory")
    sub.add_argument("partition", type=partition_or_volume,
                     help="partition number, or an LVM logical volume as VG/LV (vg0/root)")
    sub.add_argument("paths", nargs="+", metavar="PATH", help="file or folder in the partition")
    sub.add_argument("--to", required=True, metavar="DIR",
                     help="where they go (created if absent); nothing is written outside it")
    sub.add_argument("--overwrite", action="store_true", help="replace files that exist")
    with_progress(sub)
    with_key(sub)


def _store_commands(add) -> None:
    """A datastore's images: list, import, export, recompress, prune, gc, sync, rehome."""
    sub = add("list", cmd_list, "images per disk")
    sub.add_argument("--store", required=True)
    sub.add_argument("--disk", help="only this disk's images")
    sub.add_argument("--json", action="store_true", help="print a JSON list of image records")
    with_key(sub)

    sub = add("import", cmd_import, "ingest a classic backup: dd | gzip (maybe split), 7z, xz, "
              "zstd or a raw image, with the .sf and .mbr files beside it")
    sub.add_argument("files", nargs="+", metavar="FILE",
                     help="the archive, or all parts of a split one in any order")
    sub.add_argument("--store", required=True, help="datastore directory (created if absent)")
    sub.add_argument("--disk", required=True, help="disk id the image is filed under")
    sub.add_argument("--level", type=int, default=codec.DEFAULT_LEVEL, help="zstd level")
    with_progress(sub)
    with_key(sub)

    sub = add("export", cmd_export, "write an image as one standard zstd stream "
              "(restore: cat OUT.* | zstd -d | dd of=/dev/sdX), or as a VM's disk")
    sub.add_argument("image", help="image directory")
    sub.add_argument("out", help="output file (parts are OUT.aa, OUT.ab, ... with --split)")
    sub.add_argument("--level", type=int, default=codec.DEFAULT_LEVEL, help="zstd level")
    sub.add_argument("--long", action="store_true",
                     help="long-distance matching over a 128 MiB window (plain zstd -d still decodes)")
    sub.add_argument("--split", metavar="SIZE",
                     help="cut into parts of SIZE: 2G or 2GiB (powers of 1024), 2GB (of 1000)")
    sub.add_argument("--format", choices=EXPORT_FORMATS, default=ZSTD,
                     help="zstd: the stream (default); qcow2, vmdk, vhdx: a sparse VM disk, "
                          "through qemu-img")
    with_progress(sub)
    with_key(sub)

    sub = add("recompress", cmd_recompress, "re-encode the chunks an image needs at another level")
    sub.add_argument("image", help="image directory")
    sub.add_argument("--level", type=int, required=True, help="zstd level")
    with_progress(sub)
    with_key(sub)

    sub = add("prune", cmd_prune, "remove a disk's images that no --keep rule keeps "
              "(Proxmox Backup Server's rules)")
    sub.add_argument("--store", required=True, help=REMOTE_STORE_HELP)
    sub.add_argument("--disk", required=True)
    for rule in ("last", "hourly", "daily", "weekly", "monthly", "yearly"):
        sub.add_argument(f"--keep-{rule}", type=int, default=0, metavar="N")
    sub.add_argument("--dry-run", action="store_true", help="only show what would be removed")
    with_progress(sub)

    sub = add("gc", cmd_gc, "delete chunks no image references, never one a running job may "
              "still need")
    sub.add_argument("--store", required=True, help=REMOTE_STORE_HELP)
    sub.add_argument("--safety-margin", type=float, default=DEFAULT_SAFETY_MARGIN, metavar="SECONDS",
                     help="also keep chunks touched this long before the oldest running backup "
                          f"or import started, for clock skew between hosts (default "
                          f"{DEFAULT_SAFETY_MARGIN:.0f}, not negative)")
    with_progress(sub)

    sub = add("sync", cmd_sync, "copy the images a second datastore lacks, and only the "
              "chunks it lacks; an image appears there once all it needs is there")
    sub.add_argument("source", help="datastore to copy from: a folder, or rclone: and a "
                     "remote path (a pull, from a NAS)")
    sub.add_argument("destination", help="datastore to copy to (created if absent): a folder, "
                     "or rclone: and a remote path rclone takes (rclone:nas:backups/store)")
    sub.add_argument("--disk", action="append", metavar="ID",
                     help="only this disk's images (repeat for more)")
    sub.add_argument("--last", type=int, metavar="N", help="only the newest N images of each disk")
    sub.add_argument("--bwlimit", metavar="RATE",
                     help="at most this rate to an rclone: remote, as rclone takes it (10M)")
    sub.add_argument("--json", action="store_true", help="print the result as one JSON object")
    with_progress(sub)
    with_key(sub)

    sub = add("protect", cmd_protect, "keep an image whatever prune's rules say, and refuse "
              "its deletion, until unprotected (its datastore's key is not needed)")
    sub.add_argument("image", help=REMOTE_IMAGE_HELP)
    sub.add_argument("--note", help="why, shown with it (\"before the upgrade\")")

    sub = add("unprotect", cmd_unprotect, "let prune and deletion remove an image again")
    sub.add_argument("image", help=REMOTE_IMAGE_HELP)

    sub = add("rehome", cmd_rehome, "move the images of disks an older engine named without "
              "their host (dev-vda, QEMU's serials) to their host's disk id")
    sub.add_argument("--store", required=True)
    with_key(sub)


def _key_commands(add) -> None:
    sub = add("key", None, "make and show the key of an encrypted datastore")
    key_commands = sub.add_subparsers(dest="key_command", required=True, metavar="KEY_COMMAND")

    def add_key(name: str, handler, help_text: str) -> argparse.ArgumentParser:
        key_sub = key_commands.add_parser(name, help=help_text, description=help_text)
        key_sub.set_defaults(handler=handler)
        key_sub.add_argument("file", help="the key file")
        return key_sub

    add_key("create", cmd_key_create, "make a new random key in a new file readable by its "
            f"owner only; with {PASSPHRASE_VARIABLE} set (or typed), protected by it")
    key_sub = add_key("show", cmd_key_show, "print the key's fingerprint and, last, the key as "
                      "one line of text")
    key_sub.add_argument("--paper", action="store_true",
                         help="as a page to print and keep: instructions, a QR code, the line")
    add_key("import", cmd_key_import, f"make a key file of a key's line of text (from "
            f"{KEY_VARIABLE}, or the first line of standard input), as `key show` prints it")
    key_sub = add_key("change-passphrase", cmd_key_change_passphrase,
                      f"protect the key file by a new passphrase ({NEW_PASSPHRASE_VARIABLE}, "
                      "or typed)")
    key_sub.add_argument("--no-passphrase", action="store_true",
                         help="remove the protection: the key lies in the file as it is")


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.held_key = _held_key(args)
        with _remote_mounted(args):
            return args.handler(args)
    except keyring.KeyNeeded as exc:
        where = getattr(args, "remote", None) or exc.where
        print(f"imaging: error: {where} is encrypted with key {exc.fingerprint}: give its "
              f"key file with --key FILE or {KEY_FILE_VARIABLE}{exc.given}" if exc.where else
              f"imaging: error: {exc}", file=sys.stderr)
        return 1
    except SourceInUse as exc:
        # The library says "force it"; on the command line that is a flag.
        print(f"imaging: error: {exc} (--force)", file=sys.stderr)
        return 1
    except ImagingError as exc:
        print(f"imaging: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("imaging: interrupted", file=sys.stderr)
        return 1
