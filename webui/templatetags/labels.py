"""Names for disks and jobs, a job's progress with every field present, and amounts in
their unit: the words pages.py chooses, for templates."""
from __future__ import annotations

from django import template
from django.utils.html import format_html, json_script

from .. import forms, pages
from ..formatting import size
from ..payloads import saved_progress
from ..services.registry import phase_words

register = template.Library()


@register.filter
def disk_title(disk) -> str:
    return disk.title if disk is not None else "a disk no longer known"


@register.filter
def job_title(job) -> str:
    return pages.describe_job(job)


@register.filter
def progress(job) -> dict:
    values = saved_progress(job)
    values["done"], values["total"] = values["done"] or 0, values["total"] or 0
    values["percent"] = (100 * values["done"] / values["total"]) if values["total"] else None
    return values


@register.filter
def phase(name) -> str:
    return phase_words().get(name or "", name or "waiting")


@register.simple_tag
def phase_words_script() -> str:
    """The phase words for static/webui/jobview.js, which writes them as progress comes."""
    return json_script(phase_words(), "phase-words")


@register.simple_tag
def amount(value, unit="bytes") -> str:
    """A progress amount in its unit, exact on hover: "1.2 GiB", "3 images"."""
    value = value or 0
    if unit == "bytes":
        return format_html('<span title="{} bytes">{}</span>', f"{int(value):,}", size(value))
    return f"{int(value):,} {unit}"


@register.filter
def cron_words(expression: str) -> str:
    return pages.describe_cron(expression)


@register.filter
def partition_rows(partitions) -> list:
    return pages.partition_rows(partitions)


@register.simple_tag
def fsck_tag(filesystems) -> str:
    """A restore drill's filesystem checks in one tag: dirty if any is, each in its title."""
    tone, label, each = pages.fsck_summary(filesystems)
    return format_html('<span class="tag {}" title="{}">{}</span>', tone, each, label)


@register.filter
def export_name(image) -> str:
    return forms.export_name(image)
