"""Fixtures some infra modules request by name (none is autouse: most infra tests need no environment)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def bench_environment_restored(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bench points boto3 at its own moto process through os.environ and stops it at the end; the
    next test in this worker must find the session's moto again."""
    for name in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION"):
        monkeypatch.setenv(name, os.environ.get(name, ""))
