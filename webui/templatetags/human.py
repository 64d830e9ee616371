"""Sizes, times, durations and ratios as people read them, with the exact value on hover:
the words of webui/formatting.py as template filters, and the tags that add the hover."""
from __future__ import annotations

import datetime as dt
from typing import Optional

from django import template
from django.utils.html import format_html

from ..formatting import duration, exact_time, relative, short_time, size

register = template.Library()
for _plain in (size, duration, exact_time, short_time):
    register.filter(_plain)


@register.simple_tag
def bytes_of(count) -> str:
    """A size with its exact number of bytes on hover."""
    if count is None:
        return format_html('<span class="muted">—</span>')
    return format_html('<span title="{} bytes">{}</span>', f"{int(count):,}", size(count))


@register.simple_tag
def when(moment: Optional[dt.datetime], never: str = "never") -> str:
    """<time> with a relative text that static/webui/app.js keeps current, exact on hover."""
    if moment is None:
        return format_html('<span class="muted">{}</span>', never)
    return format_html('<time datetime="{}" title="{}" data-relative>{}</time>',
                       moment.isoformat(), exact_time(moment), relative(moment))


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
