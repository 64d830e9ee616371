"""What jobs and schedules take, one definition each, from the engine: backup modes, zstd
levels and retention rules. The models' validators, the forms, the API's serializers and the
job kinds (services/kinds.py) all check with these."""
from __future__ import annotations

import dataclasses
from typing import Any

from django.core.exceptions import ValidationError
from django.core.validators import MaxValueValidator, MinValueValidator

import imaging.datastore.codec
import imaging.datastore.manifest
import imaging.prune

BACKUP_MODES = imaging.datastore.manifest.MODES
DEFAULT_LEVEL = imaging.datastore.codec.DEFAULT_LEVEL
MIN_LEVEL, MAX_LEVEL = imaging.datastore.codec.LEVELS[0], imaging.datastore.codec.LEVELS[-1]
LEVEL_VALIDATORS = [MinValueValidator(MIN_LEVEL), MaxValueValidator(MAX_LEVEL)]
# last, hourly, daily, weekly, monthly, yearly: what prune keeps, each a count of images.
RETENTION_RULES = tuple(rule.name for rule in dataclasses.fields(imaging.prune.Retention))


def validate_mode(mode: Any) -> None:
    if mode not in BACKUP_MODES:
        raise ValidationError(f"unknown backup mode {mode!r}: use {' or '.join(BACKUP_MODES)}")


def validate_level(level: Any) -> None:
    if isinstance(level, bool) or not isinstance(level, int) or level not in imaging.datastore.codec.LEVELS:
        raise ValidationError(f"compression level {level!r} is not a zstd level "
                              f"({MIN_LEVEL}-{MAX_LEVEL})")


def validate_retention(retention: dict[str, Any]) -> None:
    """Known rules, whole counts, and at least one image kept."""
    unknown = set(retention) - set(RETENTION_RULES)
    if unknown:
        raise ValidationError(f"unknown retention rule(s) {', '.join(sorted(unknown))}: "
                              f"use {', '.join(RETENTION_RULES)}")
    if any(isinstance(count, bool) or not isinstance(count, int) or count < 0
           for count in retention.values()):
        raise ValidationError("each retention count must be a whole number, 0 or more")
    if not any(retention.values()):
        raise ValidationError("a retention that keeps nothing would remove every image")
