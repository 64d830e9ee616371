"""Job kinds: what a backup, a restore, a gc... is, each in one entry.

An entry is a subclass of JobKind, which joins the registry (KINDS) by being defined. It
says how people read the kind, what a request for it takes and checks (`start`, which also
picks the host whose worker runs it), the disks it holds (a disk takes one job at a time),
its engine call (`run`), whether it changes the datastore's catalog, how its result is
judged and told, and what follows it. The rest of the web (starting, running, finishing,
pages, notifications, the worker's one task) asks the entry and knows no kind by name;
adding a kind is one entry here and its engine call.
"""
from __future__ import annotations

import logging
import tempfile
import zoneinfo
from pathlib import Path
from typing import Any, ClassVar, Iterable, Optional

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

import imaging.backup
import imaging.boot
import imaging.export
import imaging.gc
import imaging.importer
import imaging.disks.inventory
import imaging.prune
import imaging.recompress
import imaging.restore
import imaging.datastore.store
import imaging.datastore.verification
import imaging.sync
import imaging.verify
from imaging.base.errors import ImagingError, TargetError
from imaging.base.progress import Progress

from ..formatting import short_time, size
from ..models import (BootTest, Datastore, Disk, Host, HostAccess, Image, ImageCopy, Job,
                      Schedule)
from ..parameters import DEFAULT_LEVEL, validate_level, validate_mode, validate_retention
from .catalog import default_datastore
from .delivery import enqueue
from . import live_screen
from .errors import Refused
from .jobs import (datastore_host, image_named, image_partition, inventoried,
                   latest_images, local_host, plain_name, relative_name, requester)
from .protection import update_alert
from .registry import KINDS, held_disk_ids, holding

log = logging.getLogger(__name__)

class JobKind:
    name: ClassVar[str]
    label: ClassVar[str]  # how people read it: "Backup", "Garbage collection"
    doing: ClassVar[str]  # what the progress of its phase of that name says: "reading"
    scheduled_as: ClassVar[str] = ""  # how the schedule form offers it; "": never scheduled
    # The Job fields naming the disks it holds: another job may hold none of them meanwhile.
    holds: ClassVar[tuple[str, ...]] = ()
    changes_catalog: ClassVar[bool] = False  # its datastore's images or chunks change
    changes_images: ClassVar[bool] = True  # ... and of those, the images (not only chunks)
    makes_images: ClassVar[bool] = False  # reads a disk or an archive into a new image
    shows_screen: ClassVar[bool] = False  # a virtual machine's, which its page follows

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            KINDS[cls.name] = cls()

    # --- starting ---------------------------------------------------------------------

    def create(self, user, *, host: Host, **fields) -> Job:
        """Create a queued job and enqueue it on commit; refused if a disk it holds is busy,
        Unavailable (the job failed, its disks free) if Redis does not take its message.

        The disks are locked first (select_for_update; SQLite's IMMEDIATE transactions
        serialize writers), so of two requests for one disk only one can win.
        """
        job = Job(kind=self.name, host=host, requested_by=requester(user), **fields)
        if job.datastore_id and job.datastore.is_remote:
            raise Refused(f"{job.datastore} is an rclone: remote, which copies fill: {self.label} "
                          "works on a datastore folder (prune and gc of a remote copy run on the "
                          "host that holds its files)")
        holds = self.held_disks(job)
        if HostAccess.objects.filter(host=host, revoked_at__isnull=False).exists():
            raise Refused(f"host {host.name}'s access was revoked: it runs no jobs until it "
                          "joins again")
        with transaction.atomic():
            list(Disk.objects.select_for_update().filter(pk__in=[disk.pk for disk in holds]))
            busy = Job.objects.filter(state__in=Job.ACTIVE_STATES).filter(
                holding(holds)).first() if holds else None
            if busy is not None:
                held = next(disk for disk in holds if disk.pk in held_disk_ids(busy))
                raise Refused(f"disk {held.stable_id} is busy with {busy.kind} job #{busy.pk} "
                              f"({busy.state}): one job per disk at a time")
            job.note = "" if host.is_online() else (
                f"host {host.name} is offline: the job waits in its queue until its worker is "
                "back")
            job.save(force_insert=True)
            enqueue(job)
        return job

    def held_disks(self, job: Job) -> list[Disk]:
        return [getattr(job, field) for field in self.holds
                if getattr(job, f"{field}_id") is not None]

    def start_scheduled(self, schedule: Schedule) -> list[Job]:
        """The jobs one firing of a schedule of this kind starts."""
        raise NotImplementedError(f"{self.name} jobs are not scheduled")

    # --- running, in the worker -------------------------------------------------------

    def run(self, job: Job, progress: Progress) -> Any:
        """The engine call; what it returns is the job's result."""
        raise NotImplementedError

    # --- finishing --------------------------------------------------------------------

    def judge(self, result: dict) -> tuple[str, str]:
        """(state, error) of a job whose engine call returned `result`."""
        return Job.State.SUCCEEDED, ""

    def catalog_disk_id(self, job: Job) -> Optional[str]:
        """The disk whose images the catalog reads again after the job (None: every disk)."""
        return job.disk.stable_id if job.disk_id else None

    def recorded(self, result: dict) -> dict[str, Any]:
        """Fields of the job's row that its result sets, besides state, error and result."""
        return {}

    def finished(self, job: Job, now) -> None:
        """What its result changes besides the catalog, as its row is finished."""

    def ended(self, job: Job, now) -> None:
        """What any end (finished, failed, lost, not sent) changes."""

    def follow_up(self, job: Job) -> None:
        """What starts once it has finished without failing."""

    # --- telling ----------------------------------------------------------------------

    def describe(self, job: Job) -> str:
        """ "Backup of Disk One on h1", "Garbage collection of /srv/store"... """
        if job.disk_id:
            return f"{self.label} of {job.disk.title} on {job.disk.host}"
        if job.datastore_id:
            return f"{self.label} of {job.datastore}"
        return self.label

    def title(self, job: Job) -> str:
        """What a notification about the job is called."""
        what = job.target_disk or job.disk or job.datastore or ""
        return f"{self.label} job #{job.pk} {what}".strip()

    def result_lines(self, result: dict) -> list[str]:
        """The engine's result in a few lines: what was written, checked, removed, found."""
        return []


def checked(validate, value: Any) -> None:
    """A parameter's one rule (webui/parameters.py), its breach refused."""
    try:
        validate(value)
    except ValidationError as invalid:
        raise Refused(" ".join(invalid.messages)) from None


def _stamp(image: Optional[Image]) -> str:
    return "image gone" if image is None else short_time(image.created)


class MakingImages(JobKind):
    """A kind that reads a disk or an archive into a new image of the datastore."""

    changes_catalog = True
    makes_images = True

    def judge(self, result: dict) -> tuple[str, str]:
        warnings = []
        if result.get("bad_bytes"):
            warnings.append(f"{result['bad_bytes']} unreadable bytes stored as zeros")
        if result.get("mounted_rw"):
            warnings.append("a partition was mounted read-write while it was read")
        if warnings:
            return Job.State.SUCCEEDED_WITH_WARNINGS, "; ".join(warnings)
        return super().judge(result)

    def recorded(self, result: dict) -> dict[str, Any]:
        image = Image.objects.filter(path=result["image"]).first() if result.get("image") else None
        return {} if image is None else {"image": image, "disk": image.disk}

    def result_lines(self, result: dict) -> list[str]:
        if not result.get("image"):
            return []
        lines = [f"Wrote image {result['image']}"]
        if "stored_bytes" in result:
            lines.append(f"Stored {size(result['stored_bytes'])}, "
                         f"{size(result.get('new_bytes'))} of it new in the datastore")
        return lines


class OfAnImage(JobKind):
    """A kind that works on one image of a disk."""

    def describe(self, job: Job) -> str:
        if not job.disk_id:
            return super().describe(job)
        when = f" ({_stamp(job.image)})" if job.image_id else ""
        return f"{self.label} of {job.disk.title}{when}"


class Backup(MakingImages):
    name, label, doing = Job.BACKUP, "Backup", "reading"
    scheduled_as = "Back up a disk"
    holds = ("disk",)

    def start(self, disk: Disk | int | str, user=None, *, mode: Optional[str] = None,
              level: Optional[int] = None, datastore: Optional[Datastore] = None,
              schedule: Optional[Schedule] = None, force: bool = False,
              deltas: Optional[bool] = None) -> Job:
        """Back a disk up now; without a schedule, as the disk's backup schedule would."""
        disk = inventoried(disk, "disk")
        template = schedule or disk.backup_schedule()
        mode = mode or (template.mode if template else "raw")
        level = level if level is not None else (template.level if template else DEFAULT_LEVEL)
        datastore = datastore or (template.datastore if template else default_datastore())
        deltas = deltas if deltas is not None else (template.deltas if template else True)
        checked(validate_mode, mode)
        checked(validate_level, level)
        return self.create(user, host=disk.host, disk=disk, datastore=datastore,
                           schedule=schedule, params={"mode": mode, "level": level,
                                                      "force": force, "deltas": deltas})

    def start_scheduled(self, schedule: Schedule) -> list[Job]:
        return [self.start(schedule.disk, schedule=schedule)]

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.backup.backup(
            job.disk.path, job.datastore.path, expected_id=job.disk.stable_id,
            mode=job.params["mode"], level=job.params["level"],
            force=job.params.get("force", False), deltas=job.params.get("deltas", True),
            progress=progress)

    def ended(self, job: Job, now) -> None:
        if job.disk_id:
            update_alert(job.disk, now)

    def follow_up(self, job: Job) -> None:
        # After the backup is committed: a prune or a copy that cannot start (its disk
        # busy, Redis gone) changes nothing of it.
        if job.schedule_id and job.schedule.kind == Schedule.Kind.BACKUP:
            try:
                KINDS["prune"].start(job.schedule)
            except Refused as exc:
                log.warning("no prune after %s: %s", job, exc)
        if job.disk_id and job.datastore_id:
            for schedule in Schedule.objects.filter(kind=Schedule.Kind.SYNC, enabled=True,
                                                    after_backup=True, datastore=job.datastore):
                try:
                    KINDS["sync"].start(job.datastore, schedule.destination, schedule=schedule,
                                        disk=job.disk)
                except Refused as exc:
                    log.warning("no copy after %s: %s", job, exc)


class Restore(JobKind):
    name, label, doing = "restore", "Restore", "writing"
    holds = ("target_disk",)

    def start(self, image: Image | int, target_disk: Disk | int | str, confirm: Any, user=None,
              *, partition: Any = None) -> Job:
        """Write an image (or only its partition number `partition`) onto an inventoried disk
        of some host, once confirmed by its stable id."""
        image = image_named(image)
        target = inventoried(target_disk, "target disk")
        part = None if partition is None else image_partition(image, partition)
        problem = target.restore_problem(image, part)
        if problem is not None:
            raise Refused(f"target disk {target.stable_id} is {problem}")
        if confirm != target.stable_id:
            raise Refused(f"to overwrite disk {target.stable_id}, confirm with its id "
                          f"{target.stable_id!r}")
        params = {"verify": True} if partition is None else {"verify": True,
                                                              "partition": partition}
        return self.create(user, host=target.host, disk=image.disk, image=image,
                           target_disk=target, datastore=image.datastore, params=params)

    def run(self, job: Job, progress: Progress) -> Any:
        target, allowed = self.target(job)
        return imaging.restore.restore(job.image.path, target,
                                       verify=job.params.get("verify", True), progress=progress,
                                       allowed_targets=allowed,
                                       partition=job.params.get("partition"))

    @staticmethod
    def target(job: Job) -> tuple[str, list[str]]:
        """The target's path now and every path a restore on this host may write.

        From a fresh inventory, not only the database: device names move between
        boots, and only this host's present, inventoried disks may be written.
        """
        fresh = imaging.disks.inventory.inventory()
        known = set(Disk.objects.filter(host__name=settings.HOST_NAME, present=True)
                    .values_list("stable_id", flat=True))
        allowed = [disk["path"] for disk in fresh if disk["id"] in known]
        wanted = job.target_disk.stable_id
        current = next((disk["path"] for disk in fresh if disk["id"] == wanted), None)
        if current is None or wanted not in known:
            raise TargetError(f"disk {wanted} is not a present disk of host "
                              f"{settings.HOST_NAME} now")
        return current, allowed

    def describe(self, job: Job) -> str:
        if not job.target_disk_id:
            return super().describe(job)
        source = (f"{job.disk.title} ({_stamp(job.image)})" if job.disk_id and job.image_id
                  else "an image")
        return f"Restore of {source} onto {job.target_disk.title} on {job.target_disk.host}"

    def result_lines(self, result: dict) -> list[str]:
        if not result.get("target"):
            return []
        checked_back = ("and read it back to compare" if result.get("verified")
                        else "without reading it back")
        return [f"Wrote {size(result.get('size'))} to {result['target']} {checked_back}"]


class ProvingAnImage(OfAnImage):
    """A kind that proves one image where its datastore is; its schedule proves the newest
    image of each disk in the datastore."""

    def start(self, image: Image | int, user=None, schedule: Optional[Schedule] = None) -> Job:
        image = image_named(image)
        return self.create(user, host=datastore_host(image.datastore, image.disk.host),
                           disk=image.disk, image=image, datastore=image.datastore,
                           schedule=schedule)

    def start_latest(self, datastore: Datastore, user=None,
                     schedule: Optional[Schedule] = None) -> list[Job]:
        """Prove the newest image of each disk in the datastore (what a schedule runs)."""
        return [self.start(image, user, schedule=schedule) for image in latest_images(datastore)]

    def start_scheduled(self, schedule: Schedule) -> list[Job]:
        return self.start_latest(schedule.datastore, schedule=schedule)


class Verify(ProvingAnImage):
    name, label, doing = "verify", "Verify", "verifying"
    scheduled_as = "Verify the newest image of each disk"
    changes_catalog = True

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.verify.verify(job.image.path, progress=progress)

    def judge(self, result: dict) -> tuple[str, str]:
        problems = result.get("problems")
        if not problems:
            return super().judge(result)
        return Job.State.FAILED, (f"{len(problems)} damaged chunk(s), first "
                                  f"{problems[0].get('digest')}: {problems[0].get('reason')}")

    def finished(self, job: Job, now) -> None:
        Datastore.objects.filter(pk=job.datastore_id).update(last_verify=now)

    def result_lines(self, result: dict) -> list[str]:
        if "chunks" not in result:
            return []
        problems = result.get("problems") or []
        return ([f"Checked {result['chunks']:,} chunks: "
                 + (f"{len(problems)} damaged" if problems else "all intact")]
                + [f"Damaged chunk {problem.get('digest')}: {problem.get('reason')}"
                   for problem in problems[:20]])


class Boot(ProvingAnImage):
    """A restore drill: every chunk and filesystem of the image checked (verify --fsck),
    then the image booted in a throwaway VM on the worker (imaging boot); the verdict and
    last screen kept as the image's BootTest, its screen live meanwhile."""

    name, label, doing = "boot", "Boot test", "booting"
    scheduled_as = "Boot-test the newest image of each disk"
    shows_screen = True
    changes_catalog = True  # the image's verify record, with its filesystems' checks

    def run(self, job: Job, progress: Progress) -> Any:
        checked = imaging.verify.verify(job.image.path, fsck=True, progress=progress)
        with tempfile.TemporaryDirectory(prefix="boot-test-") as folder:
            shot = Path(folder, "screen.png")
            result = imaging.boot.boot(job.image.path, screenshot=shot, progress=progress,
                                       on_screen=lambda picture: live_screen.show(job, picture))
            picture = shot.read_bytes() if shot.exists() else b""
        outcome = dict(result.as_dict(), screenshot=None, verify=checked.as_dict())
        BootTest.objects.update_or_create(image=job.image, defaults={
            "job": job, "verdict": result.verdict,
            "proven": self.judge(outcome)[0] == Job.State.SUCCEEDED, "seconds": result.seconds,
            "accelerator": result.accelerator, "firmware": result.firmware,
            "detail": result.detail[:500], "console": result.console,
            "screenshot": picture, "finished": timezone.now()})
        return outcome

    def judge(self, result: dict) -> tuple[str, str]:
        checked = result.get("verify") or {}
        reasons = [] if result.get("verdict") == imaging.boot.BOOTED else [
            f"{result.get('verdict')}: {result.get('detail')}"]
        if checked.get("problems"):
            reasons.append(f"{len(checked['problems'])} damaged chunk(s)")
        dirty = [check.shown for check in _filesystem_checks(checked)
                 if check.result == imaging.datastore.verification.DIRTY]
        if dirty:
            reasons.append(f"filesystem check failed on {', '.join(dirty)}")
        return (Job.State.FAILED, "; ".join(reasons)) if reasons else super().judge(result)

    def ended(self, job: Job, now) -> None:
        live_screen.forget(job)
        if job.disk_id:
            update_alert(job.disk, now)

    def result_lines(self, result: dict) -> list[str]:
        if "verdict" not in result:
            return []
        checked = result.get("verify") or {}
        return [f"{result['verdict'].capitalize()} in {result.get('seconds', 0):.1f} s "
                f"({result.get('firmware')}, {result.get('accelerator')}): "
                f"{result.get('detail')}",
                *KINDS["verify"].result_lines(checked),
                *(check.said[:1].upper() + check.said[1:]
                  for check in _filesystem_checks(checked))]


def _filesystem_checks(checked: dict) -> list[imaging.datastore.verification.FilesystemCheck]:
    """The filesystem checks of a verify result, as the engine reads them back."""
    return [imaging.datastore.verification.FilesystemCheck.from_dict(check)
            for check in checked.get("filesystems") or ()]


class Recompress(OfAnImage):
    name, label, doing = "recompress", "Recompress", "recompressing"
    changes_catalog = True

    def start(self, image: Image | int, level: int, user=None) -> Job:
        image = image_named(image)
        checked(validate_level, level)
        return self.create(user, host=datastore_host(image.datastore, image.disk.host),
                           disk=image.disk, image=image, datastore=image.datastore,
                           params={"level": level})

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.recompress.recompress(job.image.path, job.params["level"],
                                             progress=progress)

    def result_lines(self, result: dict) -> list[str]:
        if "before" not in result:
            return []
        return [f"Chunks took {size(result['before'])}, now {size(result.get('after'))}"]


class Export(OfAnImage):
    name, label, doing = "export", "Export", "exporting"

    def start(self, image: Image | int, name: str, user=None, *, level: int = DEFAULT_LEVEL,
              long_distance: bool = False, split_size: Optional[int] = None,
              format: str = imaging.export.ZSTD, host: Optional[Host] = None) -> Job:
        """Export an image as one zstd stream, or as a VM's disk of `format`, into EXPORT_DIR
        of `host` (this host by default)."""
        image = image_named(image)
        checked(validate_level, level)
        if split_size is not None and split_size <= 0:
            raise Refused(f"part size {split_size} must be positive")
        try:
            imaging.export.check_format(format, split_size, long_distance)
        except ImagingError as refused:
            raise Refused(str(refused)) from None
        return self.create(user, host=host or local_host(), disk=image.disk, image=image,
                           datastore=image.datastore, params={
                               "name": plain_name(name, "export name"), "level": level,
                               "long_distance": long_distance, "split_size": split_size,
                               "format": format})

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.export.export(
            job.image.path, self.destination(job), level=job.params["level"],
            long_distance=job.params["long_distance"], split_size=job.params["split_size"],
            format=job.params.get("format", imaging.export.ZSTD), progress=progress)

    @staticmethod
    def destination(job: Job) -> Path:
        """Where an export job writes on this host (the folder is made if missing)."""
        folder = Path(settings.EXPORT_DIR)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TargetError(f"cannot create the export folder {folder}: {exc.strerror}") from None
        return folder / job.params["name"]

    def result_lines(self, result: dict) -> list[str]:
        return [f"Wrote {name}" for name in (result.get("files") or [])[:50]]


class Import(MakingImages):
    name, label, doing = "import", "Import", "importing"

    def start(self, files: Iterable[str], disk_id: str, user=None, *,
              datastore: Optional[Datastore] = None, level: int = DEFAULT_LEVEL,
              host: Optional[Host] = None) -> Job:
        """Import a classic backup lying in IMPORT_DIR of `host` (this host by default)."""
        names = [relative_name(name) for name in files]
        if not names:
            raise Refused("name the archive to import")
        try:
            imaging.datastore.store.check_disk_id(disk_id)
        except ImagingError as exc:
            raise Refused(str(exc)) from None
        checked(validate_level, level)
        return self.create(user, host=host or local_host(),
                           disk=Disk.objects.filter(stable_id=disk_id).first(),
                           datastore=datastore or default_datastore(),
                           params={"files": names, "disk_id": disk_id, "level": level})

    def run(self, job: Job, progress: Progress) -> Any:
        files = [str(Path(settings.IMPORT_DIR) / name) for name in job.params["files"]]
        return imaging.importer.import_archive(files, job.datastore.path,
                                               disk_id=job.params["disk_id"],
                                               level=job.params["level"], progress=progress)

    def catalog_disk_id(self, job: Job) -> Optional[str]:
        return job.params.get("disk_id")


class Prune(JobKind):
    name, label, doing = "prune", "Prune", "pruning"
    changes_catalog = True

    def start(self, schedule: Optional[Schedule] = None, *, disk: Optional[Disk] = None,
              retention: Optional[dict[str, int]] = None, datastore: Optional[Datastore] = None,
              user=None) -> Job:
        """Apply a backup schedule's retention to its disk's images (or the retention given)."""
        if schedule is not None:
            disk, datastore = schedule.disk, schedule.datastore
            retention = schedule.retention()
        if disk is None or retention is None:
            raise Refused("prune needs a backup schedule, or a disk and a retention")
        datastore = datastore or default_datastore()
        checked(validate_retention, retention)
        return self.create(user, host=datastore_host(datastore, disk.host), disk=disk,
                           datastore=datastore, schedule=schedule,
                           params={"retention": retention, "time_zone": schedule.time_zone
                                   if schedule else settings.TIME_ZONE})

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.prune.prune(
            job.datastore.path, job.disk.stable_id,
            imaging.prune.Retention(**job.params["retention"]), progress=progress,
            tz=zoneinfo.ZoneInfo(job.params["time_zone"]))

    def result_lines(self, result: dict) -> list[str]:
        return ([f"Removed {path}" for path in (result.get("removed") or [])[:50]]
                + [f"Kept for now, being read: {path}" for path in result.get("deferred") or []])


class GarbageCollection(JobKind):
    name, label, doing = "gc", "Garbage collection", "collecting garbage"
    scheduled_as = "Collect garbage in the datastore"
    changes_catalog, changes_images = True, False

    def start(self, datastore: Datastore, user=None, schedule: Optional[Schedule] = None) -> Job:
        return self.create(user, host=datastore_host(datastore), datastore=datastore,
                           schedule=schedule)

    def start_scheduled(self, schedule: Schedule) -> list[Job]:
        return [self.start(schedule.datastore, schedule=schedule)]

    def run(self, job: Job, progress: Progress) -> Any:
        return imaging.gc.collect(job.datastore.path, progress=progress)

    def finished(self, job: Job, now) -> None:
        Datastore.objects.filter(pk=job.datastore_id).update(last_gc=now)

    def result_lines(self, result: dict) -> list[str]:
        if "removed" not in result:
            return []
        return [f"Removed {result['removed']:,} unused chunks, freed "
                f"{size(result.get('freed_bytes'))}; kept {result.get('kept_recent', 0):,} "
                "a running backup may still need"]


class Sync(JobKind):
    """A copy of a datastore's images that another datastore (a folder, or an rclone:
    remote) lacks: only missing chunks travel; the destination keeps its own retention."""

    name, label, doing = "sync", "Copy", "copying"
    scheduled_as = "Copy the datastore to another"

    def start(self, datastore: Datastore, destination: Datastore, user=None, *,
              schedule: Optional[Schedule] = None, disk: Optional[Disk] = None) -> Job:
        """Copy the images of `datastore` (of `disk` only, if named; the newest its schedule
        says of each disk) to `destination`."""
        if destination.pk == datastore.pk:
            raise Refused("a datastore is no copy of itself: name another")
        return self.create(user, host=datastore_host(datastore, disk.host if disk else None),
                           disk=disk, datastore=datastore, destination=destination,
                           schedule=schedule,
                           params={"last": schedule.copy_last if schedule else None})

    def start_scheduled(self, schedule: Schedule) -> list[Job]:
        return [self.start(schedule.datastore, schedule.destination, schedule=schedule)]

    def run(self, job: Job, progress: Progress) -> Any:
        destination = job.destination
        return imaging.sync.sync(
            job.datastore.path, destination.path,
            disks=[job.disk.stable_id] if job.disk_id else None, last=job.params.get("last"),
            bwlimit=(destination.bwlimit or None) if destination.is_remote else None,
            progress=progress)

    def finished(self, job: Job, now) -> None:
        """The source's images the destination holds now have a copy there (and no others:
        its own prune may have removed some); it is sealed with the source's key if the
        source is."""
        result = Job.objects.filter(pk=job.pk).values_list("result", flat=True).first() or {}
        since = job.started or now
        source = Datastore.objects.get(pk=job.datastore_id)
        destination = job.destination
        there = {tuple(name.split("/")) for name in result.get("held") or ()}
        images = [image for image in Image.objects.filter(datastore=source)
                  .select_related("disk").only("pk", "stamp", "disk__stable_id")
                  if (image.disk.stable_id, image.stamp) in there]
        copies = ImageCopy.objects.filter(datastore=destination, image__datastore=source)
        copies.exclude(image__in=images).delete()
        recorded = set(copies.values_list("image_id", flat=True))
        ImageCopy.objects.bulk_create([ImageCopy(image=image, datastore=destination,
                                                 synced_at=since)
                                       for image in images if image.pk not in recorded])
        Datastore.objects.filter(pk=destination.pk).update(fingerprint=source.fingerprint)
        for disk in Disk.objects.filter(images__in=images).distinct():
            update_alert(disk, now)

    def describe(self, job: Job) -> str:
        what = f" of {job.disk.title}" if job.disk_id else ""
        return f"{self.label}{what} from {job.datastore} to {job.destination}"

    def title(self, job: Job) -> str:
        return f"{self.label} job #{job.pk} to {job.destination}"

    def result_lines(self, result: dict) -> list[str]:
        if "chunks_sent" not in result:
            return []
        return [f"Copied {len(result.get('copied') or ())} image(s); "
                f"{len(result.get('present') or ())} were there already",
                f"Sent {result['chunks_sent']:,} chunks ({size(result.get('bytes_sent'))}); "
                f"{result.get('chunks_present', 0):,} were there already"]
