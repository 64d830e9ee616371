"""Off-site copies of the fourteen-night history: after each night's backups, each
repository goes to an SFTP server on loopback (OpenSSH's sshd, bench/remotes.py):

- ours: `imaging.sync.sync` of the raw-mode datastore to an `rclone:` SFTP remote
  (in-process, as the history's backups);
- `rclone copy` of the same datastore folder to another folder there (what a user
  would otherwise script: rclone skips files of the same size and time);
- `restic copy` of restic's own history into a restic repository there (made with
  `init --copy-chunker-params`, so it deduplicates as the source does).

Ours is judged on the bytes of the files it sent (its sync's count of chunk and image
files) against what the datastore holds, and each night against what the night's backup
added to it. Beside that, and for the other tools, the bytes that crossed the loopback
interface while the copy ran (its tx_bytes: SFTP, SSH, TCP and IP framing and the
listings included; SFTP alone adds ~3.5% on loopback here). Times are wall seconds,
each ending with a `sync`.
"""
from __future__ import annotations

import contextlib
import os
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from bench.measure import CommandFailed, timed
from bench.remotes import SftpServer, sftp_problem, sftp_server
from bench.system import MiB, tree_bytes
from imaging.base.errors import ImagingError
from imaging.sync import sync

LOOPBACK_SENT = Path("/sys/class/net/lo/statistics/tx_bytes")
# The folders of the SFTP server each tool copies into.
OURS, RCLONE, RESTIC = "ours", "rclone-copy", "restic-copy"

# Targets (issue: off-site copies).
HISTORY_BYTES_TARGET = 1.02  # all nights' syncs / the datastore's bytes
NIGHT_BYTES_TARGET = 1.05  # a nightly sync / that night's new bytes
SPEED_TARGET = 1.0  # rclone copy's seconds / ours


@dataclass
class Copier:
    key: str
    label: str
    folder: str  # what it copies into, in the server's folder
    copy: Callable[[int], None]
    sent: list[int | None] = field(default_factory=list)
    seconds: list[float | None] = field(default_factory=list)
    held: list[int | None] = field(default_factory=list)  # bytes at the remote after the night
    error: str | None = None

    def failed(self, night: int, failure: Exception | None = None) -> None:
        if failure is not None:
            self.error = f"night {night}: {failure}"
        self.sent.append(None)
        self.seconds.append(None)
        self.held.append(None)


def _sent_on_loopback() -> int:
    return int(LOOPBACK_SENT.read_text())


def _ours(store: Path, server: SftpServer, payload: list[int]) -> Callable[[int], None]:
    remote = "rclone:" + server.rclone_remote(OURS)

    def copy(night: int) -> None:
        result = sync(store, remote)
        payload.append(result.bytes_sent + result.image_bytes_sent)
    return copy


def _rclone(store: Path, server: SftpServer) -> Callable[[int], None]:
    def copy(night: int) -> None:
        timed(["rclone", "copy", str(store), server.rclone_remote(RCLONE)])
    return copy


def _restic(repository: Path, server: SftpServer, env: dict[str, str]) -> Callable[[int], None]:
    target = ["--repo", f"sftp:root@127.0.0.1:{server.served / RESTIC}",
              "--option", f"sftp.command={server.ssh_command()}"]
    env = env | {"RESTIC_FROM_PASSWORD": env["RESTIC_PASSWORD"]}

    def copy(night: int) -> None:
        if night == 0:
            timed(["restic", "init", *target, "--from-repo", str(repository),
                   "--copy-chunker-params", "--repository-version", "2"], env=env)
        timed(["restic", "copy", *target, "--from-repo", str(repository)], env=env)
    return copy


@dataclass
class Offsite:
    copiers: list[Copier]
    server: SftpServer
    payload: list[int]  # bytes of the files ours sent each night, as its sync counts them

    def after_night(self, night: int, progress: Callable[[str], None]) -> None:
        for copier in self.copiers:
            if copier.error:
                copier.failed(night)
                continue
            progress(f"history night {night}: off-site copy, {copier.label}")
            os.sync()
            sent, started = _sent_on_loopback(), time.perf_counter()
            try:
                copier.copy(night)
                os.sync()
            except (ImagingError, CommandFailed, OSError) as failure:
                copier.failed(night, failure)
                continue
            copier.seconds.append(time.perf_counter() - started)
            copier.sent.append(_sent_on_loopback() - sent)
            copier.held.append(tree_bytes(self.server.served / copier.folder))

    def as_json(self) -> dict:
        return {"ours_payload_bytes": self.payload} | {
                copier.key: {"label": copier.label, "error": copier.error,
                             "sent_bytes": copier.sent, "remote_bytes": copier.held,
                             "seconds": [None if s is None else round(s, 3)
                                         for s in copier.seconds]}
                for copier in self.copiers}


@contextlib.contextmanager
def offsite(workdir: Path, store: Path, restic_repository: Path | None,
            restic_env: dict[str, str]) -> Iterator[Offsite | None]:
    """The copiers and their server while the history runs; None where sshd cannot run."""
    if sftp_problem():
        yield None
        return
    folder = workdir / "sftp"
    folder.mkdir()
    with sftp_server(folder) as server:
        payload: list[int] = []
        copiers = [Copier("ours", "ours, imaging sync to SFTP", OURS,
                          _ours(store, server, payload)),
                   Copier("rclone", "rclone copy of the datastore folder", RCLONE,
                          _rclone(store, server))]
        if restic_repository is not None:
            copiers.append(Copier("restic", "restic copy of restic's history", RESTIC,
                                  _restic(restic_repository, server, restic_env)))
        yield Offsite(copiers, server, payload)


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def target_lines(copies: Offsite | None, store_sizes: list[int | None],
                 restic_sizes: list[int | None]) -> list[str]:
    """The off-site lines: bytes ours sends against what it stores (the whole history,
    and each night), its time against rclone copy's, restic copy beside it."""
    if copies is None:
        return [f"Off-site copy: not measured ({sftp_problem()})"]
    by_key = {copier.key: copier for copier in copies.copiers}
    ours, rclone = by_key["ours"], by_key["rclone"]
    lines = [f"Off-site copy: {copier.label} failed on {copier.error}: FAIL"
             for copier in copies.copiers if copier.error]
    if ours.error or rclone.error or None in store_sizes:
        return lines or ["Off-site copy: not measured (a backup of the history failed): FAIL"]
    last = len(store_sizes) - 1
    payload, sent, stored = sum(copies.payload), sum(ours.sent), store_sizes[last]
    ratio = payload / stored
    lines.append(f"Off-site copy: ours sync of the {last}-night history to a fresh SFTP remote: "
                 f"{payload / MiB:.1f} MiB of files sent against {stored / MiB:.1f} MiB stored, "
                 f"ratio {ratio:.3f}, target ≤ {HISTORY_BYTES_TARGET:g} "
                 f"({sent / MiB:.1f} MiB crossed the wire, SFTP's and SSH's framing included; "
                 f"rclone copy's: {sum(rclone.sent) / MiB:.1f} MiB): "
                 f"{_verdict(ratio <= HISTORY_BYTES_TARGET)}")
    nightly = [(copies.payload[night] / (store_sizes[night] - store_sizes[night - 1]), night)
               for night in range(1, last + 1)]
    wire = [ours.sent[night] / (store_sizes[night] - store_sizes[night - 1])
            for night in range(1, last + 1)]
    worst, worst_night = max(nightly)
    lines.append(f"Off-site copy: each nightly sync's files against that night's new bytes: "
                 f"median {statistics.median(ratio for ratio, _ in nightly):.3f}, worst "
                 f"{worst:.3f} (night {worst_night}), target ≤ {NIGHT_BYTES_TARGET:g} (on the "
                 f"wire: median {statistics.median(wire):.3f}): "
                 f"{_verdict(worst <= NIGHT_BYTES_TARGET)}")
    ours_seconds, rclone_seconds = sum(ours.seconds), sum(rclone.seconds)
    speed = rclone_seconds / ours_seconds
    lines.append(f"Off-site copy: time of all {last + 1} copies, ours sync {ours_seconds:.1f} s "
                 f"(night 0 {ours.seconds[0]:.1f} s, nightly median "
                 f"{statistics.median(ours.seconds[1:]):.2f} s) against rclone copy of the "
                 f"datastore folder {rclone_seconds:.1f} s (night 0 {rclone.seconds[0]:.1f} s, "
                 f"nightly median {statistics.median(rclone.seconds[1:]):.2f} s), speed ratio "
                 f"{speed:.2f}, "
                 f"target ≥ {SPEED_TARGET:g}: {_verdict(speed >= SPEED_TARGET)}")
    restic = by_key.get("restic")
    if restic is not None and not restic.error and None not in restic_sizes:
        lines.append(f"Off-site copy, beside it: restic copy of restic's own {last}-night "
                     f"history: {restic.held[last] / MiB:.1f} MiB at the remote "
                     f"({restic_sizes[last] / MiB:.1f} MiB in its repository), "
                     f"{sum(restic.sent) / MiB:.1f} MiB on the wire, {sum(restic.seconds):.1f} s "
                     f"(nightly median {statistics.median(restic.seconds[1:]):.2f} s); ours: "
                     f"{ours.held[last] / MiB:.1f} MiB at the remote, {sent / MiB:.1f} MiB "
                     f"on the wire, {ours_seconds:.1f} s: info")
    return lines
