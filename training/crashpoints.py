"""A test hook: ``FOOD_CRASH_AT=<point>`` kills this process with SIGKILL at that point.

The durability tests run real training and export processes and need them to die at an exact
moment (after a version is published, before the checkpoint says so; between two steps of an
export). Unset, the hook costs one environment lookup. Points: ``after_version_publish``
(train), ``export_staged``, ``export_published``, ``export_switched`` (export).
"""

from __future__ import annotations

import os
import signal

CRASH_ENV = "FOOD_CRASH_AT"


def crash_point(name: str) -> None:
    """SIGKILL this process if ``$FOOD_CRASH_AT`` names ``name`` (tests only)."""
    if os.environ.get(CRASH_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
