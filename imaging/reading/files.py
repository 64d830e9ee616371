"""Files from an image's partitions and logical volumes.

An image's filesystem is untrusted input: a kernel driver meeting a crafted
one may crash or worse. The partition is exposed read-only through a private
FUSE mount (mount.privately_mounted) and read by the filesystem's own
user-space tools: e2fsprogs' debugfs (catastrophic mode: no bitmaps read) for
ext2/3/4, mtools for FAT, ntfs-3g's ntfsls, ntfsinfo and ntfscat for NTFS.
XFS and Btrfs, which have no such tools, are mounted by the kernel read-only
in a mount namespace of their own (_KernelMounted; docs/architecture.md,
"Files from XFS and Btrfs", says what that risks). Other filesystems get one
clear error. An ext4 file's data is copied (or
streamed) from where debugfs's extent map puts it, straight from the image's
chunks; everything else goes through the tools.

A FileSession opens a partition once (the datastore's reader registration, the
reader, the mount, blkid's probe) for any number of lookups, listings, reads
and extracts; list_files and extract are one session each.

Extracting writes only under the target directory, whatever the image holds:
every name is a single path component checked here (never empty, ".", ".."
or holding "/"; other odd bytes are kept as they are), every file is created
relative to its parent directory's descriptor with O_EXCL and O_NOFOLLOW,
directories are entered with O_NOFOLLOW, and symbolic links are recreated as
links and never followed. Tools never name a file on this side: they write
into descriptors this module opened (/dev/fd/N). Files get their permission
bits (without set-user/group-ID) and times; owners are the extracting user's.
An existing file is replaced only with `overwrite`, through a temporary file
renamed over it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import errno
import datetime as dt
import os
import re
import secrets
import select
import signal
import stat
import subprocess
import tempfile
import time
import weakref
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional, Sequence, TypeVar

from ..base import tools
from ..base.errors import Cancelled, ImagingError, TargetError, describe
from ..base.pipeline import ordered_map
from ..base.progress import Progress
from ..base.syscalls import pwrite_all
from ..datastore import codec
from ..datastore.image import reading
from ..datastore.manifest import utc_text
from ..disks import usedmap
from . import mount
from .filesystems import EXT, identify
from .mount import ImageReader

FILE, DIRECTORY, SYMLINK, OTHER = "file", "directory", "symlink", "other"
COVERED = "ext2, ext3, ext4, FAT (vfat), NTFS, XFS and Btrfs"
# Directories listed, and files copied, per run of a tool.
BATCH = 128
_TYPES = {stat.S_IFREG: FILE, stat.S_IFDIR: DIRECTORY, stat.S_IFLNK: SYMLINK}
# Chunks read at once for a file's extents: more than the cores, so that reading
# chunk files from a cold page cache overlaps decompressing and checking others
# (on 2 cores, 100 MiB copied cold: 164 ms with 3, 149 with 4, 141 with 6).
COPY_WORKERS = max(6, os.cpu_count() or 1)
# How far into a partition blkid's probes read (its doubling LUKS2 header offsets).
BLKID_PROBE_REACH = 4 * 1024 * 1024
# Permission bits a copy gets: set-user-ID and set-group-ID stay behind.
COPIED_MODE_BITS = 0o1777
# The most a file's contents are handed over at once, as they are read.
STREAM_STEP = 1024 * 1024
Result = TypeVar("Result")


@dataclasses.dataclass(frozen=True)
class Node:
    """A directory entry as a filesystem's tool describes it."""

    name: bytes
    kind: str  # FILE, DIRECTORY, SYMLINK or OTHER
    size: int
    mode: int  # permission bits
    mtime_ns: Optional[int]
    atime_ns: Optional[int]
    handle: object  # how the tool finds it again: an inode number, a path
    target: Optional[bytes] = None  # a symlink's target, when the listing gave it


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str  # the stored bytes, decoded as file names are (undecodable bytes kept)
    type: str  # file, directory, symlink or other
    size: int
    mode: int  # permission bits
    mtime: Optional[str]  # UTC, ISO 8601
    target: Optional[str] = None  # where a symlink points

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Listing:
    image: str
    partition: int | str  # a partition's number, or a logical volume's name
    filesystem: str
    path: str
    entries: list[Entry]
    chunk_bytes_read: int  # raw bytes of the chunks decompressed to answer
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class ExtractResult:
    image: str
    partition: int | str  # a partition's number, or a logical volume's name
    filesystem: str
    to: str
    files: int
    directories: int
    symlinks: int
    bytes: int  # of the files' contents
    skipped: list[dict]  # {"path", "reason"} of each entry not extracted
    chunk_bytes_read: int  # raw bytes of the chunks decompressed to extract them
    seconds: float

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


# -- the filesystems' tools ----------------------------------------------------

class _Tool:
    """One filesystem's tools on one partition file."""

    name = ""
    case_insensitive = False
    # True when copying a file also sets its modification time, more precisely
    # than the listing gives it.
    copies_times = False

    def __init__(self, device: Path, reader: ImageReader, part: mount.Partition) -> None:
        self.device = device  # the partition as the private mount exposes it
        self.reader = reader  # the same bytes, for a tool that only maps where data lies
        self.part = part

    def root(self) -> Node:
        raise NotImplementedError

    def close(self) -> None:
        """Whatever the tool holds open, let go."""

    def list_dirs(self, dirs: Sequence[Node]) -> list[list[Node]]:
        """The entries of each directory, without "." and ".."."""
        raise NotImplementedError

    def child(self, directory: Node, name: bytes, *, details: bool = True) -> Optional[Node]:
        """The entry `name` of `directory`, or None.

        Without `details` (a folder on the way to the wanted entry), the node
        may lack what only matters for extracting or showing it: its times.
        """
        return self._match(self.list_dirs([directory])[0], name)

    def _match(self, children: Sequence[Node], name: bytes) -> Optional[Node]:
        match = next((child for child in children if child.name == name), None)
        if match is None and self.case_insensitive:
            folded = os.fsdecode(name).casefold()
            match = next((child for child in children
                          if os.fsdecode(child.name).casefold() == folded), None)
        return match

    def copy(self, jobs: Sequence[tuple[Node, int]]) -> dict[int, str]:
        """Write each file's contents into its descriptor; {job number: problem}."""
        raise NotImplementedError

    def link_target(self, node: Node) -> bytes:
        return node.target or b""

    def layouts(self, files: Sequence[Node]) -> dict:
        """Where the files' data lies, from one run for many where the tool can say so:
        {handle: what `contents` takes}, none for a file it copies (`contents` without one)."""
        return {}

    def reading_order(self, files: Sequence[Node], layouts: dict) -> list[Node]:
        """The files in the order their contents are quickest read one after the other."""
        return list(files)

    def chunks_read(self, files: Sequence[Node], layouts: dict) -> list[int]:
        """The image's chunks that reading the files' contents reads, in order, where the
        tool knows them."""
        return []

    def contents(self, node: Node, layout: object = None) -> Iterator[bytes]:
        """The file's node.size bytes, piece by piece; ImagingError if they cannot all be read.

        The tool copies the file into an unnamed temporary file (no name anyone
        could open, gone once closed), read back from there.
        """
        with tempfile.TemporaryFile() as copy:
            problems = self.copy([(node, copy.fileno())])
            if problems:
                raise ImagingError(problems[0])
            copy.seek(0)
            while piece := copy.read(STREAM_STEP):
                yield piece

    def _checked_copy(self, jobs, problems: dict[int, str], detail: str = "") -> dict[int, str]:
        """Add a problem for each copy whose size is not the file's: a short read."""
        for number, (node, fd) in enumerate(jobs):
            written = os.fstat(fd).st_size
            if number not in problems and written != node.size:
                problems[number] = (f"read {written} of its {node.size} bytes"
                                    + (f" ({detail})" if detail else ""))
        return problems




class _Ext(_Tool):
    """ext2/3/4 through debugfs, every entry found by inode number."""

    name = "ext"
    _block: Optional[int] = None
    ROOT_INODE = 2
    # Where the superblock keeps its magic number and the block size, and the
    # largest block size libext2fs opens (64 KiB).
    SUPERBLOCK, MAGIC, MAGIC_BYTES = 1024, 56, b"\x53\xef"
    _LOG_BLOCK_SIZE, _LARGEST_LOG_BLOCK_SIZE = 24, 6
    _STAT_TIME = {key: re.compile(rb"\b" + key + rb": 0x([0-9a-f]{1,8})(?::([0-9a-f]{1,8}))?")
                  for key in (b"mtime", b"atime")}
    _STAT_SIZE = re.compile(rb"\bSize: (\d+)")
    _FAST_LINK = b'Fast link dest: "'
    _ECHO = re.compile(rb"debugfs: ls -p <(\d+)>")
    # A leaf of `ex`: level/depth, entry/entries, logical and physical block ranges, length.
    _LEAF = re.compile(rb"^ *(?P<level>\d+)/ *(?P<depth>\d+) +\d+/ *\d+ +(?P<logical>\d+) *- *\d+ +"
                       rb"(?P<physical>\d+) *- *\d+ +(?P<length>\d+) *(?P<uninit>Uninit)?",
                       re.MULTILINE)
    _ENTRY = re.compile(rb"/(\d+)/([0-7]{6})/\d+/\d+/")
    _ENTRY_END = re.compile(rb"/(\d*)/\n(?=/\d+/[0-7]{6}/\d+/\d+/|debugfs: |\n|\Z)")

    def __init__(self, device: Path, reader: ImageReader, part: mount.Partition) -> None:
        super().__init__(device, reader, part)
        # Extent maps read along with a file's lookup: {inode: extents, or None without a tree}.
        self._maps: dict[int, Optional[list[tuple[int, int, int, bool]]]] = {}

    def _debugfs(self, commands: list[str], pass_fds: Iterable[int] = ()) -> tuple[bytes, bytes]:
        done = tools.run("debugfs", "e2fsprogs", ["-c", "-f", "-", str(self.device)],
                         input=("\n".join(commands) + "\n").encode(), pass_fds=pass_fds)
        if b"while trying to open" in done.stderr or b"Filesystem not open" in done.stderr:
            problem = next((line for line in done.stderr.decode(errors="replace").splitlines()
                            if "while trying to open" in line), tools.last_line(done.stderr))
            raise ImagingError(f"debugfs cannot open the filesystem: "
                               f"{problem.replace(str(self.device), 'the partition')}")
        return done.stdout, done.stderr

    def root(self) -> Node:
        return Node(b"/", DIRECTORY, 0, 0o755, None, None, self.ROOT_INODE)

    def list_dirs(self, dirs: Sequence[Node]) -> list[list[Node]]:
        found: dict[int, list[tuple[int, int, bytes, int]]] = {d.handle: [] for d in dirs}
        output, _ = self._debugfs([f"ls -p <{d.handle}>" for d in dirs])
        for directory, entry in self._parse_listings(output):
            if directory in found and entry[2] not in (b".", b"..") and entry[0]:
                found[directory].append(entry)
        entries = [entry for d in dirs for entry in found[d.handle]]
        details = self._stat([inode for inode, *_ in entries])
        return [[self._node(entry, details.get(entry[0], b"")) for entry in found[d.handle]]
                for d in dirs]

    def child(self, directory: Node, name: bytes, *, details: bool = True) -> Optional[Node]:
        """Only the entry found is looked at: one stat, not one for each of its siblings.

        A file's extent map comes in the same run as its stat, for the copy.
        """
        output, _ = self._debugfs([f"ls -p <{directory.handle}>"])
        entry = next((entry for _, entry in self._parse_listings(output)
                      if entry[2] == name and entry[0]), None)
        if entry is None:
            return None
        if not details:
            return self._node(entry, b"")
        inode, is_file = entry[0], stat.S_ISREG(entry[1])
        found = self._outputs([f"stat <{inode}>", *([f"ex <{inode}>"] if is_file else [])])
        if is_file:
            self._maps[inode] = self._extent_map(found[1])
        return self._node(entry, found[0] or b"")

    def _outputs(self, commands: list[str]) -> list[Optional[bytes]]:
        """What each command printed (None if debugfs did not get to it), in runs of BATCH * 8
        (as many at once as there are cores).

        debugfs echoes each command it reads ("debugfs: COMMAND"); a command's
        output runs to the next command's echo.
        """
        outputs: list[Optional[bytes]] = []
        batches = [commands[first:first + BATCH * 8]
                   for first in range(0, len(commands), BATCH * 8)]
        ran = ordered_map(lambda batch: self._debugfs(batch)[0], batches, name="debugfs")
        with contextlib.closing(ran):
            for batch, output in ran:
                found: list[tuple[int, int, int]] = []  # (command, its echo's start, its output's)
                position = 0
                for number, command in enumerate(batch):
                    echo = f"debugfs: {command}\n".encode()
                    start = output.find(echo, position)
                    if start >= 0:
                        position = start + len(echo)
                        found.append((number, start, position))
                texts: list[Optional[bytes]] = [None] * len(batch)
                ends = [start for _, start, _ in found[1:]] + [len(output)]
                for (number, _, begin), end in zip(found, ends):
                    texts[number] = output[begin:end]
                outputs.extend(texts)
        return outputs

    def _parse_listings(self, output: bytes) -> Iterator[tuple[int, tuple[int, int, bytes, int]]]:
        """(directory inode, (inode, mode, name, size)) of each entry `ls -p` printed.

        Each entry is /inode/mode/uid/gid/name/size/ and a newline, the name raw:
        a name ends at the first "/size/" and newline that the next entry (or
        the next command, or the end) follows. A name that holds "/" (only a
        damaged or crafted filesystem has one) is read whole and refused later.
        """
        directory, position = None, 0
        while position < len(output):
            echo = self._ECHO.match(output, position)
            head = self._ENTRY.match(output, position)
            if echo is not None:
                directory = int(echo.group(1))
            if head is None:
                newline = output.find(b"\n", position)
                position = len(output) if newline < 0 else newline + 1
                continue
            tail = self._ENTRY_END.search(output, head.end())
            if tail is None:
                return
            yield directory, (int(head.group(1)), int(head.group(2), 8),
                              output[head.end():tail.start()], int(tail.group(1) or 0))
            position = tail.end()

    def _stat(self, inodes: list[int]) -> dict[int, bytes]:
        """Each inode's `stat` text."""
        unique = list(dict.fromkeys(inodes))
        texts = self._outputs([f"stat <{inode}>" for inode in unique])
        return {inode: text for inode, text in zip(unique, texts) if text is not None}

    def _node(self, entry: tuple[int, int, bytes, int], details: bytes) -> Node:
        inode, mode, name, size = entry
        kind = _TYPES.get(stat.S_IFMT(mode), OTHER)
        if kind == DIRECTORY and (found := self._STAT_SIZE.search(details)):
            size = int(found.group(1))
        target = None
        if kind == SYMLINK and (start := details.find(self._FAST_LINK)) >= 0:
            start += len(self._FAST_LINK)
            target = details[start:start + size]
        return Node(name, kind, size, stat.S_IMODE(mode), self._time(details, b"mtime"),
                    self._time(details, b"atime"), inode, target)

    def _time(self, details: bytes, key: bytes) -> Optional[int]:
        """An inode time in nanoseconds: 32 signed bits, extended by ext4's extra field."""
        found = self._STAT_TIME[key].search(details)
        if found is None:
            return None
        seconds = int(found.group(1), 16)
        seconds -= (seconds & 0x80000000) << 1
        extra = int(found.group(2) or b"0", 16)
        return (seconds + ((extra & 3) << 32)) * 10**9 + (extra >> 2)

    def copy(self, jobs: Sequence[tuple[Node, int]]) -> dict[int, str]:
        """Files with an extent tree are copied from where debugfs maps them, the rest by dump.

        The map costs one small command per file; the data then comes straight
        from the image's chunks in large reads, without a 4 KiB round trip
        through FUSE per block (which is what `dump` costs).
        """
        maps = self._extents([node.handle for node, _ in jobs])
        dumped = [number for number, (node, _) in enumerate(jobs) if node.handle not in maps]
        problems = self._copy_extents([(number, node, fd, maps[node.handle])
                                       for number, (node, fd) in enumerate(jobs)
                                       if node.handle in maps])
        for first in range(0, len(dumped), BATCH):
            batch = [jobs[number] for number in dumped[first:first + BATCH]]
            _, errors = self._debugfs([f"dump <{node.handle}> /dev/fd/{fd}" for node, fd in batch],
                                      pass_fds=[fd for _, fd in batch])
            found = self._checked_copy(batch, {}, tools.last_line(errors))
            problems.update({dumped[first + number]: problem for number, problem in found.items()})
        return self._checked_copy(jobs, problems)

    def _block_size(self) -> int:
        """1024 << s_log_block_size, from the superblock debugfs opened: no run of its own."""
        if self._block is None:
            field = self.part.read(self.reader, self.SUPERBLOCK + self._LOG_BLOCK_SIZE, 4)
            log = int.from_bytes(field, "little")
            if log > self._LARGEST_LOG_BLOCK_SIZE:
                raise ImagingError(f"the superblock gives an impossible block size "
                                   f"(1 KiB << {log})")
            self._block = 1024 << log
        return self._block

    def _extents(self, inodes: list[int]) -> dict[int, list[tuple[int, int, int, bool]]]:
        """(logical block, physical block, blocks, written) of each extent-mapped inode's data.

        An inode without an extent tree (ext2/3 block maps, inline data) is left out.
        """
        unknown = [inode for inode in inodes if inode not in self._maps]
        texts = self._outputs([f"ex <{inode}>" for inode in unknown])
        maps = {**{inode: self._maps.pop(inode) for inode in inodes if inode in self._maps},
                **{inode: self._extent_map(text) for inode, text in zip(unknown, texts)}}
        return {inode: extents for inode, extents in maps.items() if extents is not None}

    def _extent_map(self, text: Optional[bytes]) -> Optional[list[tuple[int, int, int, bool]]]:
        """The leaves `ex` printed; None for an inode without an extent tree (dump copies it)."""
        if text is None or not text.startswith(b"Level Entries"):
            return None
        return [(int(leaf["logical"]), int(leaf["physical"]), int(leaf["length"]),
                 not leaf["uninit"])
                for leaf in self._LEAF.finditer(text) if leaf["level"] == leaf["depth"]]

    def _spans(self, node: Node, extents) -> list[tuple[int, int, int]]:
        """(offset in the file, offset in the image, length) of each written extent's bytes
        within the file's size; ImagingError for data outside the partition."""
        block = self._block_size()
        spans = []
        for logical, physical, length, written in extents:
            offset = logical * block
            if not written or offset >= node.size:
                continue
            count = min(length * block, node.size - offset)
            if physical * block + count > self.part.size:
                raise ImagingError("its data lies outside the partition "
                                   "(a damaged or crafted filesystem)")
            for start, piece in self.part.spans(physical * block, count):
                spans.append((offset, start, piece))
                offset += piece
        return spans

    def _copy_extents(self, jobs: list[tuple[int, Node, int, list]]) -> dict[int, str]:
        """Copy the written extents of (job number, file, descriptor, extents), each chunk
        they touch read (decompressed, checked) once for all the files; {job number: problem}.

        The extents are cut at chunk boundaries and gathered by chunk: a thread
        pool reads the chunks in the order they lie, no two threads waiting on the
        same one, and each thread writes its chunk's pieces into the files from a
        buffer the reader lends (see ImageReader.lent). An all-zero chunk is left
        as the holes the files already have there.
        """
        problems: dict[int, str] = {}
        # chunk position: [(descriptor, offset within the chunk, offset in the file, length)]
        pieces: dict[int, list[tuple[int, int, int, int]]] = collections.defaultdict(list)
        for number, node, fd, extents in jobs:
            try:
                spans = self._spans(node, extents)
            except ImagingError as problem:
                problems[number] = str(problem)
                continue
            for offset, source, count in spans:
                end = source + count
                while source < end:
                    position, within = divmod(source, self.reader.chunk_size)
                    piece = min(end - source, self.reader.chunk_size - within)
                    pieces[position].append((fd, within, offset, piece))
                    source, offset = source + piece, offset + piece
            os.ftruncate(fd, node.size)  # holes and unwritten extents read as zeros

        def copy(position: int) -> None:
            if self.reader.holds_zeros(position):
                return
            with self.reader.lent(position) as chunk:
                for fd, within, offset, length in pieces[position]:
                    pwrite_all(fd, chunk.span(within, length), offset)

        copied = ordered_map(copy, sorted(pieces), workers=COPY_WORKERS, name="extract")
        with contextlib.closing(copied):
            collections.deque(copied, maxlen=0)
        return problems

    def layouts(self, files: Sequence[Node]) -> dict:
        return self._extents([node.handle for node in files])

    def reading_order(self, files: Sequence[Node], layouts: dict) -> list[Node]:
        """As their data lies in the partition: a folder's files, in the order its entries
        happen to have, are scattered over its block groups, and read in that order each
        would want a chunk the reader's few decoded ones have just let go (a folder of
        2,000 files of 25 KiB in 4 MiB chunks: 481 chunks decompressed instead of 20)."""
        return sorted(files, key=lambda file: self._data_start(layouts.get(file.handle)))

    @staticmethod
    def _data_start(extents) -> tuple[bool, int]:
        """Where a file's data begins in the partition; files without a map last."""
        return (not extents, min(physical for _, physical, _, _ in extents) if extents else 0)

    def chunks_read(self, files: Sequence[Node], layouts: dict) -> list[int]:
        size = self.reader.chunk_size
        positions = []
        for file in files:
            with contextlib.suppress(ImagingError):  # the read says why
                for _, source, length in sorted(self._spans(file, layouts.get(file.handle, ()))):
                    positions.extend(range(source // size, (source + length - 1) // size + 1))
        return positions

    def contents(self, node: Node, layout: object = None) -> Iterator[bytes]:
        """A file with an extent tree straight from the image's chunks, in file order, with
        zeros for its holes and unwritten extents; any other through dump."""
        if layout is None:
            return super().contents(node)
        spans = sorted(self._spans(node, layout))
        if any(offset < previous + length for (previous, _, length), (offset, _, _)
               in zip(spans, spans[1:])):
            raise ImagingError("its extents overlap (a damaged or crafted filesystem)")
        return self._streamed(node, spans)

    def _streamed(self, node: Node, spans: list[tuple[int, int, int]]) -> Iterator[bytes]:
        position = 0
        for offset, source, length in [*spans, (node.size, 0, 0)]:
            while position < offset:  # a hole
                piece = min(offset - position, STREAM_STEP)
                yield codec.zeros(piece)
                position += piece
            end = source + length
            while source < end:
                within = source % self.reader.chunk_size
                piece = min(end - source, self.reader.chunk_size - within, STREAM_STEP)
                yield self.reader.pread(source, piece)
                source += piece
                position += piece

    def link_target(self, node: Node) -> bytes:
        if node.target is not None:
            return node.target
        # A long target lives in a data block: the link's contents.
        done = tools.run("debugfs", "e2fsprogs",
                         ["-c", "-R", f"cat <{node.handle}>", str(self.device)])
        return done.stdout


class _Fat(_Tool):
    """FAT through mtools, every entry found by its path (names are case-insensitive)."""

    name = "fat"
    case_insensitive = True
    copies_times = True
    # mdir: 8.3 name, size or <DIR>, date, time, then the long name if there is one.
    _LINE = re.compile(r"^(?P<base>.{8}) (?P<ext>.{3}) +(?P<size><DIR>|\d+) +"
                       r"(?P<date>\d{4}-\d\d-\d\d) +(?P<time>\d{1,2}:\d\d)")
    # mtools reads these as patterns in a path.
    _PATTERN = re.compile(r"[*?\[\]]")

    def _env(self) -> dict:
        # MTOOLS_SKIP_CHECK: a partition's geometry does not look like a floppy's.
        return dict(os.environ, MTOOLS_SKIP_CHECK="1", LC_ALL="C.UTF-8",
                    MTOOLS_DATE_STRING="yyyy-mm-dd")

    def root(self) -> Node:
        return Node(b"/", DIRECTORY, 0, 0o755, None, None, "::/")

    def list_dirs(self, dirs: Sequence[Node]) -> list[list[Node]]:
        return [self._list(d) for d in dirs]

    def _list(self, directory: Node) -> list[Node]:
        done = tools.run("mdir", "mtools", ["-a", "-i", str(self.device), directory.handle],
                         env=self._env())
        if done.returncode != 0:
            problem = tools.last_line(done.stderr).replace(str(self.device), "the partition")
            raise ImagingError(f"mdir cannot list {directory.handle[2:]}: {problem}")
        found = []
        for line in done.stdout.decode(errors="surrogateescape").splitlines():
            fields = self._LINE.match(line)
            if fields is None:
                continue
            rest, extension = line[fields.end():], fields["ext"].rstrip()
            name = rest[2:] if rest.startswith("  ") else \
                fields["base"].rstrip() + (f".{extension}" if extension else "")
            if name in (".", ".."):
                continue
            # FAT keeps local time, which mtools reads as such.
            mtime = _parsed_time(f"{fields['date']} {fields['time']}", "%Y-%m-%d %H:%M", None)
            is_dir = fields["size"] == "<DIR>"
            handle = directory.handle.rstrip("/") + "/" + name
            found.append(Node(os.fsencode(name), DIRECTORY if is_dir else FILE,
                              0 if is_dir else int(fields["size"]), 0o755 if is_dir else 0o644,
                              mtime, mtime, handle if not self._PATTERN.search(name) else None))
        return found

    def copy(self, jobs: Sequence[tuple[Node, int]]) -> dict[int, str]:
        problems: dict[int, str] = {}
        for number, (node, fd) in enumerate(jobs):
            done = tools.run("mcopy", "mtools", ["-n", "-m", "-i", str(self.device), node.handle,
                                                  f"/dev/fd/{fd}"], pass_fds=[fd], env=self._env())
            if done.returncode != 0:
                problems[number] = f"mcopy failed: {tools.last_line(done.stderr)}"
        return self._checked_copy(jobs, problems)


class _Ntfs(_Tool):
    """NTFS through ntfs-3g's tools, every entry found by its MFT record number."""

    name = "ntfs"
    case_insensitive = True
    ROOT_RECORD = 5
    # ntfsls -l -i: record, size, date (month day time year), name.
    _LINE = re.compile(rb"^\s*(\d+)\s+(\d+)\s+\w{3}\s+\d+\s+\d+:\d\d\s+\d{4}\s(.*?)(/?)$")
    _TIMES = {"mtime": re.compile(r"File Altered Time:\s+(.+?) UTC"),
              "atime": re.compile(r"Last Accessed Time:\s+(.+?) UTC")}

    def root(self) -> Node:
        return Node(b"/", DIRECTORY, 0, 0o755, None, None, (self.ROOT_RECORD, "/"))

    def list_dirs(self, dirs: Sequence[Node]) -> list[list[Node]]:
        return [[self._timed(node) for node in self._list(d)] for d in dirs]

    def child(self, directory: Node, name: bytes, *, details: bool = True) -> Optional[Node]:
        """Only the entry found gets its times: one ntfsinfo, not one for each of its siblings."""
        match = self._match(self._list(directory), name)
        return self._timed(match) if match is not None and details else match

    def _list(self, directory: Node) -> list[Node]:
        """The directory's entries, without their times."""
        record, path = directory.handle
        done = tools.run("ntfsls", "ntfs-3g",
                         ["-l", "-i", "-F", "-a", "-p", path, str(self.device)])
        if done.returncode != 0:
            raise ImagingError(f"ntfsls cannot list {path}: {tools.last_line(done.stderr)}")
        found = []
        for line in done.stdout.split(b"\n"):
            fields = self._LINE.match(line)
            if fields is None or fields.group(3) in (b".", b"..", b""):
                continue
            number, size, name, slash = int(fields.group(1)), int(fields.group(2)), \
                fields.group(3), fields.group(4)
            child = path.rstrip("/") + "/" + os.fsdecode(name)
            found.append(Node(name, DIRECTORY if slash else FILE, 0 if slash else size,
                              0o755 if slash else 0o644, None, None, (number, child)))
        return found

    def _timed(self, node: Node) -> Node:
        times = self._times(node.handle[0])
        return dataclasses.replace(node, mtime_ns=times.get("mtime"), atime_ns=times.get("atime"))

    def _times(self, record: int) -> dict[str, int]:
        done = tools.run("ntfsinfo", "ntfs-3g", ["-i", str(record), str(self.device)])
        text = done.stdout.decode(errors="replace")
        times = {}
        for key, pattern in self._TIMES.items():
            found = pattern.search(text)
            moment = found and _parsed_time(" ".join(found.group(1).split()),
                                            "%a %b %d %H:%M:%S %Y", dt.timezone.utc)
            if moment is not None:
                times[key] = moment
        return times

    def copy(self, jobs: Sequence[tuple[Node, int]]) -> dict[int, str]:
        problems: dict[int, str] = {}
        for number, (node, fd) in enumerate(jobs):
            done = tools.run("ntfscat", "ntfs-3g", ["-i", str(node.handle[0]), str(self.device)],
                             stdout=fd)
            if done.returncode != 0:
                problems[number] = f"ntfscat failed: {tools.last_line(done.stderr)}"
        return self._checked_copy(jobs, problems)


def _parsed_time(text: str, form: str, zone: Optional[dt.tzinfo]) -> Optional[int]:
    """A listed time in nanoseconds (local time without `zone`); None if it is no time."""
    try:
        moment = dt.datetime.strptime(text, form)
    except ValueError:
        return None
    moment = moment.replace(tzinfo=zone) if zone else moment.astimezone()
    return int(moment.timestamp()) * 10**9


class _KernelMounted(_Tool):
    """A filesystem through the kernel's own read-only mount, in a mount namespace of its
    own (docs/architecture.md, "Files from XFS and Btrfs", says why and what it risks).

    `unshare --mount` runs a shell that mounts the partition's file (from the image's
    private FUSE view, through a read-only loop device that goes with the mount) without
    replaying any log, without devices, set-user-ID or executables, then waits while this
    process keeps its standard input open: the mount exists only in that shell's
    namespace, read here through /proc/PID/root (the shell, not reaped before the session
    ends, keeps its id). Killing the shell's process group ends the namespace, the mount
    and the loop device."""

    OPTIONS = ""
    READY = b"mounted\n"
    MOUNT_WAIT = 30.0
    GONE_WAIT = 10.0
    # Holds the mount until its standard input ends: when the session closes it, or when
    # this process dies, however.
    SCRIPT = 'mount -t "$1" -o "loop,$2" "$3" "$4" && echo mounted && read -r _'

    def __init__(self, device: Path, reader: ImageReader, part: mount.Partition) -> None:
        super().__init__(device, reader, part)
        self._point = Path(tempfile.mkdtemp(prefix="imaging-fs-"))
        try:
            self._process = tools.started(
                "unshare", "util-linux",
                ["--mount", "--propagation", "private", "--", "sh", "-c", self.SCRIPT, "sh",
                 self.name, self.OPTIONS, str(device), str(self._point)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                start_new_session=True)
        except BaseException:
            self._point.rmdir()
            raise
        try:
            self._root = self._wait_for_mount()
        except BaseException:
            self.close()
            raise

    def _wait_for_mount(self) -> Path:
        ready, _, _ = select.select([self._process.stdout], [], [], self.MOUNT_WAIT)
        if ready and self._process.stdout.readline() == self.READY:
            return Path(f"/proc/{self._process.pid}/root") / self._point.relative_to("/")
        self._stop()
        problem = tools.last_line(self._process.stderr.read()) or "it did not come up in time"
        raise ImagingError(f"the kernel does not mount this {self.name}: "
                           f"{problem.replace(str(self.device), 'the partition')}")

    def _stop(self) -> None:
        if self._process.returncode is None:  # once reaped, its id may be another's
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._process.pid, signal.SIGKILL)
            self._process.wait()

    def close(self) -> None:
        """The namespace ended, and with it the mount; back once its loop device let go of
        the partition's file (which the image's FUSE view then unmounts), or GONE_WAIT on."""
        self._stop()
        for stream in (self._process.stdin, self._process.stdout, self._process.stderr):
            stream.close()
        deadline = time.monotonic() + self.GONE_WAIT
        with contextlib.suppress(ImagingError):
            while tools.run("losetup", "util-linux", ["--noheadings", "--associated",
                                                      str(self.device)]).stdout.strip():
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)
        with contextlib.suppress(OSError):
            self._point.rmdir()

    def root(self) -> Node:
        return self._node(b"/", b"")

    def list_dirs(self, dirs: Sequence[Node]) -> list[list[Node]]:
        return [self._list(directory) for directory in dirs]

    def child(self, directory: Node, name: bytes, *, details: bool = True) -> Optional[Node]:
        """One lstat, not a listing: `name` is one checked component of a wanted path."""
        handle = self._handle(directory, name)
        try:
            return self._node(name, handle)
        except ImagingError:
            if os.path.lexists(self._path(handle)):
                raise
            return None

    @staticmethod
    def _handle(directory: Node, name: bytes) -> bytes:
        """The handle of the entry `name` of `directory`: its path, relative to the root."""
        return directory.handle + b"/" + name if directory.handle else name

    def _path(self, handle: bytes) -> Path:
        """Where the entry `handle` (its path in the filesystem, relative) is read."""
        return self._root / os.fsdecode(handle) if handle else self._root

    def _list(self, directory: Node) -> list[Node]:
        try:
            with os.scandir(self._path(directory.handle)) as entries:
                names = sorted(os.fsencode(entry.name) for entry in entries)
        except OSError as exc:
            raise ImagingError(f"cannot list /{os.fsdecode(directory.handle)}: "
                               f"{describe(exc)}") from None
        return [self._node(name, self._handle(directory, name)) for name in names]

    def _node(self, name: bytes, handle: bytes) -> Node:
        # Every name comes from a listing (one component, never . or ..) of a folder that
        # lstat called a folder: no path here goes through a link.
        path = self._path(handle)
        try:
            info = os.lstat(path)
            target = os.readlink(path) if stat.S_ISLNK(info.st_mode) else None
        except OSError as exc:
            raise ImagingError(f"cannot read /{os.fsdecode(handle)}: {describe(exc)}") from None
        kind = _TYPES.get(stat.S_IFMT(info.st_mode), OTHER)
        return Node(name, kind, info.st_size if kind == FILE else 0, stat.S_IMODE(info.st_mode),
                    info.st_mtime_ns, info.st_atime_ns, handle,
                    os.fsencode(target) if target is not None else None)

    def copy(self, jobs: Sequence[tuple[Node, int]]) -> dict[int, str]:
        problems: dict[int, str] = {}
        for number, (node, fd) in enumerate(jobs):
            try:
                source = os.open(self._path(node.handle),
                                 os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
                try:
                    if not stat.S_ISREG(os.fstat(source).st_mode):
                        raise OSError(errno.EINVAL, "not a regular file")
                    while os.sendfile(fd, source, None, STREAM_STEP):
                        pass
                finally:
                    os.close(source)
            except OSError as exc:
                problems[number] = f"cannot read it: {describe(exc)}"
        return self._checked_copy(jobs, problems)


class _Xfs(_KernelMounted):
    # nouuid: a copy of a filesystem this host has mounted has its UUID.
    name, OPTIONS = "xfs", "ro,norecovery,nouuid,nodev,nosuid,noexec"


class _Btrfs(_KernelMounted):
    name, OPTIONS = "btrfs", "ro,rescue=nologreplay,nodev,nosuid,noexec"


_TOOLS = {**{kind: _Ext for kind in EXT}, "vfat": _Fat, "ntfs": _Ntfs, "xfs": _Xfs,
          "btrfs": _Btrfs}


def _probed_chunks(reader: ImageReader, part: mount.Partition) -> list[int]:
    """The chunks blkid reads first, loaded in the background while the private mount comes
    up, rather than one after the other while blkid waits on each.

    blkid probes the partition's first 2 MiB (superblocks), offsets up to
    BLKID_PROBE_REACH (LUKS2's secondary headers) and its end (RAID
    signatures); the filesystems' tools start at the beginning too.
    """
    offsets = [start for offset in (0, min(BLKID_PROBE_REACH, part.size - 1), part.size - 1)
               for start, _ in part.spans(offset, 1)]
    return list(dict.fromkeys(offset // reader.chunk_size for offset in offsets))


# -- paths and names -------------------------------------------------------------

def _components(path: str) -> list[bytes]:
    """The names along `path` inside the filesystem; "/" is the root."""
    names = [name for name in os.fsencode(path).split(b"/") if name not in (b"", b".")]
    if b".." in names:
        raise ImagingError(f"{path}: a path inside the image may not hold '..'")
    return names


def safe_name(name: str | bytes) -> bool:
    """Is `name` one path component that stays where it is put?"""
    name = os.fsdecode(name)  # stored bytes as file names decode, never failing
    return name not in ("", ".", "..") and "/" not in name and "\0" not in name


def printable(text: str) -> str:
    """`text` with control characters and undecodable bytes escaped, safe on a terminal."""
    return "".join(ch if ch.isprintable() else
                   (f"\\x{ord(ch) - 0xDC00:02x}" if 0xDC80 <= ord(ch) <= 0xDCFF
                    else ch.encode("unicode_escape").decode()) for ch in text)


def _shown(names: Sequence[bytes]) -> str:
    return "/" + "/".join(os.fsdecode(name) for name in names)


def _lookup(tool: _Tool, names: list[bytes], where: str) -> Node:
    """The node at `names` in the partition or volume `where` ("partition 1") names."""
    node = tool.root()
    for depth, name in enumerate(names):
        if node.kind != DIRECTORY:
            raise ImagingError(f"{_shown(names[:depth])}: not a directory in {where}")
        match = tool.child(node, name, details=depth == len(names) - 1)
        if match is None:
            raise ImagingError(f"{_shown(names[:depth + 1])}: no such file or directory "
                               f"in {where}")
        node = match
    return node


def _entry(node: Node, tool: _Tool) -> Entry:
    mtime = None
    if node.mtime_ns is not None:
        mtime = utc_text(dt.datetime.fromtimestamp(node.mtime_ns / 10**9, dt.timezone.utc))
    target = os.fsdecode(tool.link_target(node)) if node.kind == SYMLINK else None
    return Entry(os.fsdecode(node.name), node.kind, node.size, node.mode, mtime, target)


# -- a session ------------------------------------------------------------------

class FileSession:
    """One partition of an image, opened once for as many lookups, listings, reads and
    extracts as its user needs, then closed.

    Opening registers the image's reader in the datastore, builds one
    ImageReader, mounts the image privately and has blkid probe the partition;
    every call then runs the filesystem's tool on that one mount. blkid's
    verdict picks the tool; while it probes, the first call already runs with
    debugfs if the superblock carries ext's magic (the common case), and that
    work is dropped if blkid finds anything else, two signatures included.

    close() (or leaving a `with` block) undoes it all; so does dropping the last
    reference to an open session, without waiting for Python's cycle collector:
    the web drops a response its client left unsent without closing it. One
    thread at a time.
    """

    def __init__(self, image_dir: os.PathLike | str, number: int | str, *,
                 progress: Optional[Progress] = None) -> None:
        self.number = number  # a partition's, or a logical volume's name ("vg0/root")
        self._started = time.monotonic()
        self._progress = progress or Progress("files", 0)
        self._undo = contextlib.ExitStack()
        self._closed = weakref.finalize(self, self._undo.close)
        self._refusal: Optional[ImagingError] = None
        try:
            image = self._undo.enter_context(reading(
                image_dir, "mount", self._progress, f" to read files of partition {number}"))
            self.image = str(image.path)
            self.reader = ImageReader(image, loans=COPY_WORKERS * 2)
            self._undo.callback(self.reader.stop_reading_ahead)
            part = mount.partition_or_volume(image, self.reader, number)
            self._shown = part.shown
            self.reader.read_ahead(_probed_chunks(self.reader, part))
            self._exposure = self._undo.enter_context(mount.privately_mounted(image, self.reader))
            device = self._exposure.path(part)
            pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="blkid")
            self._probing: Optional[concurrent.futures.Future] = pool.submit(identify, device)
            pool.shutdown(wait=False)
            # A probe still running when the session ends is waited for before the unmount.
            self._undo.callback(concurrent.futures.wait, [self._probing])
            magic = part.read(self.reader, _Ext.SUPERBLOCK + _Ext.MAGIC, 2)
            self._tool: Optional[_Tool] = (_Ext(device, self.reader, part)
                                           if magic == _Ext.MAGIC_BYTES else None)
            self._part, self._device = part, device
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self._closed()

    def __enter__(self) -> FileSession:
        return self

    def __exit__(self, *exc_info) -> None:
        if self._closed.detach():
            self._undo.__exit__(*exc_info)

    @property
    def filesystem(self) -> str:
        """What blkid found in the partition: ext4, vfat, ntfs, ..."""
        self._settled()
        return self._kind

    def _settled(self) -> _Tool:
        """The partition's tool, once blkid has said what the partition holds."""
        if self._probing is not None:
            kind, self._probing = self._probing.result(), None
            if kind == usedmap.LVM_MEMBER and self._part.volume:
                self._refusal = ImagingError(f"{self._shown} holds an LVM2 physical volume "
                                             "itself: volumes inside a volume are not read")
            elif kind == usedmap.LVM_MEMBER:
                names = ", ".join(volume.volume or "" for volume in
                                  mount.volumes([self._part], self.reader)) or "none"
                self._refusal = ImagingError(
                    f"{self._shown} is an LVM2 physical volume: name one of its linear "
                    f"logical volumes instead ({names})")
            elif kind not in _TOOLS:
                holds = f"holds {kind}" if kind else "holds no filesystem blkid recognises"
                self._refusal = ImagingError(f"{self._shown} {holds}: files and "
                                             f"extract read {COVERED}")
            elif not isinstance(self._tool, _TOOLS[kind]):
                self._tool = _TOOLS[kind](self._device, self.reader, self._part)
                self._undo.callback(self._tool.close)  # before the image's view goes
            self._kind = kind
        if self._refusal is not None:
            with self._exposure.checked():  # blkid may have found nothing for a failed read
                raise self._refusal
        return self._tool

    def _answer(self, question: Callable[[_Tool], Result]) -> Result:
        """What `question` makes of the partition's tool: asked of ext's at once while blkid
        probes, kept if blkid agrees, asked again of the right one if not."""
        guess = self._tool if self._probing is not None else None
        if guess is not None:
            try:
                with self._exposure.checked():
                    answer = question(guess)
            except ImagingError:
                if self._settled() is guess:
                    raise
            else:
                if self._settled() is guess:
                    return answer
        tool = self._settled()
        with self._exposure.checked():
            return question(tool)

    def lookup(self, path: str) -> Node:
        """The entry `path` names ("/" the root). Each folder on the way is looked up by the
        next name alone: whether the entry is a file or a folder is known without listing
        its own folder."""
        names = _components(path)
        return self._answer(lambda tool: _lookup(tool, names, self._shown))

    def children(self, folder: Node) -> list[Node]:
        """The entries of `folder`, in the order the filesystem keeps them."""
        return self._answer(lambda tool: tool.list_dirs([folder])[0])

    def entry(self, node: Node) -> Entry:
        return _entry(node, self._settled())

    def entries(self, folder: Node) -> list[Entry]:
        """The entries of `folder`, folders first, each group by name."""
        return sorted((self.entry(child) for child in self.children(folder)),
                      key=lambda entry: (entry.type != DIRECTORY, entry.name))

    def listing(self, path: str = "/") -> Listing:
        """The entries of folder `path` (or the one entry `path` names), folders first."""
        node = self.lookup(path)
        entries = self.entries(node) if node.kind == DIRECTORY else [self.entry(node)]
        return Listing(self.image, self.number, self.filesystem, _shown(_components(path)),
                       entries, self.reader.chunk_bytes_read, self._seconds())

    def read(self, file: Node) -> Iterator[bytes]:
        """The file's contents, exactly file.size bytes, piece by piece as they are asked for;
        ImagingError if they cannot all be read. Nothing is written anywhere for an ext file
        with an extent tree; other files pass through an unnamed temporary file."""
        tool = self._settled()
        layouts = {}
        if file.kind == FILE and file.handle is not None:
            with self._exposure.checked():
                layouts = tool.layouts([file])
            self.reader.read_ahead(tool.chunks_read([file], layouts))
        return self._read(tool, file, layouts.get(file.handle))

    def _read(self, tool: _Tool, file: Node, layout: object) -> Iterator[bytes]:
        if file.kind != FILE:
            raise ImagingError(f"{os.fsdecode(file.name)} is a {file.kind}, not a file")
        if file.handle is None:
            raise ImagingError(f"{os.fsdecode(file.name)}: a name the {tool.name} tools "
                               "cannot address")
        with self._exposure.checked():
            pieces = tool.contents(file, layout)
        return self._checked(pieces)

    def _checked(self, pieces: Iterator[bytes]) -> Iterator[bytes]:
        with contextlib.closing(pieces):
            while True:
                with self._exposure.checked():
                    piece = next(pieces, None)
                if piece is None:
                    return
                yield piece

    def walk(self, folder: Node) -> Iterator[tuple[tuple[bytes, ...], Node,
                                                   Optional[Iterator[bytes]]]]:
        """Everything under `folder`, each folder before what it holds: (the names from
        `folder` down to the entry, the entry, a file's contents as `read` gives them, None
        for any other entry and for a file the tool cannot address).

        Folders are listed BATCH at a time and, where the tool can, where the data
        of a folder's files lies is found in one run for all of them; a folder's
        files come after its other entries, in the order quickest to read. A folder
        whose name would leave its parent, or that was met already (a crafted
        filesystem's loop), is not entered. Take a file's contents before asking
        for the next entry, or never.
        """
        tool = self._settled()
        queue = collections.deque([((), folder)])
        entered = {folder.handle}
        while queue:
            group = [queue.popleft() for _ in range(min(BATCH, len(queue)))]
            with self._exposure.checked():
                listings = tool.list_dirs([node for _, node in group])
            for (names, _), children in zip(group, listings):
                files = [child for child in children
                         if child.kind == FILE and child.handle is not None]
                with self._exposure.checked():
                    layouts = tool.layouts(files)
                for child in children:
                    if child.kind == DIRECTORY and safe_name(child.name) \
                            and child.handle not in entered:
                        entered.add(child.handle)
                        queue.append(((*names, child.name), child))
                    if child.kind != FILE or child.handle is None:
                        yield (*names, child.name), child, None
                files = tool.reading_order(files, layouts)
                self.reader.read_ahead(tool.chunks_read(files, layouts))
                for file in files:
                    contents = self._read(tool, file, layouts.pop(file.handle, None))
                    yield (*names, file.name), file, contents

    def extract(self, paths: Sequence[str], to: os.PathLike | str, *,
                overwrite: bool = False) -> ExtractResult:
        """Copy files or folders `paths` into the directory `to`.

        Each lands under `to` by its last name ("/" puts the whole filesystem's
        contents there). Entries that could not be extracted are listed in the
        result's `skipped`, with the reason.
        """
        wanted = [_components(path) for path in paths]
        nodes = self._answer(lambda tool: [_lookup(tool, names, self._shown) for names in wanted])
        self._progress.start_phase("extract", 0)
        to_fd = _open_target(Path(to))
        try:
            extraction = _Extraction(self._settled(), to_fd, overwrite, self._progress)
            for node, names in zip(nodes, wanted):
                extraction.add(node, names)
            with self._exposure.checked():
                extraction.run()
        finally:
            os.close(to_fd)
        return ExtractResult(self.image, self.number, self.filesystem, str(to), extraction.files,
                             extraction.directories, extraction.symlinks, extraction.bytes,
                             extraction.skipped, self.reader.chunk_bytes_read, self._seconds())

    def _seconds(self) -> float:
        return round(time.monotonic() - self._started, 3)


def list_files(image_dir: os.PathLike | str, number: int | str, path: str = "/", *,
               progress: Optional[Progress] = None) -> Listing:
    """The entries of directory `path` (or the one entry `path` names) in partition `number`."""
    progress = progress or Progress("files", 0)
    with FileSession(image_dir, number, progress=progress) as session:
        listing = session.listing(path)
    progress.finish()
    return listing


# -- extracting ------------------------------------------------------------------

@dataclasses.dataclass
class _Pending:
    node: Node
    fd: int
    dir_fd: int
    name: bytes
    temporary: Optional[bytes]  # renamed over `name` once complete (overwrite)
    shown: str


class _Extraction:
    """Places what a tool reads under one directory, never anywhere else."""

    def __init__(self, tool: _Tool, to_fd: int, overwrite: bool, progress: Progress) -> None:
        self.tool = tool
        self.to_fd = to_fd
        self.overwrite = overwrite
        self.progress = progress
        self.files = self.directories = self.symlinks = self.bytes = 0
        self.skipped: list[dict] = []
        self._queue: collections.deque[tuple[Node, tuple[bytes, ...]]] = collections.deque()
        self._made_dirs: list[tuple[tuple[bytes, ...], Node]] = []
        self._pending: list[_Pending] = []

    def add(self, node: Node, names: list[bytes]) -> None:
        """Extract `node` (the root's contents when `names` is empty) into the target."""
        if not names:
            self._queue.append((node, ()))
        else:
            self._place(node, self.to_fd, (), node.name)

    def run(self) -> None:
        try:
            while self._queue:
                group = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                listings = self.tool.list_dirs([node for node, _ in group])
                dir_fds = []
                try:
                    for (_, names), children in zip(group, listings):
                        dir_fd = self._open_dir(names)
                        if dir_fd is None:
                            continue
                        dir_fds.append(dir_fd)
                        for child in children:
                            self._place(child, dir_fd, names, child.name)
                            if len(self._pending) >= BATCH:
                                self._flush()
                    self._flush()
                finally:
                    for dir_fd in dir_fds:
                        os.close(dir_fd)
            self._flush()
            self._finish_dirs()
        finally:
            for pending in self._pending:
                os.close(pending.fd)

    def _skip(self, shown: str, reason: str) -> None:
        self.skipped.append({"path": shown, "reason": reason})

    def _place(self, node: Node, dir_fd: int, parent: tuple[bytes, ...], name: bytes) -> None:
        if self.progress.cancelled():
            raise Cancelled()
        shown = _shown((*parent, name))
        if not safe_name(name):
            return self._skip(shown, "a name that would leave its folder")
        if node.handle is None:
            return self._skip(shown, f"a name the {self.tool.name} tools cannot address")
        try:
            if node.kind == DIRECTORY:
                self._make_dir(node, dir_fd, (*parent, name), shown)
            elif node.kind == FILE:
                self._create_file(node, dir_fd, name, shown)
            elif node.kind == SYMLINK:
                self._make_symlink(node, dir_fd, name, shown)
            else:
                self._skip(shown, "not a file, folder or symbolic link")
        except OSError as exc:
            self._skip(shown, describe(exc))

    def _existing(self, dir_fd: int, name: bytes) -> Optional[os.stat_result]:
        try:
            return os.lstat(name, dir_fd=dir_fd)
        except FileNotFoundError:
            return None

    def _make_dir(self, node: Node, dir_fd: int, names: tuple[bytes, ...], shown: str) -> None:
        name = names[-1]
        try:
            os.mkdir(name, 0o700, dir_fd=dir_fd)
        except FileExistsError:
            existing = self._existing(dir_fd, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                pass  # extracted into as it is
            elif self.overwrite:
                os.unlink(name, dir_fd=dir_fd)
                os.mkdir(name, 0o700, dir_fd=dir_fd)
            else:
                return self._skip(shown, "exists and is not a folder (--overwrite replaces it)")
        self.directories += 1
        self._made_dirs.append((names, node))
        self._queue.append((node, names))

    def _create_file(self, node: Node, dir_fd: int, name: bytes, shown: str) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        temporary = None
        if self.overwrite:
            existing = self._existing(dir_fd, name)
            if existing is not None and stat.S_ISDIR(existing.st_mode):
                return self._skip(shown, "a folder of that name is in the way")
            if existing is not None:
                temporary = f".imaging-{secrets.token_hex(6)}.tmp".encode()
        try:
            fd = os.open(temporary or name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            return self._skip(shown, "exists (--overwrite replaces it)")
        self._pending.append(_Pending(node, fd, dir_fd, name, temporary, shown))

    def _make_symlink(self, node: Node, dir_fd: int, name: bytes, shown: str) -> None:
        target = self.tool.link_target(node)
        if not target or b"\0" in target:
            return self._skip(shown, "a symbolic link without a usable target")
        temporary = None
        existing = self._existing(dir_fd, name)
        if existing is not None:
            if not self.overwrite:
                return self._skip(shown, "exists (--overwrite replaces it)")
            if stat.S_ISDIR(existing.st_mode):
                return self._skip(shown, "a folder of that name is in the way")
            temporary = f".imaging-{secrets.token_hex(6)}.tmp".encode()
        os.symlink(target, temporary or name, dir_fd=dir_fd)
        if temporary:
            os.replace(temporary, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        if node.mtime_ns is not None:
            os.utime(name, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns), dir_fd=dir_fd,
                     follow_symlinks=False)
        self.symlinks += 1

    def _flush(self) -> None:
        """Copy the pending files' contents, then give each its mode, times and name."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        try:
            try:
                problems = self.tool.copy([(job.node, job.fd) for job in pending])
            except BaseException:
                # Made by this extraction and not all whole: none stays to pass for a copy.
                for job in pending:
                    with contextlib.suppress(OSError):
                        os.unlink(job.temporary or job.name, dir_fd=job.dir_fd)
                raise
            for number, job in enumerate(pending):
                if number in problems:
                    os.unlink(job.temporary or job.name, dir_fd=job.dir_fd)
                    self._skip(job.shown, problems[number])
                    continue
                os.fchmod(job.fd, job.node.mode & COPIED_MODE_BITS)
                if job.node.mtime_ns is not None and not self.tool.copies_times:
                    os.utime(job.fd, ns=(job.node.atime_ns or job.node.mtime_ns,
                                         job.node.mtime_ns))
                if job.temporary:
                    os.replace(job.temporary, job.name, src_dir_fd=job.dir_fd,
                               dst_dir_fd=job.dir_fd)
                self.files += 1
                self.bytes += job.node.size
                self.progress.advance(job.node.size)
        finally:
            for job in pending:
                os.close(job.fd)

    def _open_dir(self, names: tuple[bytes, ...]) -> Optional[int]:
        """A directory this extraction made, entered one name at a time, never through a link."""
        fd = os.dup(self.to_fd)
        try:
            for name in names:
                inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                                dir_fd=fd)
                os.close(fd)
                fd = inner
        except OSError as exc:
            os.close(fd)
            self._skip(_shown(names), f"cannot enter it: {describe(exc)}")
            return None
        return fd

    def _finish_dirs(self) -> None:
        """Folders get their modes and times last, deepest first: filling them changed both."""
        for names, node in reversed(self._made_dirs):
            fd = self._open_dir(names)
            if fd is None:
                continue
            try:
                os.fchmod(fd, node.mode & COPIED_MODE_BITS)
                if node.mtime_ns is not None:
                    os.utime(fd, ns=(node.atime_ns or node.mtime_ns, node.mtime_ns))
            finally:
                os.close(fd)


def _open_target(to: Path) -> int:
    try:
        to.mkdir(parents=True, exist_ok=True)
        return os.open(to, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise TargetError(f"cannot extract into {to}: {describe(exc)}") from None


def extract(image_dir: os.PathLike | str, number: int | str, paths: Sequence[str],
            to: os.PathLike | str, *, overwrite: bool = False,
            progress: Optional[Progress] = None) -> ExtractResult:
    """Copy files or folders `paths` of partition `number` into the directory `to`
    (FileSession.extract)."""
    progress = progress or Progress("extract", 0)
    with FileSession(image_dir, number, progress=progress) as session:
        result = session.extract(paths, to, overwrite=overwrite)
    progress.finish()
    return result
