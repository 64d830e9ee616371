"""What Prometheus scrapes at /metrics: the catalog as it stands, read at each scrape.

One collector in a registry of its own: prometheus_client's default registry would add
this process's own metrics, which differ from one web process to the next. Every family
comes from a fixed number of queries, however many disks, images and jobs there are.
A moment nothing happened at yet (a disk never verified) is no sample rather than a 0.
"""
from __future__ import annotations

import datetime as dt
from typing import Iterator, Optional

from django.db.models import Count, F, Max, Q, Sum
from django.utils import timezone
from prometheus_client.core import GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from ..models import Datastore, Disk, Image, Job, Protection

DISK_LABELS = ["disk_id", "stable_id", "host", "title"]
DATASTORE_LABELS = ["datastore_id", "datastore"]
JOB_LABELS = ["kind", "state"]
NO_IMAGES = {"count": 0, "stored_bytes": 0, "new_bytes": 0, "last_verified": None}


class CatalogCollector(Collector):
    def collect(self) -> Iterator[Metric]:
        yield from disk_families(timezone.now())
        yield from datastore_families()
        yield from job_families()


REGISTRY = CollectorRegistry()
REGISTRY.register(CatalogCollector())


def disk_families(now: dt.datetime) -> list[Metric]:
    """Each disk's protection: three queries (its facts, its schedules, its images)."""
    images = {row["disk"]: row for row in Image.objects.values("disk").annotate(
        count=Count("pk"), stored_bytes=Sum("stored_bytes"), new_bytes=Sum("new_bytes"),
        last_verified=Max("verified_at", filter=Q(verify_ok=True)))}
    last_backup = GaugeMetricFamily(
        "imaging_disk_last_backup_timestamp_seconds", "When the disk's newest image was taken",
        labels=DISK_LABELS)
    last_verify = GaugeMetricFamily(
        "imaging_disk_last_verify_timestamp_seconds",
        "When an image of the disk was last verified intact", labels=DISK_LABELS)
    last_proven = GaugeMetricFamily(
        "imaging_disk_last_proven_bootable_timestamp_seconds",
        "When the disk's newest image that booted in a boot test was taken", labels=DISK_LABELS)
    overdue = GaugeMetricFamily(
        "imaging_disk_overdue", "1 when the disk is overdue, as the API says: the backup its "
        "schedule asks for did not come within the grace time; else 0", labels=DISK_LABELS)
    image_count = GaugeMetricFamily(
        "imaging_disk_images", "Images of the disk in all datastores", labels=DISK_LABELS)
    stored_bytes = GaugeMetricFamily(
        "imaging_disk_stored_bytes",
        "Compressed bytes of all chunks of each image of the disk, summed over its images",
        labels=DISK_LABELS)
    new_bytes = GaugeMetricFamily(
        "imaging_disk_new_bytes", "Compressed bytes the disk's images added to their datastores",
        labels=DISK_LABELS)
    for disk in Disk.objects.with_protection_facts():
        labels = [str(disk.pk), disk.stable_id, disk.host.name, disk.title]
        facts = images.get(disk.pk, NO_IMAGES)
        _add_moment(last_backup, labels, disk.last_backup_at())
        _add_moment(last_verify, labels, facts["last_verified"])
        _add_moment(last_proven, labels, disk.last_booted_at())
        overdue.add_metric(labels, int(disk.protection(now) == Protection.OVERDUE))
        image_count.add_metric(labels, facts["count"])
        stored_bytes.add_metric(labels, facts["stored_bytes"])
        new_bytes.add_metric(labels, facts["new_bytes"])
    return [last_backup, last_verify, last_proven, overdue, image_count, stored_bytes,
            new_bytes]


def datastore_families() -> list[Metric]:
    """As the datastore's last scan, gc and verify left it: one query."""
    size = GaugeMetricFamily(
        "imaging_datastore_size_bytes", "Compressed bytes of all the datastore's chunks",
        labels=DATASTORE_LABELS)
    chunks = GaugeMetricFamily(
        "imaging_datastore_chunks", "Chunks in the datastore", labels=DATASTORE_LABELS)
    dedup_ratio = GaugeMetricFamily(
        "imaging_datastore_dedup_ratio",
        "Bytes of disk each stored byte stands for (deduplication and compression)",
        labels=DATASTORE_LABELS)
    last_gc = GaugeMetricFamily(
        "imaging_datastore_last_gc_timestamp_seconds",
        "When garbage was last collected in the datastore", labels=DATASTORE_LABELS)
    last_verify = GaugeMetricFamily(
        "imaging_datastore_last_verify_timestamp_seconds",
        "When the datastore's newest images were last verified", labels=DATASTORE_LABELS)
    for store in Datastore.objects.all():
        labels = [str(store.pk), str(store)]
        size.add_metric(labels, store.chunk_bytes)
        chunks.add_metric(labels, store.chunk_count)
        if store.dedup_ratio is not None:
            dedup_ratio.add_metric(labels, store.dedup_ratio)
        _add_moment(last_gc, labels, store.last_gc)
        _add_moment(last_verify, labels, store.last_verify)
    return [size, chunks, dedup_ratio, last_gc, last_verify]


def job_families() -> list[Metric]:
    """Jobs by kind and state, and how long the finished ones ran: two queries."""
    jobs = GaugeMetricFamily("imaging_jobs", "Jobs in the catalog", labels=JOB_LABELS)
    for row in Job.objects.values(*JOB_LABELS).annotate(count=Count("pk")):
        jobs.add_metric([row["kind"], row["state"]], row["count"])
    durations = SummaryMetricFamily("imaging_job_duration_seconds",
                                    "How long finished jobs ran, from start to finish",
                                    labels=JOB_LABELS)
    ran = Job.objects.filter(state__in=Job.FINISHED_STATES, started__isnull=False,
                             finished__isnull=False)
    for row in ran.values(*JOB_LABELS).annotate(count=Count("pk"),
                                                 time=Sum(F("finished") - F("started"))):
        durations.add_metric([row["kind"], row["state"]], count_value=row["count"],
                             sum_value=row["time"].total_seconds())
    return [jobs, durations]


def _add_moment(family: GaugeMetricFamily, labels: list[str],
                moment: Optional[dt.datetime]) -> None:
    """The moment as Unix seconds, the unit Prometheus' time() compares with."""
    if moment is not None:
        family.add_metric(labels, moment.timestamp())
