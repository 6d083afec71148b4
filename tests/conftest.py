from __future__ import annotations

import io
import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

# Set before any handler module imports Powertools: no X-Ray, metrics still flushed to stdout as EMF.
os.environ.setdefault("POWERTOOLS_TRACE_DISABLED", "1")
os.environ.setdefault("POWERTOOLS_SERVICE_NAME", "clinicsync")

from sandbox.local import LocalClinic, start_local_clinic
from sandbox.runtime import LocalAws

# CLINICSYNC_PINNED_TIME: the whole run (every xdist worker too) at a pinned wall-clock time.
pytest_plugins = ["tests.plugins.pinned_clock"]

_ids = itertools.count(1)

# Property-based tests: a small profile keeps `make test` fast; CLINICSYNC_HYPOTHESIS=large digs deeper.
_QUIET = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.data_too_large]
for _name, _examples in (("small", 30), ("large", 600)):
    hypothesis_settings.register_profile(
        _name, max_examples=_examples, deadline=None, database=None, suppress_health_check=_QUIET
    )
hypothesis_settings.load_profile(os.environ.get("CLINICSYNC_HYPOTHESIS", "small"))


@pytest.fixture(scope="session")
def local_aws() -> Iterator[LocalAws]:
    """One moto server for the session; every clinic gets its own stack (own table and queues) in it."""
    aws = LocalAws().start()
    yield aws
    aws.stop()


@pytest.fixture
def make_clinic(local_aws: LocalAws) -> Iterator[Callable[..., LocalClinic]]:
    made: list[LocalClinic] = []

    def make(**kwargs: Any) -> LocalClinic:
        kwargs.setdefault("clinic_id", f"clinic-{next(_ids)}")
        clinic = start_local_clinic(aws=local_aws, **kwargs)
        made.append(clinic)
        return clinic

    yield make
    for clinic in made:
        clinic.close()


class LogCapture:
    """Everything the clinicsync logger writes, as Lambda would ship it to CloudWatch."""

    def __init__(self) -> None:
        self.buffer = io.StringIO()

    @property
    def text(self) -> str:
        return self.buffer.getvalue()


@pytest.fixture
def captured_logs() -> Iterator[LogCapture]:
    from clinicsync.observability import logger

    capture = LogCapture()
    previous = [h.setStream(capture.buffer) for h in logger.handlers]  # type: ignore[attr-defined]
    yield capture
    for handler, stream in zip(logger.handlers, previous, strict=True):
        handler.setStream(stream)  # type: ignore[attr-defined]
