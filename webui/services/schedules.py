"""Schedules: Schedule rows are the truth, django-celery-beat's tables follow them."""
from __future__ import annotations

import datetime as dt
import json
import logging
import zoneinfo
from typing import Optional

from croniter import croniter
from django.db import transaction
from django.utils import timezone

from ..models import Disk, Job, Schedule
from .errors import Refused
from .kinds import KINDS
from .protection import update_alert

log = logging.getLogger(__name__)


def sync_schedule(schedule: Schedule) -> None:
    """Make django-celery-beat fire `run_schedule` as the schedule says.

    `.save()` on the PeriodicTask (never a queryset update) moves the
    PeriodicTasks marker, which is how a running beat notices the edit.
    """
    from django_celery_beat.models import CrontabSchedule, PeriodicTask

    minute, hour, day_of_month, month_of_year, day_of_week = schedule.cron.split()
    with transaction.atomic():
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute, hour=hour, day_of_month=day_of_month, month_of_year=month_of_year,
            day_of_week=day_of_week, timezone=zoneinfo.ZoneInfo(schedule.time_zone))
        task = schedule.periodic_task or PeriodicTask(name=f"schedule {schedule.pk}")
        task.task = "webui.tasks.run_schedule"
        task.args = json.dumps([schedule.pk])
        task.crontab, task.interval = crontab, None
        task.enabled = schedule.enabled
        # A firing nobody ran within the grace time is a missed run (overdue), not a backlog.
        task.expire_seconds = max(int(schedule.grace.total_seconds()), 60)
        task.description = str(schedule)
        task.save()
        if schedule.periodic_task_id != task.pk:
            Schedule.objects.filter(pk=schedule.pk).update(periodic_task=task)
            schedule.periodic_task = task
        if schedule.disk_id:
            update_alert(schedule.disk)


def unschedule(schedule: Schedule) -> None:
    """The schedule is deleted: beat stops firing it, and its disk's protection is recomputed."""
    from django_celery_beat.models import PeriodicTask

    for task in PeriodicTask.objects.filter(name=f"schedule {schedule.pk}"):
        task.delete()
    disk = Disk.objects.filter(pk=schedule.disk_id).first() if schedule.disk_id else None
    if disk is not None:  # None when the disk itself is being deleted
        update_alert(disk)


def sync_schedules() -> int:
    schedules = list(Schedule.objects.select_related("disk", "periodic_task"))
    for schedule in schedules:
        sync_schedule(schedule)
    return len(schedules)


def run_schedule(schedule_id: int, now: Optional[dt.datetime] = None) -> list[Job]:
    """What beat fires: the schedule's jobs for this firing, once however often it is delivered."""
    now = now or timezone.now()
    schedule = Schedule.objects.select_related("disk__host", "datastore").filter(pk=schedule_id).first()
    if schedule is None or not schedule.enabled:
        return []
    fired = croniter(schedule.cron, now.astimezone(zoneinfo.ZoneInfo(schedule.time_zone)))
    fired_at = fired.get_prev(dt.datetime)
    if schedule.jobs.filter(created__gte=fired_at).exists():
        return []  # this firing already ran
    try:
        return KINDS[schedule.kind].start_scheduled(schedule)
    except Refused as exc:
        # The disk goes overdue if no backup follows: that is what tells the user.
        log.warning("%s did not start: %s", schedule, exc)
        return []
