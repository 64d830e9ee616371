"""What the pages show: each page's rows in a fixed number of queries, and the words,
tones and shapes that present them. The rules stay on the models and in services;
this module only reads them."""
from __future__ import annotations

import dataclasses
import datetime as dt
import re
from typing import Iterable, Optional

from cron_descriptor import CasingTypeEnum, ExpressionDescriptor, Options
from django.core.paginator import Page, Paginator
from django.db.models import Count, OuterRef, Q, Subquery
from django.utils import timezone

from imaging.datastore.verification import CLEAN, DIRTY, FilesystemCheck

from .formatting import duration, size
from .models import Datastore, Disk, Host, Image, ImageCopy, Job, Protection, Schedule
from .services.copies import copies_of
from .services.registry import KINDS, held_disk_ids

HISTORY_PAGE_SIZE = 25
CHART_POINTS = 360
RECENT_FAILURE_DAYS = 7
RECENT_FAILURES = 5


# --- disks: "is every disk protected?" ------------------------------------------------

class Tone:
    """How a state looks: green, amber, red, or grey for what protects nothing."""

    GOOD, WARN, BAD, IDLE = "good", "warn", "bad", "idle"


@dataclasses.dataclass
class DiskStatus:
    protection: Protection
    tone: str
    label: str
    notes: list[str]
    due_at: Optional[dt.datetime]

    @property
    def severity(self) -> int:
        return [Tone.BAD, Tone.WARN, Tone.IDLE, Tone.GOOD].index(self.tone)


def disks_with_status(disks: Iterable[Disk], now: Optional[dt.datetime] = None) -> list[Disk]:
    """The disks, each given `.status` (a DiskStatus) and `.copies` (a CopiesLine of its
    newest image, with_last_image() disks only)."""
    now = now or timezone.now()
    disks = list(disks)
    newest = [disk.last_image_id for disk in disks if getattr(disk, "last_image_id", None)]
    copies: dict[int, list[ImageCopy]] = {}
    for copy in ImageCopy.objects.filter(image_id__in=newest).select_related("datastore"):
        copies.setdefault(copy.image_id, []).append(copy)
    stores = {store.pk: store for store in Datastore.objects.filter(
        pk__in={disk.last_image_store for disk in disks if getattr(disk, "last_image_id", None)})}
    for disk in disks:
        disk.status = disk_status(disk, now)
        if getattr(disk, "last_image_id", None):
            disk.copies = CopiesLine.of(stores[disk.last_image_store],
                                        copies.get(disk.last_image_id, []))
    return disks


def with_last_image(disks):
    """Disk.objects.with_protection_facts() plus what the newest image says about itself."""
    newest = Image.objects.filter(disk=OuterRef("pk")).order_by("-created")
    return (disks.with_protection_facts()
            .annotate(last_bad_bytes=Subquery(newest.values("bad_bytes")[:1]),
                      last_mounted_rw=Subquery(newest.values("mounted_rw")[:1]),
                      last_image_id=Subquery(newest.values("pk")[:1]),
                      last_image_store=Subquery(newest.values("datastore")[:1])))


@dataclasses.dataclass
class CopiesLine:
    """Where an image is kept: its datastore and its on-site copies; its off-site copies,
    each with when it was last found or put there ("on site: NAS; off site: b2, 6 h ago")."""

    onsite: list[tuple[Datastore, Optional[dt.datetime]]]
    offsite: list[tuple[Datastore, Optional[dt.datetime]]]

    @classmethod
    def of(cls, home: Datastore, copies: Iterable[ImageCopy]) -> "CopiesLine":
        places = [(home, None)] + sorted(((copy.datastore, copy.synced_at) for copy in copies),
                                         key=lambda place: str(place[0]))
        return cls([place for place in places if not place[0].offsite],
                   [place for place in places if place[0].offsite])


def disk_status(disk: Disk, now: Optional[dt.datetime] = None) -> DiskStatus:
    """Green when fresh; amber when due, or the last image had read errors or was taken
    while mounted read-write; red when failed, overdue or never backed up."""
    now = now or timezone.now()
    protection = disk.protection(now)
    schedule = disk.backup_schedule()
    due_at = disk.due_at(schedule) if schedule is not None else None
    notes = []
    if getattr(disk, "last_bad_bytes", None):
        notes.append(f"{size(disk.last_bad_bytes)} unreadable in the last backup")
    if getattr(disk, "last_mounted_rw", None):
        notes.append("the last backup was taken while mounted read-write")
    if not disk.present:
        notes.append(f"gone: host {disk.host.name} no longer reports it")
    never = disk.last_backup_at() is None
    if protection == Protection.FAILED:
        tone, label = Tone.BAD, "Last backup failed"
    elif protection == Protection.OVERDUE:
        tone, label = Tone.BAD, "Overdue"
    elif protection == Protection.NO_OFFSITE:
        tone, label = Tone.BAD, "No off-site copy"
        notes.append(f"no off-site copy newer than {duration(schedule.offsite_within.total_seconds())}")
    elif protection == Protection.UNPROVEN:
        tone, label = Tone.BAD, "Not proven to boot"
        notes.append(f"no image that booted in a boot test newer than "
                     f"{duration(schedule.boot_within.total_seconds())}")
    elif never:
        tone, label = Tone.BAD, "Never backed up"
    elif protection == Protection.DUE:
        tone, label = Tone.WARN, "Due now"
    elif protection == Protection.FRESH:
        tone, label = (Tone.WARN if notes else Tone.GOOD), "Protected"
    else:
        tone, label = Tone.IDLE, "No schedule"
    return DiskStatus(protection, tone, label, notes, due_at)


# --- the dashboard ------------------------------------------------------------------------

@dataclasses.dataclass
class Summary:
    disks: int
    protected: int
    attention: int  # red
    warnings: int  # amber
    tone: str

    @property
    def headline(self) -> str:
        if not self.disks:
            return "No disks yet"
        if self.attention:
            return (f"{self.attention} of {self.disks} disk{'s' if self.disks > 1 else ''} "
                    f"need{'s' if self.attention == 1 else ''} attention")
        if self.protected == self.disks:
            return ("Every disk is protected" if self.disks > 1 else "The disk is protected")
        return f"{self.protected} of {self.disks} disks protected"


def summary(disks: list[Disk]) -> Summary:
    bad = sum(disk.status.tone == Tone.BAD for disk in disks)
    warn = sum(disk.status.tone == Tone.WARN for disk in disks)
    protected = sum(disk.status.protection.protected for disk in disks)
    tone = Tone.BAD if bad else Tone.WARN if warn or protected < len(disks) else Tone.GOOD
    return Summary(len(disks), protected, bad, warn, tone if disks else Tone.IDLE)


def dashboard(now: Optional[dt.datetime] = None) -> dict:
    now = now or timezone.now()
    disks = disks_with_status(with_last_image(Disk.objects.all()), now)
    disks.sort(key=lambda disk: (disk.status.severity, not disk.present, disk.host.name,
                                 disk.title))
    failures = (jobs_with_subjects(Job.objects.filter(
        state=Job.State.FAILED, finished__gte=now - dt.timedelta(days=RECENT_FAILURE_DAYS)))
        .order_by("-finished")[:RECENT_FAILURES])
    return {
        "disks": disks,
        "summary": summary(disks),
        "hosts": hosts_with_counts(),
        "running": active_jobs(),
        "failures": list(failures),
        "failure_days": RECENT_FAILURE_DAYS,
        "datastores": datastores(),
    }


def datastores() -> list[Datastore]:
    """Each datastore, given `.saved_bytes`: how many more disk bytes its images hold than
    it stores, `.copies`: where it is copied to, and `.sources`: the stores copied to it."""
    stores = list(Datastore.objects.all())
    for store in stores:
        store.saved_bytes = max(store.logical_bytes - store.chunk_bytes, 0)
        store.copies = copies_of(store)
    for store in stores:
        store.sources = [source for source in stores
                         if any(copy.destination.pk == store.pk for copy in source.copies)]
    return stores


def hosts_with_disks() -> list[Host]:
    """Every host, each given `.disk_rows`: its disks with their status, and `.access_state`:
    how a host that joined with a join command stands ("" for the others)."""
    hosts = list(Host.objects.select_related("access"))
    disks = disks_with_status(with_last_image(Disk.objects.all()))
    now = timezone.now()
    for host in hosts:
        host.disk_rows = [disk for disk in disks if disk.host_id == host.pk]
        access = getattr(host, "access", None)
        host.access_state = access.state(now).value if access is not None else ""
    return hosts


def hosts_with_counts():
    return Host.objects.annotate(disk_count=Count("disks", filter=Q(disks__present=True)))


def jobs_with_subjects(jobs):
    return jobs.select_related("host", "disk__host", "target_disk__host", "image", "datastore")


def active_jobs() -> list[Job]:
    jobs = Job.objects.filter(state__in=Job.ACTIVE_STATES)
    return list(jobs_with_subjects(jobs).order_by("created"))


def describe_job(job: Job) -> str:
    return KINDS[job.kind].describe(job)


def job_subject_disk(job: Job) -> Optional[Disk]:
    """The disk a job's page links back to: the one written, else the one read."""
    return job.target_disk if job.target_disk_id else job.disk


def job_timing(job: Job) -> dict:
    """How long a finished job took and, for bytes, its average rate."""
    if not (job.started and job.finished):
        return {"job_seconds": None, "average_rate": None}
    seconds = max((job.finished - job.started).total_seconds(), 0.001)
    progress = job.progress if isinstance(job.progress, dict) else {}
    done = progress.get("done") or 0
    rate = done / seconds if progress.get("unit", "bytes") == "bytes" and done else None
    return {"job_seconds": seconds, "average_rate": rate}


def job_log(job: Job) -> list[tuple[Optional[dt.datetime], str]]:
    """What happened to a job, from its row: queued, started, waiting, finished, result."""
    by = f" by {job.requested_by}" if job.requested_by_id else (
        " by its schedule" if job.schedule_id else "")
    lines: list[tuple[Optional[dt.datetime], str]] = [
        (job.created, f"Queued{by} for host {job.host}")]
    if job.note:
        lines.append((None, job.note))
    if job.started:
        lines.append((job.started, f"Started on {job.worker or job.host}"))
    if job.cancel_requested and job.state == Job.State.RUNNING:
        lines.append((None, "Cancel requested: it stops after the chunk in hand"))
    if job.finished:
        lines.append((job.finished, _finished_words(job)))
    result = job.result if isinstance(job.result, dict) else {}
    lines.extend((None, line) for line in KINDS[job.kind].result_lines(result))
    return lines


def _finished_words(job: Job) -> str:
    words = {Job.State.SUCCEEDED: "Succeeded", Job.State.FAILED: "Failed",
             Job.State.CANCELLED: "Cancelled",
             Job.State.SUCCEEDED_WITH_WARNINGS: "Succeeded with warnings"}[job.state]
    took = ""
    if job.started:
        took = f" after {duration((job.finished - job.started).total_seconds())}"
    return f"{words}{took}" + (f": {job.error}" if job.error else "")


# --- a disk's page --------------------------------------------------------------------

def fsck_summary(filesystems: list[dict]) -> tuple[str, str, str]:
    """(tag tone, label, each check in a line) of a verify record's filesystem checks."""
    checks = [FilesystemCheck.from_dict(check) for check in filesystems]
    results = {check.result for check in checks}
    tone, label = (("bad", "fsck dirty") if DIRTY in results
                   else ("good", "fsck clean") if results == {CLEAN}
                   else ("", "fsck partly"))
    each = "\n".join(check.said + (f": {check.detail}" if check.detail else "")
                     for check in checks)
    return tone, label, each


def disk_history(disk: Disk, page_number) -> Page:
    images = (Image.objects.filter(disk=disk).select_related("datastore", "boot_test")
              .defer("boot_test__screenshot", "boot_test__console").order_by("-created"))
    page = Paginator(images, HISTORY_PAGE_SIZE).get_page(page_number)
    page.object_list = list(page.object_list)
    for image in page.object_list:
        image.disk = disk  # the rows' own disk, already loaded
    return page


def latest_job(disk: Disk) -> Optional[Job]:
    """The job the disk page follows: the oldest active one, else the newest of any kind."""
    jobs = jobs_with_subjects(Job.objects.filter(Q(disk=disk) | Q(target_disk=disk)))
    return (jobs.filter(state__in=Job.ACTIVE_STATES).order_by("created").first()
            or jobs.order_by("-created").first())


@dataclasses.dataclass
class Chart:
    """An SVG chart of sizes over time, in a viewBox of WIDTH x HEIGHT."""

    WIDTH = 720
    HEIGHT = 200
    TOP = 18  # room for the top size label, written above its grid line

    series: list[dict]  # {"name", "css", "path", "area", "dots"}
    y_ticks: list[tuple[float, str]]  # (y, label)
    x_ticks: list[tuple[float, str]]
    points: list[list]  # [x, ms since 1970, value, ...] for the hover read-out
    empty: bool


def history_chart(disk: Disk) -> Chart:
    """Stored and new bytes of each of the disk's images, oldest to newest."""
    rows = list(Image.objects.filter(disk=disk).order_by("created")
                .values_list("created", "stored_bytes", "new_bytes"))
    return size_chart(rows, [("Stored", "stored"), ("New", "new")])


def size_chart(rows: list[tuple], names: list[tuple[str, str]]) -> Chart:
    """rows: (moment, value, value, ...), in time order; names: (legend, css class) each.

    Past CHART_POINTS rows, evenly spaced ones stand for the rest (the newest always
    among them): the chart is not wider than that many points on a screen anyway."""
    width, height, top = Chart.WIDTH, Chart.HEIGHT, Chart.TOP
    if not rows:
        return Chart([], [], [], [], True)
    if len(rows) > CHART_POINTS:
        stride = len(rows) / CHART_POINTS
        rows = [rows[int(number * stride)] for number in range(CHART_POINTS - 1)] + [rows[-1]]
    first, last = rows[0][0], rows[-1][0]
    span = max((last - first).total_seconds(), 1)
    top_value = max(max(row[1:]) for row in rows) or 1
    step, unit_label = _nice_step(top_value)
    y_max = step * -(-top_value // step)
    plot_h = height - top

    def x_of(moment) -> float:
        return width * (moment - first).total_seconds() / span if len(rows) > 1 else width / 2

    def y_of(value) -> float:
        return top + plot_h * (1 - value / y_max)

    xs = [x_of(row[0]) for row in rows]
    series = []
    for column, (name, css) in enumerate(names, start=1):
        coords = [(x, y_of(row[column])) for x, row in zip(xs, rows)]
        line = " ".join(f"{'L' if i else 'M'}{x:.1f},{y:.1f}" for i, (x, y) in enumerate(coords))
        area = f"{line} L{coords[-1][0]:.1f},{height} L{coords[0][0]:.1f},{height} Z"
        # Few points: a dot on each (a zero-length stroke stays round however the chart stretches).
        dots = " ".join(f"M{x:.1f},{y:.1f} l0,0" for x, y in coords) if len(coords) <= 60 else ""
        series.append({"name": name, "css": css, "path": line, "area": area, "dots": dots})
    y_ticks = [(y_of(step * i), unit_label(step * i)) for i in range(int(y_max // step) + 1)]
    x_ticks = [(xs[0], _day(first))]
    if len(rows) > 1 and _day(last) != _day(first):
        # Between the first and the last date, a few evenly spaced ones.
        between = [first + (last - first) * quarter / 4 for quarter in (1, 2, 3)]
        x_ticks += [(x_of(moment), _day(moment)) for moment in between]
        x_ticks.append((xs[-1], _day(last)))
    # For the read-out under the pointer: x, the moment (ms since 1970) and the values.
    points = [[round(x, 1), int(row[0].timestamp() * 1000), *row[1:]] for x, row in zip(xs, rows)]
    return Chart(series, y_ticks, x_ticks, points, False)


def _day(moment: dt.datetime) -> str:
    return timezone.localtime(moment).strftime("%d %b %Y")


def _nice_step(top_value: int):
    """A tick step of 1, 2 or 5 times a binary unit, giving 2 to 5 ticks under top_value."""
    units = [(1024 ** power, name) for power, name in enumerate(("B", "KiB", "MiB", "GiB", "TiB"))]
    base, name = next(((b, n) for b, n in reversed(units) if top_value >= b), units[0])
    scaled = top_value / base
    step = next(multiple for multiple in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500)
                if scaled / multiple <= 5)

    def label(value: float) -> str:
        amount = value / base
        return f"{amount:.0f} {name}" if amount == int(amount) else f"{amount:.1f} {name}"

    return step * base, label


# --- restore --------------------------------------------------------------------------

@dataclasses.dataclass
class RestoreTarget:
    disk: Disk
    problem: Optional[str]  # why it cannot be overwritten with this image now
    original: bool
    host_online: bool

    @property
    def suitable(self) -> bool:
        return self.problem is None


def restore_targets(image: Image, now: Optional[dt.datetime] = None) -> list[RestoreTarget]:
    """Every disk of every host, the image's own first, each with why it cannot be the
    target (gone, read-only, too small, busy, mounted), or None. The service checks again."""
    now = now or timezone.now()
    busy: dict[int, Job] = {}
    for job in Job.objects.filter(state__in=Job.ACTIVE_STATES).order_by("created"):
        for disk_id in held_disk_ids(job):
            busy.setdefault(disk_id, job)
    targets = []
    for disk in Disk.objects.select_related("host").order_by("host__name", "path", "stable_id"):
        job = busy.get(disk.pk)
        problem = disk.restore_problem(image) or (
            f"busy: {job.kind} job #{job.pk} is {job.state}" if job is not None else None)
        targets.append(RestoreTarget(disk, problem, disk.pk == image.disk_id,
                                     disk.host.is_online(now)))
    targets.sort(key=lambda target: (not target.original, not target.suitable))
    return targets


PARTITION_TYPES = {
    # DOS partition type codes
    "83": "Linux", "82": "Linux swap", "8e": "Linux LVM", "fd": "Linux RAID", "5": "Extended",
    "f": "Extended", "85": "Linux extended", "7": "NTFS or exFAT", "b": "FAT32", "c": "FAT32",
    "e": "FAT16", "6": "FAT16", "ef": "EFI System", "ee": "GPT protective",
    # GPT partition type GUIDs
    "0fc63daf-8483-4772-8e79-3d69d8477de4": "Linux filesystem",
    "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "Linux swap",
    "c12a7328-f81f-11d2-ba4b-00a0c93ec93b": "EFI System",
    "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "Microsoft basic data",
    "e6d6d379-f507-44c2-a23c-238f2a3df928": "Linux LVM",
    "a19d880f-05fc-4d3b-a006-743f0f84911e": "Linux RAID",
    "21686148-6449-6e6f-744e-656564454649": "BIOS boot",
    "4f68bce3-e8cd-4db1-96e7-fbcaf984b709": "Linux root (x86-64)",
    "933ac7e1-2eb4-4f13-b844-0e14e2aef915": "Linux home",
    "e3c9e316-0b5c-4db8-817d-f92df00215ae": "Microsoft reserved",
}


def partition_rows(partitions: Optional[list]) -> list[dict]:
    """Partitions as a table shows them: name, start, size, what is on it, label."""
    rows = []
    for entry in partitions or []:
        if not isinstance(entry, dict):
            continue
        kind = (entry.get("type") or "").lower().removeprefix("0x")
        rows.append({"name": entry.get("name") or "", "start": entry.get("start"),
                     "size": entry.get("size"), "fstype": entry.get("fstype") or "",
                     "type": PARTITION_TYPES.get(kind, entry.get("type") or ""),
                     "label": entry.get("label") or "",
                     "stored_in_full": entry.get("stored_in_full") or ""})
    return rows


# --- jobs -------------------------------------------------------------------------------

def bad_strip(ranges: Optional[list], total: int) -> list[dict]:
    """Read errors as marks on a strip of 1000 units across the disk (at least 3 units wide,
    so a single bad sector on a big disk still shows)."""
    if not total:
        return []
    marks = []
    for entry in ranges or []:
        start, length = entry
        marks.append({"x": round(1000 * start / total, 2),
                      "width": max(round(1000 * length / total, 2), 3.0),
                      "start": start, "length": length})
    return marks


# --- schedules ------------------------------------------------------------------------

CRON_PRESETS = [
    ("Every day at 03:00", "0 3 * * *"),
    ("Every Sunday at 03:00", "0 3 * * 0"),
    ("Weekdays at 22:00", "0 22 * * 1-5"),
    ("Every 6 hours", "0 */6 * * *"),
    ("Every hour", "0 * * * *"),
    ("First of the month at 03:00", "0 3 1 * *"),
]
WEEKDAYS = ["Sunday", "Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]


def describe_cron(expression: str) -> str:
    """Plain words for a cron expression: "every day at 03:00", "every Sunday at 03:00"."""
    fields = expression.split()
    if len(fields) == 5 and _number(fields[0]) is not None and _number(fields[1]) is not None:
        minute, hour = _number(fields[0]), _number(fields[1])
        at = f"at {hour:02d}:{minute:02d}"
        day, month, weekday = fields[2:]
        if day == month == weekday == "*":
            return f"every day {at}"
        if day == month == "*" and _number(weekday) is not None and _number(weekday) <= 7:
            return f"every {WEEKDAYS[_number(weekday) % 7]} {at}"
        if month == weekday == "*" and _number(day) is not None:
            return f"on day {_number(day)} of every month {at}"
    options = Options()
    options.use_24hour_time_format = True
    options.casing_type = CasingTypeEnum.LowerCase
    text = ExpressionDescriptor(expression, options).get_description()
    return text[:1].lower() + text[1:]


def _number(field: str) -> Optional[int]:
    return int(field) if re.fullmatch(r"\d{1,2}", field) else None


def schedules_with_next_run(now: Optional[dt.datetime] = None) -> list[Schedule]:
    """Every schedule, each given `.next_run` (None when it is off)."""
    now = now or timezone.now()
    schedules = list(Schedule.objects.select_related("disk__host", "datastore").order_by(
        "kind", "disk__host__name", "disk__path", "created"))
    for schedule in schedules:
        schedule.next_run = schedule.next_run_after(now) if schedule.enabled else None
    return schedules
