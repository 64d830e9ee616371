"""Sizes, durations and moments as people read them: plain text, below the models, so that
models, services, pages and the template filters (templatetags/human.py) say them alike.

The same words as static/webui/format.js writes for live values, so a number looks alike
whether the server rendered it or a progress event updated it.
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from django.utils import timezone

UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


def size(count) -> str:
    """1536 -> "1.5 KiB"; three significant digits, binary units as the disks' tools print."""
    if count is None or count == "":
        return "—"
    value = float(count)
    for unit in UNITS:
        if abs(value) < 1024 or unit == UNITS[-1]:
            break
        value /= 1024
    if unit == "bytes":
        return f"{int(count)} byte{'' if int(count) == 1 else 's'}"
    return f"{value:.1f} {unit}" if abs(value) < 100 else f"{value:.0f} {unit}"


def duration(seconds) -> str:
    """3725 -> "1 h 2 min"; under a minute to the second."""
    if seconds is None or seconds == "":
        return "—"
    seconds = float(seconds)
    if seconds < 60:
        return f"{seconds:.0f} s" if seconds >= 10 else f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s" if minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes:02d} min"
    days, hours = divmod(hours, 24)
    return f"{days} days {hours} h"


def exact_time(moment: Optional[dt.datetime]) -> str:
    if moment is None:
        return ""
    local = timezone.localtime(moment)
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")


def short_time(moment: Optional[dt.datetime]) -> str:
    """A date and time to the minute, in the server's zone: "2026-03-12 03:00"."""
    if moment is None:
        return ""
    return timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")


def relative(moment: dt.datetime, now: Optional[dt.datetime] = None) -> str:
    """ "just now", "5 min ago", "in 3 h", "2 days ago"; past a month, the date."""
    now = now or timezone.now()
    seconds = (now - moment).total_seconds()
    future, seconds = seconds < 0, abs(seconds)
    if seconds < 45:
        return "just now" if not future else "in a moment"
    for limit, divisor, unit in ((90 * 60, 60, "min"), (36 * 3600, 3600, "h"),
                                 (45 * 86400, 86400, "days")):
        if seconds < limit:
            amount = round(seconds / divisor)
            if unit == "days" and amount == 1:
                unit = "day"
            return f"in {amount} {unit}" if future else f"{amount} {unit} ago"
    return timezone.localtime(moment).strftime("%d %b %Y")
