"""Is every disk protected? healthchecks' sendalerts for backups.

Each disk stores its last known protection and `alert_after`, the moment it
can next change without a backup (when it would turn overdue). The sweeper
looks only at disks past that moment, recomputes, flips with a conditional
update (one winner), records one StatusChange and sends one notification.
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ..formatting import duration
from ..models import Disk, Protection, StatusChange
from .notifications import notify

# Protection flips worth telling someone about: going bad, and coming back.
BAD = (Protection.OVERDUE, Protection.FAILED, Protection.NO_OFFSITE, Protection.UNPROVEN)


def _next_alert(disk: Disk, state: Protection) -> Optional[dt.datetime]:
    """When the sweeper must look at the disk again; None: only a backup changes it. A
    disk without a recent off-site copy or boot test still turns overdue."""
    if state.protected:
        return disk.going_bad_after()
    if state in (Protection.NO_OFFSITE, Protection.UNPROVEN):
        schedule = disk.backup_schedule()
        return disk.due_at(schedule) + schedule.grace
    return None


def update_alert(disk: Disk, now: Optional[dt.datetime] = None) -> None:
    """After a backup, a failure, a schedule edit: the sweeper's next look at the disk.
    A protection that changed is left to the sweeper to record and announce, at once."""
    now = now or timezone.now()
    disk.refresh_from_db(fields=["protection_state"])
    state = disk.protection(now)
    alert_after = now if state != disk.protection_state else _next_alert(disk, state)
    Disk.objects.filter(pk=disk.pk).update(alert_after=alert_after)
    disk.alert_after = alert_after


def check_protection(now: Optional[dt.datetime] = None) -> int:
    """healthchecks' sendalerts: flip disks whose protection changed; one row and one
    notification per flip, whoever else sweeps at the same time. Returns the flips."""
    now = now or timezone.now()
    flips = 0
    for disk in Disk.objects.filter(alert_after__lte=now).select_related("host"):
        old, new = disk.protection_state, disk.protection(now)
        with transaction.atomic():
            if not Disk.objects.filter(pk=disk.pk, protection_state=old).update(
                    protection_state=new, alert_after=_next_alert(disk, new)):
                continue  # another sweeper took it
            if new == old:
                continue
            change = StatusChange.objects.create(disk=disk, old=old, new=new, created=now)
        flips += 1
        message = _flip_message(disk, _protection(old), new)
        if message is not None:
            urls = list(settings.NOTIFY_URLS)
            schedule = disk.backup_schedule()
            if schedule is not None:
                urls += schedule.notification_urls()
            notify(*message, urls)
            StatusChange.objects.filter(pk=change.pk).update(notified_at=timezone.now())
    return flips


def _protection(value: str) -> Optional[Protection]:
    try:
        return Protection(value)
    except ValueError:
        return None


def _flip_message(disk: Disk, old: Optional[Protection], new: Protection) -> Optional[tuple[str, str]]:
    """What to say about a flip, or None. A failed backup was told of when it failed."""
    last = disk.last_image()
    since = f"the last backup is from {last.created:%Y-%m-%d %H:%M} UTC" if last else "it has no backup"
    if new == Protection.OVERDUE:
        return (f"Disk {disk} is overdue",
                f"The backup scheduled for {disk.due_at():%Y-%m-%d %H:%M} UTC did not come; {since}.")
    if new == Protection.NO_OFFSITE:
        offsite = disk.last_offsite_at()
        newest = (f"its newest off-site copy is of the image from {offsite:%Y-%m-%d %H:%M} UTC"
                  if offsite else "no image of it has an off-site copy")
        return (f"Disk {disk} has no recent off-site copy",
                f"Its schedule asks for an off-site copy within "
                f"{duration(disk.backup_schedule().offsite_within.total_seconds())}; {newest}.")
    if new == Protection.UNPROVEN:
        booted = disk.last_booted_at()
        newest = (f"the newest image that booted is from {booted:%Y-%m-%d %H:%M} UTC"
                  if booted else "no image of it has booted in a boot test")
        return (f"Disk {disk} is not proven to boot",
                f"Its schedule asks for an image proven to boot within "
                f"{duration(disk.backup_schedule().boot_within.total_seconds())}; {newest}.")
    if old in BAD and new.protected:
        return f"Disk {disk} is protected again", f"{since.capitalize()}."
    return None
