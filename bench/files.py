"""File-level restore on the benchmark disk: listing a folder, extracting a 100 MiB file,
downloading a folder of small files as .tar through the web.

A 100 MiB file of random bytes and a folder of 2,000 small files of random
bytes (1-50 KiB each, about 50 MiB) are written into the ext4 partition of a
copy of the disk, and the copy is backed up (raw). Then, each the median of 5
runs:

- listing the partition's root folder from the image, `python -m imaging
  files IMAGE N /`, timed from the command's start: target under 2 s;
- extracting the file with the engine's `extract` (what `python -m imaging
  extract` runs once Python has started: the private mount, finding the file,
  copying it), against `cat FILE > /dev/null` in a restored copy of the disk
  mounted afresh before each run: target at least 0.5 × cat's throughput. The
  page cache is dropped before every timed run of both, unlike elsewhere in
  the benchmark: a warm `cat` runs at memory speed, which no decompression
  matches, and the file someone wants back from last week's image is not in
  memory either. Extract and cat take turns, round by round. The extracted
  file is compared with the original afterwards;
- downloading the folder as a .tar through the web (GET on the file browser's
  download URL, as a staff user's browser does, from the request to the last
  byte; uvicorn serving webui.asgi with a private Redis and a fresh SQLite
  database, as bench/web.py starts them), against `tar -c` of the same folder
  in the restored copy mounted afresh, piped to `cat > /dev/null` (GNU tar
  reads nothing when it writes to /dev/null itself): target at most 2 × tar's
  time. The page cache is dropped before each, and they take turns as above.
  Every member of the first download is compared with the file written.

`python -m bench.files DISK [WORKDIR]` runs it alone on a disk from
`python -m bench.disk`.
"""

import concurrent.futures
import contextlib
import hashlib
import http.client
import io
import multiprocessing
import os
import random
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode

from bench.system import LINUX_TYPE, MiB, command_seconds, mounted, partition_of_type, run_alone
from bench.web import _configure_django, _environment, _staff_credentials
from imaging.backup import backup
from imaging.base.errors import ImagingError
from imaging.base.tools import loop_device
from imaging.reading.files import extract
from imaging.restore import restore
from webui.testing import LiveServer, RedisServer, ServiceFailed

REPO_ROOT = Path(__file__).resolve().parent.parent
ROUNDS = 5
FILE_SIZE = 100 * MiB
FILE_NAME = "bench-extract.bin"
FOLDER_NAME = "bench-small"
FOLDER_FILES = 2_000
# Each small file's size, drawn evenly between these: about 50 MiB in all.
SMALL_FILE_SIZES = (1024, 50 * 1024)
FOLDER_SEED = 19
LIST_TARGET_SECONDS = 2.0
EXTRACT_TARGET_RATIO = 0.5
TAR_TARGET_RATIO = 2.0
# A download is a failure, not a slow machine, past this.
DOWNLOAD_TIMEOUT = 3600


def _drop_caches() -> None:
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def _prepare(pristine: Path, workdir: Path) -> tuple[Path, int, str, dict[str, str]]:
    """(image, ext4 partition number, SHA-256 of the big file, {tar member: SHA-256} of the
    small files) of a copy holding them."""
    disk = workdir / "disk.img"
    shutil.copyfile(pristine, disk)
    part = partition_of_type(disk, LINUX_TYPE)
    digest = hashlib.sha256()
    small = {}
    with loop_device(disk, part.offset, part.size) as device, mounted(device) as root:
        with open(root / FILE_NAME, "wb") as handle:
            for _ in range(FILE_SIZE // MiB):
                block = os.urandom(MiB)
                digest.update(block)
                handle.write(block)
        (root / FOLDER_NAME).mkdir()
        for number, size in enumerate(_small_sizes()):
            data = os.urandom(size)
            name = f"{FOLDER_NAME}/file-{number:04d}.bin"
            (root / name).write_bytes(data)
            small[name] = hashlib.sha256(data).hexdigest()
    image = backup(str(disk), workdir / "store", disk_id="bench").image
    return image, part.number, digest.hexdigest(), small


def _small_sizes() -> list[int]:
    sizes = random.Random(FOLDER_SEED)
    return [sizes.randint(*SMALL_FILE_SIZES) for _ in range(FOLDER_FILES)]


def measure(pristine: Path, workdir: Path) -> dict:
    """Median seconds of listing, extracting and cat, downloading a tar and tar -c; what the
    extract read.

    Each and its peer take turns, round by round: the VM's host caches its disk
    too, and whichever side ran later would otherwise find it warmer.
    """
    image, number, digest, small = _prepare(pristine, workdir)
    imaging = [sys.executable, "-m", "imaging"]
    listing = [command_seconds([*imaging, "files", image, number, "/"], REPO_ROOT)
               for _ in range(ROUNDS)]
    restored = workdir / "restored.img"
    restore(str(image), str(restored))
    part = partition_of_type(restored, LINUX_TYPE)
    extracting, catting, chunk_bytes = [], [], 0
    for round_number in range(ROUNDS):
        out = workdir / f"out-{round_number}"
        _drop_caches()
        started = time.perf_counter()
        result = extract(image, number, [f"/{FILE_NAME}"], out)
        extracting.append(time.perf_counter() - started)
        chunk_bytes = result.chunk_bytes_read
        if hashlib.sha256((out / FILE_NAME).read_bytes()).hexdigest() != digest:
            raise RuntimeError("the extracted file differs from the original")
        shutil.rmtree(out)
        with loop_device(restored, part.offset, part.size, read_only=True) as device, \
                mounted(device) as root:
            _drop_caches()
            catting.append(command_seconds(["sh", "-c", 'cat "$0" > /dev/null',
                                            root / FILE_NAME]))
    downloading, tarring = tar_rounds(image, number, small, restored, workdir / "web", ROUNDS)
    # Both sides share the machine with whatever else runs: the figure says how much did.
    return {"list": statistics.median(listing), "extract": statistics.median(extracting),
            "cat": statistics.median(catting), "chunk_bytes": chunk_bytes,
            "download": statistics.median(downloading), "tar": statistics.median(tarring),
            "load": os.getloadavg()[0]}


def tar_rounds(image: Path, number: int, small: dict[str, str], restored: Path, workdir: Path,
               rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of each download of FOLDER_NAME as a .tar through the web, and of each
    `tar -c` of it in the restored copy, taking turns; the first download's members checked."""
    part = partition_of_type(restored, LINUX_TYPE)
    downloading, tarring = [], []
    with _file_browser(image.parent.parent.parent, number, restored,
                       workdir) as (server, url, cookie):
        for round_number in range(rounds):
            _drop_caches()
            seconds, body = _downloaded(server, url, cookie)
            downloading.append(seconds)
            if round_number == 0 and _tar_digests(body) != small:
                raise RuntimeError(f"the downloaded tar of {FOLDER_NAME} differs from the files")
            with loop_device(restored, part.offset, part.size, read_only=True) as device, \
                    mounted(device) as root:
                _drop_caches()
                tarring.append(command_seconds(
                    ["bash", "-c", 'set -o pipefail; tar -c -C "$0" "$1" | cat > /dev/null',
                     root, FOLDER_NAME]))
    return downloading, tarring


@contextlib.contextmanager
def _file_browser(store: Path, number: int, disk: Path,
                  workdir: Path) -> Iterator[tuple[LiveServer, str, str]]:
    """uvicorn serving the web, `store` (one image) in its catalog and `disk` its host's
    disk file: (the server, the download URL of the image's partition `number`, a staff
    user's session cookie)."""
    workdir.mkdir(parents=True)
    with contextlib.ExitStack() as services:
        redis = RedisServer(workdir, workdir / "redis.log")
        services.callback(redis.stop)
        env = _environment(workdir / "data", redis.url, disk)
        # Django is set up once per process, and bench/web.py sets it up in this one.
        with concurrent.futures.ProcessPoolExecutor(
                1, mp_context=multiprocessing.get_context("spawn")) as child:
            image_id, cookie = child.submit(_catalogued, env, store).result()
        server = LiveServer(env, workdir / "uvicorn.log")
        services.callback(server.stop)
        yield server, f"/images/{image_id}/files/{number}/download/", cookie


def _catalogued(env: dict[str, str], store: Path) -> tuple[int, str]:
    """In a process of its own: the database migrated, `store` catalogued, a staff user
    logged in; (the image's id, the user's session cookie)."""
    _configure_django(env)
    from webui import services
    from webui.models import Image

    services.rescan(store)
    _, cookie = _staff_credentials()
    return Image.objects.get().pk, cookie


def _downloaded(server: LiveServer, url: str, cookie: str) -> tuple[float, bytes]:
    """Seconds from the request to the last byte of FOLDER_NAME's tar, and the tar."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=DOWNLOAD_TIMEOUT)
    with contextlib.closing(connection):
        started = time.perf_counter()
        connection.request("GET", f"{url}?{urlencode({'path': FOLDER_NAME})}",
                           headers={"Cookie": cookie})
        response = connection.getresponse()
        body = response.read()
        seconds = time.perf_counter() - started
    if response.status != 200:
        raise RuntimeError(f"the download answered {response.status}: {body[:200]!r}")
    return seconds, body


def _tar_digests(body: bytes) -> dict[str, str]:
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:") as archive:
        return {member.name: hashlib.sha256(archive.extractfile(member).read()).hexdigest()
                for member in archive.getmembers() if member.isfile()}


def report_lines(pristine: Path, workdir: Path) -> list[str]:
    """The benchmark's lines for the report: each figure against its target, or why it failed."""
    workdir.mkdir(parents=True, exist_ok=True)
    listing = ("Files: listing the ext4 root folder from an image (`files`, from the "
               "command's start)")
    extracting = (f"Files: extracting a {FILE_SIZE // MiB} MiB file (the engine's `extract`) "
                  "against `cat` in a restored, mounted copy")
    small_bytes = sum(_small_sizes())
    downloading = (f"Files: a folder of {FOLDER_FILES:,} small files ({small_bytes / MiB:.0f} "
                   "MiB) downloaded as .tar through the web against `tar -c` of it in a "
                   "restored, mounted copy")
    try:
        figures = measure(pristine, workdir)
    except (ImagingError, OSError, RuntimeError, ServiceFailed,
            subprocess.CalledProcessError) as failure:
        return [f"{line}: FAIL ({failure})" for line in (listing, extracting, downloading)]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ours, cat = FILE_SIZE / figures["extract"], FILE_SIZE / figures["cat"]
    ratio = ours / cat
    tar_ratio = figures["download"] / figures["tar"]
    return [
        f"{listing}: {figures['list']:.2f} s, target < {LIST_TARGET_SECONDS:g} s: "
        f"{'PASS' if figures['list'] < LIST_TARGET_SECONDS else 'FAIL'}",
        f"{extracting}: {ours / MiB:.0f} MiB/s against {cat / MiB:.0f} MiB/s, "
        f"ratio {ratio:.3f}, target ≥ {EXTRACT_TARGET_RATIO:g}: "
        f"{'PASS' if ratio >= EXTRACT_TARGET_RATIO else 'FAIL'} "
        f"({figures['chunk_bytes'] / MiB:.0f} MiB of chunks read, "
        f"load average {figures['load']:.1f})",
        f"{downloading}: {figures['download']:.2f} s against {figures['tar']:.2f} s, "
        f"ratio {tar_ratio:.3f}, target ≤ {TAR_TARGET_RATIO:g}: "
        f"{'PASS' if tar_ratio <= TAR_TARGET_RATIO else 'FAIL'} "
        f"(load average {figures['load']:.1f})",
    ]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit("usage: python -m bench.files DISK [WORKDIR]")
    run_alone("files", lambda workdir: report_lines(Path(sys.argv[1]), workdir),
              sys.argv[2] if len(sys.argv) > 2 else None)


if __name__ == "__main__":
    main()
