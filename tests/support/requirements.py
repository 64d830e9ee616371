"""What a test does when the machine lacks something it needs: skip, or fail under CI.

A developer's laptop without loop devices, FUSE, Redis, PostgreSQL or a
browser skips the tests that need them. A CI machine must have them all: there,
a missing requirement fails the test, so a broken runner cannot turn the suite
green by skipping it.
"""

from __future__ import annotations

import os
from typing import NoReturn

import pytest

# Values of CI that mean "not under CI", as CI systems and people write them.
CI_OFF = {"", "0", "false", "no"}


def under_ci() -> bool:
    """True when the environment variable CI is set to anything but empty, 0 or false."""
    return os.environ.get("CI", "").strip().lower() not in CI_OFF


def requirement_missing(reason: str) -> NoReturn:
    """Stop the calling test because this machine lacks something it needs.

    `reason` says what is missing and why, e.g. "/dev/loop-control is missing:
    no loop device support". Outside CI the test is skipped with that reason;
    under CI (see `under_ci`) it fails with it. Every helper that checks for
    root, loop devices, FUSE, Redis, PostgreSQL or a browser ends here.
    """
    if under_ci():
        pytest.fail(f"required under CI: {reason}", pytrace=False)
    pytest.skip(reason)
