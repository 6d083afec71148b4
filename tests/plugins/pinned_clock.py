"""Run the suite at a pinned wall-clock time: ``CLINICSYNC_PINNED_TIME=2026-01-31T23:55+03:00 pytest ...``.

time-machine moves ``time.time``, ``datetime.now`` and friends for the whole process (so in every xdist
worker, each starting from the same instant) and lets the clock tick on from there; ``time.monotonic`` and
``time.sleep`` stay real. Code outside Python's clock calls keeps the real time: OpenSSL's certificate
checks (sandbox/tls.py gives its certificates a window covering both) and any other process.
"""

from __future__ import annotations

import os
from datetime import datetime

import pytest
import time_machine

ENV = "CLINICSYNC_PINNED_TIME"
_TRAVELLER = pytest.StashKey[time_machine.travel]()


def pinned_time() -> datetime | None:
    """The pinned instant from the environment, or None for the real clock. A zone is required: an
    instant without one would depend on the machine's time zone, which is what the runs rule out."""
    text = os.environ.get(ENV, "").strip()
    if not text:
        return None
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        raise pytest.UsageError(f"{ENV}={text!r} needs a UTC offset, e.g. 2026-01-31T23:55+03:00")
    return moment


def pytest_configure(config: pytest.Config) -> None:
    moment = pinned_time()
    if moment is not None:
        traveller = config.stash[_TRAVELLER] = time_machine.travel(moment, tick=True)
        traveller.start()


def pytest_unconfigure(config: pytest.Config) -> None:
    if (traveller := config.stash.get(_TRAVELLER, None)) is not None:
        traveller.stop()


def pytest_report_header(config: pytest.Config) -> str:
    moment = pinned_time()
    return f"clock: pinned at {moment.isoformat()} (ticking)" if moment else "clock: real"
