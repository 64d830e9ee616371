"""The catalog: hosts, their disks, datastores, images, jobs and schedules.

Rules that answer "what is this thing's state?" live here as methods that take
`now=` so they are testable without moving clocks; use cases that change
several rows (start a job, finish it, sync a schedule) live in services/.
"""
from __future__ import annotations

import datetime as dt
import enum
import functools
import hashlib
import re
import zoneinfo
from pathlib import PurePath
from typing import Optional

from croniter import CroniterBadDateError, croniter
from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator, RegexValidator
from django.db import models
from django.db.models import OuterRef, Prefetch, Q, Subquery
from django.dispatch import Signal
from django.utils import timezone

from imaging.base import rclone

from .formatting import size
from .parameters import BACKUP_MODES, DEFAULT_LEVEL, LEVEL_VALIDATORS, RETENTION_RULES

HOST_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$"
# A Celery queue and channel-layer group name must stay ASCII letters, digits and -_.
validate_host_name = RegexValidator(HOST_NAME_RE, "use letters, digits and ._- only")


def validate_cron(expression: str) -> None:
    if len(expression.split()) != 5 or not croniter.is_valid(expression):
        raise ValidationError(f"{expression!r} is not a five-field cron expression "
                              "(minute hour day-of-month month day-of-week)")
    try:
        croniter(expression).get_next(dt.datetime)
    except CroniterBadDateError:
        raise ValidationError(f"{expression!r} never fires (no such date)") from None


def validate_timezone(name: str) -> None:
    try:
        zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        # "America" is a directory of zones, which zoneinfo reports as an OSError.
        raise ValidationError(f"unknown time zone {name!r}") from None


# Sent (sender: the model) after a queryset update or a bulk_create changed rows: what
# post_save tells of one instance, for the writes that bypass it (a queryset delete still
# sends post_delete per row to whoever listens).
rows_changed = Signal()


class ChangeSignallingQuerySet(models.QuerySet):
    def update(self, **kwargs) -> int:
        rows = super().update(**kwargs)
        if rows:
            rows_changed.send(sender=self.model)
        return rows

    def bulk_create(self, objs, *args, **kwargs):
        created = super().bulk_create(objs, *args, **kwargs)
        if created:
            rows_changed.send(sender=self.model)
        return created


class Host(models.Model):
    name = models.CharField(max_length=63, unique=True, validators=[validate_host_name])
    worker = models.CharField(max_length=255, blank=True, help_text="Celery node that last reported")
    last_seen = models.DateTimeField(null=True, blank=True)

    objects = ChangeSignallingQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def queue(self) -> str:
        return f"host.{self.name}"

    def is_online(self, now: Optional[dt.datetime] = None) -> bool:
        if self.last_seen is None:
            return False
        now = now or timezone.now()
        return now - self.last_seen < dt.timedelta(seconds=settings.HOST_OFFLINE_SECONDS)


class HostAccess(models.Model):
    """What lets another host's worker in: a join command until it is used (only its hash is
    kept), then the host's own Redis user and database role, whose passwords only the host
    holds. Revoked, both are gone."""

    host = models.OneToOneField(Host, on_delete=models.CASCADE, related_name="access")
    join_digest = models.CharField(max_length=64, blank=True, db_index=True,
                                   help_text="SHA-256 of the join command's token")
    join_expires = models.DateTimeField(null=True, blank=True)
    joined_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    redis_password_sha256 = models.CharField(
        max_length=64, blank=True, help_text="what Redis keeps of the host's password, to give "
                                             "the host its user again after Redis restarts")
    created = models.DateTimeField(default=timezone.now)
    created_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                   on_delete=models.SET_NULL, related_name="+")

    class State(models.TextChoices):
        INVITED = "invited"
        EXPIRED = "expired"
        JOINED = "joined"
        REVOKED = "revoked"

    def __str__(self) -> str:
        return f"access of {self.host.name} ({self.state()})"

    def state(self, now: Optional[dt.datetime] = None) -> "HostAccess.State":
        if self.revoked_at is not None:
            return self.State.REVOKED
        if self.joined_at is not None:
            return self.State.JOINED
        now = now or timezone.now()
        if self.join_expires is None or now >= self.join_expires:
            return self.State.EXPIRED
        return self.State.INVITED

    @property
    def redis_user(self) -> str:
        return f"host-{self.host.name}"

    @property
    def database_role(self) -> str:
        """A PostgreSQL role name of the host's own: its name's safe letters, and a hash of the
        whole name so that "a.b" and "a_b" never share one."""
        safe = re.sub(r"[^a-z0-9_]", "_", self.host.name.lower())[:40]
        return f"imaging_host_{safe}_{hashlib.sha256(self.host.name.encode()).hexdigest()[:6]}"


class DatastoreQuerySet(ChangeSignallingQuerySet):
    def folders(self) -> "DatastoreQuerySet":
        """The datastores images are written to: not the rclone: remotes copies fill."""
        return self.exclude(path__startswith=rclone.PREFIX)


class Datastore(models.Model):
    path = models.CharField(max_length=4096, unique=True,
                            help_text="the same path on every host that uses it, or an rclone: "
                                      "remote (a copy that sync jobs fill)")
    label = models.CharField(max_length=63, blank=True,
                             help_text='what people call it: "NAS", "b2-bucket"')
    offsite = models.BooleanField(default=False, help_text="away from the machines it copies: "
                                                           "a fire or a burglary spares it")
    bwlimit = models.CharField(max_length=32, blank=True,
                               help_text="rclone's --bwlimit for copies to it (8M, 1M:off...)")
    # The key's fingerprint when its chunks and images are sealed ("" for a plain store):
    # from its datastore.json when scanned, from its source when a sync made it.
    fingerprint = models.CharField(max_length=32, blank=True)
    total_bytes = models.BigIntegerField(default=0)
    free_bytes = models.BigIntegerField(default=0)
    chunk_count = models.BigIntegerField(default=0)
    chunk_bytes = models.BigIntegerField(default=0, help_text="compressed bytes of all chunks")
    image_count = models.IntegerField(default=0)
    logical_bytes = models.BigIntegerField(default=0, help_text="sum of the images' disk sizes")
    scanned_at = models.DateTimeField(null=True, blank=True)
    last_gc = models.DateTimeField(null=True, blank=True)
    last_verify = models.DateTimeField(null=True, blank=True)

    objects = DatastoreQuerySet.as_manager()

    class Meta:
        ordering = ["path"]

    def __str__(self) -> str:
        return self.label or self.shown_path

    @property
    def is_remote(self) -> bool:
        return rclone.is_remote(self.path)

    @property
    def shown_path(self) -> str:
        """The path with what an rclone connection string holds secret as ***: what pages,
        the API and notifications show."""
        return rclone.shown(self.path)

    @property
    def encrypted(self) -> bool:
        return bool(self.fingerprint)

    @property
    def used_bytes(self) -> int:
        return max(self.total_bytes - self.free_bytes, 0)

    @property
    def dedup_ratio(self) -> Optional[float]:
        """How many bytes of disk each stored byte stands for (compression and dedup)."""
        return self.logical_bytes / self.chunk_bytes if self.chunk_bytes else None


class Protection(enum.StrEnum):
    FAILED = "failed"
    OVERDUE = "overdue"
    NO_OFFSITE = "no-offsite"  # backed up, but no off-site copy as recent as its schedule asks
    UNPROVEN = "unproven"  # backed up, but no image booted in a boot test as recent as asked
    DUE = "due"
    FRESH = "fresh"
    UNSCHEDULED = "unscheduled"

    @property
    def protected(self) -> bool:
        return self in (Protection.FRESH, Protection.DUE)


class DiskQuerySet(ChangeSignallingQuerySet):
    def with_protection_facts(self) -> "DiskQuerySet":
        """Disks with what protection() reads fetched in bulk: a list costs two queries."""
        newest_image = Image.objects.filter(disk=OuterRef("pk")).order_by("-created")
        last_backup_job = (Job.objects.filter(disk=OuterRef("pk"), kind=Job.BACKUP,
                                              state__in=Job.FINISHED_STATES)
                           .order_by("-finished"))
        backup_schedules = (Schedule.objects.filter(kind=Schedule.Kind.BACKUP, enabled=True)
                            .order_by("created"))
        return (self.select_related("host")
                .annotate(last_backup=Subquery(newest_image.values("created")[:1]),
                          last_backup_state=Subquery(last_backup_job.values("state")[:1]),
                          last_offsite=Subquery(ImageCopy.objects.offsite_of(OuterRef("pk"))
                                                .values("image__created")[:1]),
                          last_booted=Subquery(BootTest.objects.booted_of(OuterRef("pk"))
                                               .values("image__created")[:1]))
                .prefetch_related(Prefetch("schedules", queryset=backup_schedules,
                                           to_attr="enabled_backup_schedules")))


class Disk(models.Model):
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="disks")
    stable_id = models.CharField(max_length=200, unique=True,
                                 help_text="from WWN, serial or by-id: survives reboots and "
                                           "recabling; with its host's name when only unique there")
    model = models.CharField(max_length=255, blank=True)
    serial = models.CharField(max_length=255, blank=True)
    wwn = models.CharField(max_length=255, blank=True)
    size = models.BigIntegerField(default=0)
    sector_size = models.IntegerField(default=512)
    path = models.CharField(max_length=4096, blank=True, help_text="where the host sees it now")
    kind = models.CharField(max_length=16, blank=True, help_text="disk, loop or file")
    present = models.BooleanField(default=True, help_text="false once the host stops reporting it")
    mounted = models.BooleanField(default=False)
    mountpoints = models.JSONField(default=list, blank=True)
    read_only = models.BooleanField(default=False)
    partitions = models.JSONField(default=list, blank=True,
                                  help_text='what it holds now: [{"name", "start", "size", '
                                            '"fstype", "label"}], bytes')
    first_seen = models.DateTimeField(default=timezone.now)
    last_seen = models.DateTimeField(null=True, blank=True)
    # When protection last flipped, and when it will next go bad unless a backup comes
    # (the sweeper's index, as healthchecks' alert_after).
    protection_state = models.CharField(max_length=16, default=Protection.UNSCHEDULED)
    alert_after = models.DateTimeField(null=True, blank=True, db_index=True)

    objects = DiskQuerySet.as_manager()

    class Meta:
        ordering = ["host__name", "path", "stable_id"]

    def __str__(self) -> str:
        return f"{self.host.name}:{self.path or self.stable_id}"

    @property
    def short_name(self) -> str:
        """What a user types to confirm overwriting this disk."""
        return self.stable_id

    @property
    def title(self) -> str:
        """What a person calls the disk: its model, else the file it is (a loop device's own
        name changes with every attach; the inventory names it after its file)."""
        if self.model:
            return self.model
        loop_prefix = f"loop-{self.host.name}-"
        if self.kind == "loop" and self.stable_id.startswith(loop_prefix):
            return self.stable_id[len(loop_prefix):]
        return PurePath(self.path).name or self.stable_id

    def backup_schedule(self) -> Optional["Schedule"]:
        if hasattr(self, "enabled_backup_schedules"):  # with_protection_facts()
            return next(iter(self.enabled_backup_schedules), None)
        return (self.schedules.filter(kind=Schedule.Kind.BACKUP, enabled=True)
                .order_by("created").first())

    def last_backup_at(self) -> Optional[dt.datetime]:
        if hasattr(self, "last_backup"):  # with_protection_facts()
            return self.last_backup
        image = self.last_image()
        return image.created if image is not None else None

    def last_backup_failed(self) -> bool:
        if hasattr(self, "last_backup_state"):  # with_protection_facts()
            return self.last_backup_state == Job.State.FAILED
        job = self.last_backup_job()
        return job is not None and job.state == Job.State.FAILED

    def last_image(self) -> Optional["Image"]:
        return self.images.order_by("-created").first()

    def last_offsite_at(self) -> Optional[dt.datetime]:
        """When the newest image with a copy in an off-site datastore was taken."""
        if hasattr(self, "last_offsite"):  # with_protection_facts()
            return self.last_offsite
        return (ImageCopy.objects.offsite_of(self.pk).values_list("image__created", flat=True)
                .first())

    def offsite_due_at(self, schedule: "Schedule") -> Optional[dt.datetime]:
        """When the disk lacks an off-site copy as recent as `schedule` asks (None: it asks
        for none). Counted from the schedule's start while no image has one."""
        if schedule.offsite_within is None:
            return None
        return (self.last_offsite_at() or schedule.created) + schedule.offsite_within

    def last_booted_at(self) -> Optional[dt.datetime]:
        """When the newest image that booted in a boot test was taken."""
        if hasattr(self, "last_booted"):  # with_protection_facts()
            return self.last_booted
        return BootTest.objects.booted_of(self.pk).values_list("image__created", flat=True).first()

    def boot_due_at(self, schedule: "Schedule") -> Optional[dt.datetime]:
        """When the disk lacks an image proven to boot as recent as `schedule` asks (None: it
        asks for none). Counted from the schedule's start while no image has booted."""
        if schedule.boot_within is None:
            return None
        return (self.last_booted_at() or schedule.created) + schedule.boot_within

    def last_backup_job(self) -> Optional["Job"]:
        return (self.jobs.filter(kind=Job.BACKUP, state__in=Job.FINISHED_STATES)
                .order_by("-finished").first())

    def due_at(self, schedule: Optional["Schedule"] = None) -> Optional[dt.datetime]:
        """The scheduled run the next backup answers: the first fire time after the anchor."""
        schedule = schedule or self.backup_schedule()
        if schedule is None:
            return None
        return schedule.next_run_after(self.last_backup_at() or schedule.created)

    def protection(self, now: Optional[dt.datetime] = None) -> Protection:
        now = now or timezone.now()
        if self.last_backup_failed():
            return Protection.FAILED
        schedule = self.backup_schedule()
        if schedule is None:
            return Protection.UNSCHEDULED
        due_at = self.due_at(schedule)
        if now >= due_at + schedule.grace:
            return Protection.OVERDUE
        offsite_due_at = self.offsite_due_at(schedule)
        if offsite_due_at is not None and now >= offsite_due_at:
            return Protection.NO_OFFSITE
        boot_due_at = self.boot_due_at(schedule)
        if boot_due_at is not None and now >= boot_due_at:
            return Protection.UNPROVEN
        if now >= due_at:
            return Protection.DUE
        return Protection.FRESH

    def restore_problem(self, image: "Image", partition=None) -> Optional[str]:
        """Why this disk cannot take `image` (or only `partition` of it, anything with a
        number and a size) now, or None. Whether another job holds it is decided where
        the job is created, under a lock (services)."""
        if not self.present:
            return f"gone: host {self.host.name} no longer reports it"
        if self.read_only:
            return "read-only"
        if partition is None and self.size < image.size:
            return f"too small: {size(self.size)}, the image is {size(image.size)}"
        if partition is not None and self.size < partition.size:
            return (f"too small: {size(self.size)}, partition {partition.number} is "
                    f"{size(partition.size)}")
        if self.mounted:
            return f"mounted at {', '.join(self.mountpoints) or 'a partition'}: unmount it first"
        return None

    def going_bad_after(self) -> Optional[dt.datetime]:
        """When, without a new backup or copy, protection next turns bad (None: never by
        itself)."""
        schedule = self.backup_schedule()
        if schedule is None:
            return None
        moments = [self.due_at(schedule) + schedule.grace, self.offsite_due_at(schedule),
                   self.boot_due_at(schedule)]
        return min(moment for moment in moments if moment is not None)


class Image(models.Model):
    datastore = models.ForeignKey(Datastore, on_delete=models.CASCADE, related_name="images")
    disk = models.ForeignKey(Disk, on_delete=models.PROTECT, related_name="images")
    stamp = models.CharField(max_length=32)
    path = models.CharField(max_length=4096, unique=True)
    mode = models.CharField(max_length=8, default="raw")
    status = models.CharField(max_length=32, default="complete")
    size = models.BigIntegerField(default=0)
    stored_bytes = models.BigIntegerField(default=0)
    new_bytes = models.BigIntegerField(default=0)
    bad_bytes = models.BigIntegerField(default=0)
    sha256 = models.CharField(max_length=64, blank=True)
    level = models.IntegerField(default=3)
    created = models.DateTimeField()
    seconds = models.FloatField(default=0)
    mounted_rw = models.BooleanField(default=False)
    # In an encrypted datastore: its files, chunks and SHA-256 need the key the workers hold.
    encrypted = models.BooleanField(default=False)
    # {"at", "note"} while prune and deletion must keep it (`imaging protect`), else null.
    protected = models.JSONField(null=True, blank=True)
    verified_at = models.DateTimeField(null=True, blank=True)
    verify_ok = models.BooleanField(null=True, blank=True)
    filesystems = models.JSONField(
        null=True, blank=True, help_text='the last restore drill\'s checks (verify --fsck): '
                                         '[{"number", "volume", "type", "result", "detail"}]')
    partitions = models.JSONField(default=list, blank=True,
                                  help_text='what the disk held: [{"name", "start", "size", '
                                            '"type", "fstype", "label"}], bytes')
    bad_ranges = models.JSONField(default=list, blank=True,
                                  help_text="where its read errors are: [[offset, length]], bytes")

    objects = ChangeSignallingQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["disk", "-created"])]
        constraints = [models.UniqueConstraint(fields=["datastore", "disk", "stamp"],
                                               name="one_image_per_stamp")]

    def __str__(self) -> str:
        return f"{self.disk.stable_id}/{self.stamp}"

    @property
    def verified(self) -> bool:
        return bool(self.verify_ok)

    @property
    def dedup_ratio(self) -> Optional[float]:
        return self.size / self.stored_bytes if self.stored_bytes else None


class ImageCopyQuerySet(ChangeSignallingQuerySet):
    def offsite_of(self, disk) -> "ImageCopyQuerySet":
        """The disk's images' copies in off-site datastores, newest image first."""
        return self.filter(image__disk=disk, datastore__offsite=True).order_by("-image__created")


class ImageCopy(models.Model):
    """An image that a sync job found or put in another datastore: its copy there."""

    image = models.ForeignKey(Image, on_delete=models.CASCADE, related_name="copies")
    datastore = models.ForeignKey(Datastore, on_delete=models.CASCADE, related_name="copies_held")
    synced_at = models.DateTimeField(help_text="when the sync that found or made it there began")

    objects = ImageCopyQuerySet.as_manager()

    class Meta:
        ordering = ["datastore__label", "datastore__path"]
        constraints = [models.UniqueConstraint(fields=["image", "datastore"],
                                               name="one_copy_per_datastore")]

    def __str__(self) -> str:
        return f"{self.image} in {self.datastore}"


class JobQuerySet(ChangeSignallingQuerySet):
    def lost(self, now: dt.datetime) -> "JobQuerySet":
        """Running, but their worker stopped beating: it died with them."""
        before = now - dt.timedelta(seconds=settings.JOB_LOST_SECONDS)
        return self.filter(state=Job.State.RUNNING).filter(
            Q(heartbeat_at__lt=before) | Q(heartbeat_at__isnull=True, started__lt=before))

    def stalled(self, now: dt.datetime) -> "JobQuerySet":
        """Job.is_stalled() as a query."""
        before = now - dt.timedelta(seconds=settings.JOB_STALL_SECONDS)
        return self.filter(state=Job.State.RUNNING).filter(
            Q(progress_moved_at__lt=before) | Q(progress_moved_at__isnull=True, started__lt=before))


class Job(models.Model):
    # The kind whose jobs make a disk's images, which protection reads; every kind, this one
    # too, is an entry of services/kinds.py, the only place that knows what a kind does.
    BACKUP = "backup"

    class State(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        SUCCEEDED_WITH_WARNINGS = "succeeded-with-warnings"
        FAILED = "failed"
        CANCELLED = "cancelled"

    ACTIVE_STATES = (State.QUEUED, State.RUNNING)
    FINISHED_STATES = (State.SUCCEEDED, State.SUCCEEDED_WITH_WARNINGS, State.FAILED,
                       State.CANCELLED)

    kind = models.CharField(max_length=16, help_text="which kind of job: backup, restore, gc...")
    state = models.CharField(max_length=32, choices=State.choices, default=State.QUEUED,
                             db_index=True)
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="jobs",
                             help_text="whose worker runs it")
    disk = models.ForeignKey(Disk, null=True, blank=True, on_delete=models.SET_NULL,
                             related_name="jobs", help_text="the disk read, or whose image it is")
    image = models.ForeignKey(Image, null=True, blank=True, on_delete=models.SET_NULL,
                              related_name="jobs")
    target_disk = models.ForeignKey(Disk, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="restore_jobs")
    datastore = models.ForeignKey(Datastore, null=True, blank=True, on_delete=models.SET_NULL,
                                  related_name="jobs")
    destination = models.ForeignKey(Datastore, null=True, blank=True, on_delete=models.SET_NULL,
                                    related_name="sync_jobs", help_text="where a sync copies to")
    schedule = models.ForeignKey("Schedule", null=True, blank=True, on_delete=models.SET_NULL,
                                 related_name="jobs")
    params = models.JSONField(default=dict, blank=True)
    progress = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True)
    result = models.JSONField(null=True, blank=True)
    requested_by = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True,
                                     on_delete=models.SET_NULL, related_name="jobs")
    created = models.DateTimeField(default=timezone.now, db_index=True)
    started = models.DateTimeField(null=True, blank=True)
    finished = models.DateTimeField(null=True, blank=True)
    worker = models.CharField(max_length=255, blank=True, help_text="Celery node that ran it")
    cancel_requested = models.BooleanField(default=False)
    heartbeat_at = models.DateTimeField(null=True, blank=True)
    progress_moved_at = models.DateTimeField(null=True, blank=True)
    stall_notified = models.BooleanField(default=False)
    note = models.CharField(max_length=500, blank=True,
                            help_text="why a queued job waits (its host is offline, ...)")

    objects = JobQuerySet.as_manager()

    class Meta:
        ordering = ["-created"]
        indexes = [models.Index(fields=["state", "heartbeat_at"])]

    def __str__(self) -> str:
        return f"{self.kind} #{self.pk} ({self.state})"

    @property
    def is_active(self) -> bool:
        return self.state in self.ACTIVE_STATES

    def is_stalled(self, now: Optional[dt.datetime] = None) -> bool:
        """Running, yet its progress has not moved for JOB_STALL_SECONDS: a flag, not a state
        (JobQuerySet.stalled() asks the same of the database)."""
        if self.state != self.State.RUNNING:
            return False
        moved = self.progress_moved_at or self.started
        if moved is None:
            return False
        now = now or timezone.now()
        return now - moved >= dt.timedelta(seconds=settings.JOB_STALL_SECONDS)


class BootTestQuerySet(ChangeSignallingQuerySet):
    def booted_of(self, disk) -> "BootTestQuerySet":
        """The drills that proved an image of `disk`, newest image first."""
        return self.filter(image__disk=disk, proven=True).order_by("-image__created")


class BootTest(models.Model):
    """An image's last boot test (imaging boot): how it went, and its screen."""

    BOOTED = "booted"  # imaging.boot.BOOTED: the verdict that proves the image

    image = models.OneToOneField(Image, on_delete=models.CASCADE, related_name="boot_test")
    job = models.ForeignKey(Job, null=True, blank=True, on_delete=models.SET_NULL,
                            related_name="+")
    verdict = models.CharField(max_length=16)
    # Booted, every chunk intact and no filesystem dirty: the image is proven restorable.
    proven = models.BooleanField(default=False)
    seconds = models.FloatField()
    accelerator = models.CharField(max_length=8)
    firmware = models.CharField(max_length=8)
    detail = models.CharField(max_length=500, blank=True)
    console = models.JSONField(default=list, blank=True)
    screenshot = models.BinaryField(blank=True, help_text="the last screen, PNG")
    finished = models.DateTimeField()

    objects = BootTestQuerySet.as_manager()

    @property
    def booted(self) -> bool:
        return self.verdict == self.BOOTED


class Schedule(models.Model):
    class Kind(models.TextChoices):
        BACKUP = "backup"
        VERIFY = "verify"
        GC = "gc"
        SYNC = "sync"
        BOOT = "boot"

    kind = models.CharField(max_length=8, choices=Kind.choices, default=Kind.BACKUP)
    disk = models.ForeignKey(Disk, null=True, blank=True, on_delete=models.CASCADE,
                             related_name="schedules", help_text="the disk backed up")
    datastore = models.ForeignKey(Datastore, on_delete=models.PROTECT, related_name="schedules")
    destination = models.ForeignKey(Datastore, null=True, blank=True, on_delete=models.PROTECT,
                                    related_name="syncs_in",
                                    help_text="where a sync schedule copies the datastore to")
    after_backup = models.BooleanField(
        default=False, help_text="a sync schedule also copies each new image as its backup ends")
    copy_last = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)],
        help_text="a sync schedule copies the newest N images of each disk (none: every image); "
                  "the destination's own prune keeps what it keeps of them")
    offsite_within = models.DurationField(
        null=True, blank=True, help_text="a backup schedule wants the disk's newest off-site "
                                         "copy no older than this; none: no off-site rule")
    boot_within = models.DurationField(
        null=True, blank=True, help_text="a backup schedule wants the disk's newest image "
                                         "proven to boot no older than this; none: no rule")
    cron = models.CharField(max_length=100, default="0 3 * * *", validators=[validate_cron])
    time_zone = models.CharField(max_length=64, default="UTC", validators=[validate_timezone])
    mode = models.CharField(max_length=8, default="used",
                            choices=[(mode, mode) for mode in BACKUP_MODES])
    level = models.IntegerField(default=DEFAULT_LEVEL, validators=LEVEL_VALIDATORS)
    deltas = models.BooleanField(
        default=True, help_text="Store changed chunks as deltas against the previous image's; "
                                "off: each image holds nothing only older images held")
    keep_last = models.PositiveIntegerField(default=7)
    keep_hourly = models.PositiveIntegerField(default=0)
    keep_daily = models.PositiveIntegerField(default=14)
    keep_weekly = models.PositiveIntegerField(default=8)
    keep_monthly = models.PositiveIntegerField(default=12)
    keep_yearly = models.PositiveIntegerField(default=0)
    enabled = models.BooleanField(default=True)
    grace = models.DurationField(default=dt.timedelta(hours=1))
    notify_urls = models.TextField(blank=True, help_text="Apprise URLs, one per line or space-separated")
    notify_on_success = models.BooleanField(default=False)
    periodic_task = models.OneToOneField("django_celery_beat.PeriodicTask", null=True, blank=True,
                                         on_delete=models.SET_NULL, related_name="+")
    created = models.DateTimeField(default=timezone.now)

    objects = ChangeSignallingQuerySet.as_manager()

    class Meta:
        ordering = ["created"]

    def __str__(self) -> str:
        what = self.disk.stable_id if self.disk_id else str(self.datastore)
        return f"{self.kind} {what} at {self.cron!r}"

    def clean(self) -> None:
        if self.kind == self.Kind.BACKUP and self.disk_id is None:
            raise ValidationError({"disk": "a backup schedule names its disk"})
        if self.kind != self.Kind.BACKUP and self.disk_id is not None:
            raise ValidationError({"disk": f"a {self.kind} schedule is per datastore, not per disk"})
        if self.datastore_id is not None and self.datastore.is_remote:
            raise ValidationError({"datastore": f"{self.datastore} is an rclone: remote, which "
                                                "copies fill: name a datastore folder"})
        if self.kind == self.Kind.SYNC:
            if self.destination_id is None:
                raise ValidationError({"destination": "a sync schedule names the datastore it "
                                                      "copies to"})
            if self.destination_id == self.datastore_id:
                raise ValidationError({"destination": "a datastore is no copy of itself: name "
                                                      "another"})
        elif self.destination_id is not None or self.after_backup or self.copy_last:
            raise ValidationError({"destination": f"a {self.kind} schedule copies nothing"})
        for rule, what in (("offsite_within", "an off-site rule"),
                           ("boot_within", "a boot-test rule")):
            if getattr(self, rule) is not None and self.kind != self.Kind.BACKUP:
                raise ValidationError({rule: f"{what} belongs to a backup schedule"})
            if getattr(self, rule) is not None and getattr(self, rule) <= dt.timedelta(0):
                raise ValidationError({rule: "give a positive time"})

    def next_run_after(self, moment: dt.datetime) -> dt.datetime:
        return self.next_runs(moment, 1)[0]

    def next_runs(self, moment: dt.datetime, count: int) -> list[dt.datetime]:
        """The next `count` fire times after `moment`, computed in the schedule's zone, in UTC."""
        return list(fire_times(self.cron, self.time_zone, moment, count))

    def retention(self) -> dict[str, int]:
        return {rule: getattr(self, f"keep_{rule}") for rule in RETENTION_RULES}

    def notification_urls(self) -> list[str]:
        return [url for url in self.notify_urls.replace(",", " ").split() if url]


@functools.lru_cache(maxsize=16384)
def fire_times(cron: str, time_zone: str, moment: dt.datetime, count: int) -> tuple[dt.datetime, ...]:
    """Cron fire times after `moment`, in UTC. Remembered: croniter takes a quarter of a
    millisecond a call, and every disk of a listing asks it again on every page view."""
    runs = croniter(cron, moment.astimezone(zoneinfo.ZoneInfo(time_zone)))
    return tuple(runs.get_next(dt.datetime).astimezone(dt.timezone.utc) for _ in range(count))


class StatusChange(models.Model):
    """A disk's protection flipped; one row, one notification (healthchecks' Flip)."""

    disk = models.ForeignKey(Disk, on_delete=models.CASCADE, related_name="status_changes")
    old = models.CharField(max_length=16)
    new = models.CharField(max_length=16)
    created = models.DateTimeField(default=timezone.now)
    notified_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created"]

    def __str__(self) -> str:
        return f"{self.disk.stable_id}: {self.old} -> {self.new}"
