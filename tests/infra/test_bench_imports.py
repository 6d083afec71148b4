"""The bench times a handler's imports as deployed: in Lambda, tracing on, and from bytecode (the layer
ships it), whatever the shell that runs the bench says."""

from __future__ import annotations

import subprocess
from typing import Any

import pytest

from sandbox.bench import harness


def test_import_timing_runs_as_deployed_whatever_the_shell_forbids(monkeypatch: pytest.MonkeyPatch) -> None:
    # A shell with PYTHONDONTWRITEBYTECODE=1 (as some CI images set) had every timed run compile our package
    # again: ~100 ms of each handler's figure that no deployed function pays.
    monkeypatch.setenv("PYTHONDONTWRITEBYTECODE", "1")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    seen: list[dict[str, str]] = []

    def run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        seen.append(kwargs["env"])
        stderr = "import time:       120 |        300 | app\n"
        return subprocess.CompletedProcess(args, 0, stdout="", stderr=stderr)

    monkeypatch.setattr(harness.subprocess, "run", run)
    timing = harness.import_ms("mis_poller", runs=2)
    assert timing.ms == 0.3
    assert len(seen) == 2
    for env in seen:
        assert "PYTHONDONTWRITEBYTECODE" not in env
        assert "POWERTOOLS_TRACE_DISABLED" not in env
        assert env["LAMBDA_TASK_ROOT"].endswith("mis_poller")
