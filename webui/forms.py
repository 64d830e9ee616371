"""The pages' forms: what a person types, as the models and services take it."""
from __future__ import annotations

import datetime as dt
import re
import zoneinfo

from django import forms
from django.core.exceptions import ValidationError
from django.db import transaction

import imaging.base.tools
import imaging.export
from imaging.base.errors import ImagingError

from . import services
from .formatting import size
from .models import Datastore, Disk, Schedule
from .parameters import DEFAULT_LEVEL, MAX_LEVEL, MIN_LEVEL, RETENTION_RULES, validate_retention

RETENTION_FIELDS = [f"keep_{rule}" for rule in RETENTION_RULES]

class DiskChoiceField(forms.ModelChoiceField):
    def label_from_instance(self, disk: Disk) -> str:
        gone = "" if disk.present else " (gone)"
        return f"{disk.host.name} · {disk.title} · {disk.path or disk.stable_id} · " \
               f"{size(disk.size)}{gone}"


class ScheduleForm(forms.ModelForm):
    grace_minutes = forms.IntegerField(
        label="Grace time (minutes)", min_value=0, max_value=365 * 24 * 60,
        help_text="How late a backup may come before the disk counts as overdue.")
    offsite_hours = forms.IntegerField(
        label="Off-site copy within (hours)", min_value=1, max_value=365 * 24, required=False,
        help_text="Flag the disk when its newest image with an off-site copy is older than "
                  "this; empty: no off-site rule.")
    boot_days = forms.IntegerField(
        label="Proven to boot within (days)", min_value=1, max_value=365, required=False,
        help_text="Flag the disk when its newest image that booted in a boot test is older "
                  "than this; empty: no boot-test rule. A boot-test schedule proves them.")

    class Meta:
        model = Schedule
        fields = ["kind", "disk", "datastore", "destination", "after_backup", "copy_last",
                  "cron", "time_zone",
                  "mode", "level", "deltas", *RETENTION_FIELDS, "notify_urls",
                  "notify_on_success", "enabled"]
        field_classes = {"disk": DiskChoiceField}
        labels = {
            "kind": "What to run", "cron": "When (cron)", "time_zone": "Time zone",
            "mode": "Backup mode", "level": f"Compression level ({MIN_LEVEL}–{MAX_LEVEL})",
            **{field: rule.capitalize() for field, rule in zip(RETENTION_FIELDS, RETENTION_RULES)},
            "notify_urls": "Notification URLs", "notify_on_success": "Also notify on success",
            "enabled": "On", "deltas": "Store changes as deltas",
            "destination": "Copy to", "after_backup": "Also copy each new image as its backup "
                                                     "ends",
            "copy_last": "Copy the newest (images per disk)",
        }
        help_texts = {
            "cron": "minute hour day-of-month month day-of-week, like 0 3 * * * for 03:00 daily",
            "mode": "used reads only the blocks filesystems use; raw reads every sector",
            "notify_urls": "Apprise URLs, one per line (mailto://, ntfy://, gotify://, ...); "
                           "failures, overdue disks and stalls are sent there",
            "level": "3 is fast; 19 packs tighter and takes much longer",
            "deltas": "a changed chunk costs only its changes; off, pruning an image lets gc "
                      "free all it held, deleted files' old blocks included",
        }
        widgets = {"notify_urls": forms.Textarea(attrs={"rows": 3, "spellcheck": "false"}),
                   "cron": forms.TextInput(attrs={"spellcheck": "false", "autocomplete": "off"}),
                   "time_zone": forms.TextInput(attrs={"list": "time-zones", "autocomplete": "off",
                                                       "spellcheck": "false"})}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["disk"].queryset = Disk.objects.select_related("host").order_by(
            "host__name", "path")
        self.fields["disk"].required = False
        self.fields["disk"].empty_label = "— none (verify, boot tests and gc run per datastore) —"
        self.fields["kind"].choices = [(kind.name, kind.scheduled_as)
                                       for kind in services.registry.KINDS.values()
                                       if kind.scheduled_as]
        self.fields["grace_minutes"].initial = int(self.instance.grace.total_seconds() // 60)
        if self.instance.offsite_within is not None:
            self.fields["offsite_hours"].initial = int(
                self.instance.offsite_within.total_seconds() // 3600)
        if self.instance.boot_within is not None:
            self.fields["boot_days"].initial = self.instance.boot_within.days
        self.fields["destination"].empty_label = "— none (only a copy schedule copies) —"
        self.fields["datastore"].queryset = Datastore.objects.folders()
        for name in RETENTION_FIELDS:
            self.fields[name].widget.attrs["min"] = 0
        self.fields["level"].widget.attrs.update(min=MIN_LEVEL, max=MAX_LEVEL)

    @staticmethod
    def time_zones() -> list[str]:
        return sorted(zoneinfo.available_timezones())

    def clean(self):
        cleaned = super().clean()
        minutes = cleaned.get("grace_minutes")
        if minutes is not None:
            self.instance.grace = dt.timedelta(minutes=minutes)
        backup = cleaned.get("kind") == Schedule.Kind.BACKUP
        hours, days = cleaned.get("offsite_hours"), cleaned.get("boot_days")
        self.instance.offsite_within = dt.timedelta(hours=hours) if hours and backup else None
        self.instance.boot_within = dt.timedelta(days=days) if days and backup else None
        if cleaned.get("kind") != Schedule.Kind.SYNC:
            cleaned["destination"], cleaned["after_backup"], cleaned["copy_last"] = None, False, None
        if cleaned.get("kind") == Schedule.Kind.BACKUP:
            try:
                validate_retention({rule: cleaned.get(field) or 0
                                    for field, rule in zip(RETENTION_FIELDS, RETENTION_RULES)})
            except ValidationError as invalid:
                raise forms.ValidationError(f"Keep at least one image: {invalid.message}.")
        return cleaned

    def retention_fields(self) -> list[forms.BoundField]:
        return [self[name] for name in RETENTION_FIELDS]

    def notification_urls(self) -> list[str]:
        text = self.data.get("notify_urls", "") if self.is_bound else self.instance.notify_urls
        return [url for url in text.replace(",", " ").split() if url]

    def save_and_sync(self) -> Schedule:
        with transaction.atomic():
            schedule = self.save()
            services.sync_schedule(schedule)
        return schedule


class ExportForm(forms.Form):
    name = forms.RegexField(regex=r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,200}$", max_length=201,
                            error_messages={"invalid": "use letters, digits and ._+- only"})
    # Not sent for a VM disk, which qemu-img writes uncompressed.
    level = forms.IntegerField(min_value=MIN_LEVEL, max_value=MAX_LEVEL, initial=DEFAULT_LEVEL,
                               required=False)
    long_distance = forms.BooleanField(required=False)
    split_size = forms.CharField(required=False, max_length=32)
    format = forms.TypedChoiceField(choices=[(name, name) for name in imaging.export.FORMATS],
                                    required=False, empty_value=imaging.export.ZSTD)

    def clean_level(self):
        level = self.cleaned_data["level"]
        return DEFAULT_LEVEL if level is None else level

    def clean_split_size(self):
        text = self.cleaned_data["split_size"].strip()
        try:
            return imaging.base.tools.parse_size(text) if text else None
        except ImagingError as refused:
            raise forms.ValidationError(str(refused)) from None

    def problems(self) -> str:
        return "; ".join(f"{name}: {' '.join(errors)}" if name != "__all__" else " ".join(errors)
                         for name, errors in self.errors.items())


def export_name(image) -> str:
    """A file name for an image's export: the disk and the moment, safe for any host."""
    stem = re.sub(r"[^A-Za-z0-9._+-]+", "-", f"{image.disk.stable_id}-{image.stamp}").strip("-.")
    return f"{stem}.img.zst"
