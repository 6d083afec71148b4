"""The project installs from one lock: uv.lock matches pyproject.toml, the pinned requirements files pip installs
(the layer's for `sam build`, the dev one for `make venv`) are exactly the lock's exports, the connector
depends on the core release instead of carrying its files, and `clinicsync` is an installed command."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[2]
EXPORTS = {"LAYER_REQUIREMENTS": "layers/shared/requirements.txt", "DEV_REQUIREMENTS": "requirements-dev.txt"}


def _pyproject(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text(encoding="utf-8"))


def _uv() -> str:
    # uv is a locked dev dependency: beside the interpreter in .venv, else on PATH.
    beside = Path(sys.executable).parent / "uv"
    found = str(beside) if beside.exists() else shutil.which("uv")
    assert found, "uv is missing: run `make venv`"
    return found


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    # uv reads the project's metadata with this interpreter, whatever venv the checkout has.
    env = {**os.environ, "UV_PYTHON": sys.executable}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, check=False)


def test_the_lock_matches_pyproject() -> None:
    # --offline: the check reads the lock and pyproject.toml only, never an index.
    run = _run([_uv(), "lock", "--locked", "--offline"])
    assert run.returncode == 0, f"uv.lock is stale, run `make lock`:\n{run.stderr}"


def test_the_pinned_requirements_files_are_the_locks_exports(tmp_path: Path) -> None:
    # The Makefile's own export recipe, written to a temporary place and compared with the committed files.
    targets = {var: tmp_path / Path(path).name for var, path in EXPORTS.items()}
    overrides = [f"UV={_uv()}", *(f"{var}={path}" for var, path in targets.items())]
    run = _run(["make", "-s", "--no-print-directory", "exports", *overrides])
    assert run.returncode == 0, run.stderr
    for var, path in EXPORTS.items():
        assert (ROOT / path).read_text(encoding="utf-8") == targets[var].read_text(encoding="utf-8"), (
            f"{path} drifted from uv.lock: run `make lock`"
        )


def test_the_layer_ships_pinned_runtime_dependencies_without_the_cli_ones() -> None:
    layer = [
        Requirement(line)
        for line in (ROOT / EXPORTS["LAYER_REQUIREMENTS"]).read_text(encoding="utf-8").splitlines()
        if line and not line.lstrip().startswith("#")
    ]
    assert layer and all(str(r.specifier).startswith("==") for r in layer)
    names = {r.name.lower() for r in layer}
    assert {"aws-lambda-powertools", "pydantic", "httpx", "boto3", "tenacity", "pydantic-settings"} <= names
    assert not names & {"typer", "rich", "click", "clinicsync"}


def test_the_connector_depends_on_the_core_release_instead_of_carrying_its_files() -> None:
    core = _pyproject(ROOT / "pyproject.toml")["project"]
    connector = _pyproject(ROOT / "connector" / "pyproject.toml")
    requirements = [Requirement(r) for r in connector["project"]["dependencies"]]
    on_core = [r for r in requirements if r.name == core["name"]]
    assert [str(r.specifier) for r in on_core] == [f"=={core['version']}"]
    assert "force-include" not in str(connector.get("tool", {}))


def test_the_clinicsync_command_is_the_operators_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    scripts = _pyproject(ROOT / "pyproject.toml")["project"]["scripts"]
    module, _, attr = scripts["clinicsync"].partition(":")
    entry = getattr(__import__(module, fromlist=[attr]), attr)
    monkeypatch.setattr(sys, "argv", ["clinicsync", "--help"])
    with pytest.raises(SystemExit) as done:
        entry()
    assert done.value.code == 0
