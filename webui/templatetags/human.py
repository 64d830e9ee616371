"""Sizes, times, durations and ratios as people read them, with the exact value on hover.

The same words as static/webui/format.js writes for live values, so a number
looks alike whether the server rendered it or a progress event updated it.
"""
from __future__ import annotations

import datetime as dt
from typing import Optional

from django import template
from django.utils import timezone
from django.utils.html import format_html

register = template.Library()

UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB")


@register.filter
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


@register.simple_tag
def bytes_of(count) -> str:
    """A size with its exact number of bytes on hover."""
    if count is None:
        return format_html('<span class="muted">—</span>')
    return format_html('<span title="{} bytes">{}</span>', f"{int(count):,}", size(count))


@register.filter
def exact_time(moment: Optional[dt.datetime]) -> str:
    if moment is None:
        return ""
    local = timezone.localtime(moment)
    return local.strftime("%Y-%m-%d %H:%M:%S %Z")


@register.filter
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


@register.simple_tag
def when(moment: Optional[dt.datetime], never: str = "never") -> str:
    """<time> with a relative text that static/webui/app.js keeps current, exact on hover."""
    if moment is None:
        return format_html('<span class="muted">{}</span>', never)
    return format_html('<time datetime="{}" title="{}" data-relative>{}</time>',
                       moment.isoformat(), exact_time(moment), relative(moment))


@register.filter
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


@register.simple_tag
def duration_of(seconds) -> str:
    if seconds is None:
        return format_html('<span class="muted">—</span>')
    return format_html('<span title="{} s">{}</span>', f"{float(seconds):.3f}", duration(seconds))


@register.filter
def ratio(value) -> str:
    """4.237 -> "4.2×"."""
    if value is None or value == "":
        return "—"
    value = float(value)
    return f"{value:.1f}×" if value < 100 else f"{value:.0f}×"


@register.filter
def percent(part, whole) -> str:
    if not whole:
        return "—"
    return f"{100 * float(part) / float(whole):.0f} %"


@register.filter
def thousands(count) -> str:
    """12345 -> "12,345"."""
    return f"{int(count or 0):,}"
