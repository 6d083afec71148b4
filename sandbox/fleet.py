"""A fleet of clinics on this machine: the real ``template.yaml`` through the SAM transform (samtranslator),
stacks created and updated by moto's CloudFormation through change sets, and the fleet tool driving them.

``python -m sandbox.fleet --clinics 50`` (``make fleet-50``) runs a full rollout of 50 clinics and a
``fleet status --json`` read, and writes the figures (wall time, change sets, concurrency) to a report.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import time
import zipfile
from pathlib import Path
from typing import Any

import yaml

from sandbox import moto_cfn, sam_transform
from sandbox.runtime import REGION, ROOT, TEMPLATE, LocalAws

DEMO_CONFIG = ROOT / "sandbox" / "clinics" / "demo-dental.yaml"
BUCKET = "clinicsync-fleet-artifacts"


def patch_moto() -> None:
    """moto's CloudFormation gaps a stack *update* hits, on top of ``moto_cfn`` (schedules, alarms):

    - a Ref to an ``AWS::Lambda::LayerVersion`` must give its ARN, as CloudFormation does; moto hands the
      model object over, which the update then fails on when it re-reads a function's Layers;
    - a changed layer is a new layer version (CloudFormation replaces it); moto has no update for the type
      and leaves None in the stack, so every later Ref to the layer breaks."""
    moto_cfn.register()
    speed_up_moto_server()
    from moto.awslambda.models import LayerVersion

    if getattr(LayerVersion, "_clinicsync_patched", False):
        return

    def update(
        cls: type[LayerVersion],
        original_resource: Any,
        new_resource_name: str,
        cloudformation_json: Any,
        account_id: str,
        region_name: str,
    ) -> LayerVersion:
        return cls.create_from_cloudformation_json(new_resource_name, cloudformation_json, account_id, region_name)

    LayerVersion.physical_resource_id = property(lambda self: self.arn)  # type: ignore[attr-defined]
    LayerVersion.update_from_cloudformation_json = classmethod(update)  # type: ignore[assignment,method-assign]
    LayerVersion._clinicsync_patched = True  # type: ignore[attr-defined]


def speed_up_moto_server() -> None:
    """moto's server lists and stats its ~200 package folders on every request to route it by host
    (``backends.list_of_moto_modules``); the list never changes, so it is read once. A fleet-wide
    read sends hundreds of requests: this was a third of the server's CPU time."""
    from moto import backends

    if not hasattr(backends.list_of_moto_modules, "cache_info"):
        modules = tuple(backends.list_of_moto_modules())
        backends.list_of_moto_modules = functools.cache(lambda: modules)  # type: ignore[assignment]


@functools.cache
def _transformed() -> str:
    return json.dumps(sam_transform.transform(TEMPLATE, {}, bucket="sam-staging"))


class LocalPackager:
    """The SAM transform of the real template (as ``sam package`` + CloudFormation would run it), with one
    small archive per function and layer whose content names the release (so a new release changes code)."""

    def __init__(self) -> None:
        self.builds: list[str] = []

    def build(self, release: str) -> Any:
        from clinicsync_cli.fleet.release import PackagedRelease

        self.builds.append(release)
        template = json.loads(_transformed())
        artifacts = {}
        for logical_id, resource in template["Resources"].items():
            code = resource["Properties"].get("Code") or resource["Properties"].get("Content")
            if isinstance(code, dict) and "S3Key" in code:
                archive = io.BytesIO()
                with zipfile.ZipFile(archive, "w") as zipped:
                    zipped.writestr("app.py", f"RELEASE = {release!r}  # {logical_id}\n")
                artifacts[code["S3Key"]] = archive.getvalue()
        return PackagedRelease(release, template, artifacts)


def write_fleet(
    root: Path,
    clinics: int,
    release: str,
    *,
    prefix: str = "clinic",
    rollout: dict[str, Any] | None = None,
    cells: dict[str, Any] | None = None,
) -> Path:
    """``fleet.yaml`` with ``clinics`` clinics (configs from the demo clinic, local secrets files)."""
    demo = DEMO_CONFIG.read_text(encoding="utf-8")
    entries = []
    for n in range(clinics):
        clinic_id = f"{prefix}-{n:03d}"
        folder = root / "clinics" / clinic_id
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "clinic.yaml").write_text(demo.replace("demo-dental", clinic_id), encoding="utf-8")
        secrets = {"mis": {"api_key": f"mis-{clinic_id}"}, "crm": {"webhook_url": "http://127.0.0.1/rest/1/x/"}}
        (folder / "secrets.json").write_text(json.dumps(secrets), encoding="utf-8")
        entries.append(
            {
                "id": clinic_id,
                "config": f"clinics/{clinic_id}/clinic.yaml",
                "secrets": f"clinics/{clinic_id}/secrets.json",
            }
        )
    fleet = {
        "version": 1,
        "release": release,
        "cells": cells
        or {
            "default": {"account_id": "123456789012", "region": REGION, "artifacts_bucket": BUCKET, "max_clinics": 120}
        },
        "rollout": {
            "concurrency": 4,
            "bake_seconds": 600,
            "poll_seconds": 300,
            "stack_poll_seconds": 1,
            **(rollout or {}),
        },
        "clinics": entries,
    }
    path = root / "fleet.yaml"
    path.write_text(yaml.safe_dump(fleet, sort_keys=False), encoding="utf-8")
    return path


def set_release(fleet_path: Path, release: str) -> None:
    data = yaml.safe_load(fleet_path.read_text(encoding="utf-8"))
    data["release"] = release
    fleet_path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")


def prepare_account(s3: Any, bucket: str = BUCKET) -> None:
    """The moto patches, and the cell's artifacts bucket (``s3``: a client of the cell's account)."""
    patch_moto()
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket, CreateBucketConfiguration={"LocationConstraint": REGION})


def run(clinics: int, concurrency: int, report: Path | None) -> dict[str, Any]:
    import tempfile

    from clinicsync_cli.fleet.cells import Cells
    from clinicsync_cli.fleet.clock import ManualClock
    from clinicsync_cli.fleet.health import read_fleet
    from clinicsync_cli.fleet.registry import load_fleet
    from clinicsync_cli.fleet.rollout import Rollout

    aws = LocalAws().start()
    figures: dict[str, Any] = {"clinics": clinics, "concurrency": concurrency}
    try:
        prepare_account(aws.client("s3"))
        root = Path(tempfile.mkdtemp(prefix="clinicsync-fleet-"))
        path = write_fleet(root, clinics, "r1", rollout={"concurrency": concurrency})
        packager = LocalPackager()
        for release in ("r1", "r2"):  # r1 creates every stack, r2 updates every stack
            set_release(path, release)
            fleet = load_fleet(path)
            clock = ManualClock()
            started, simulated = time.monotonic(), clock.now()
            rollout = Rollout(fleet, root, Cells(fleet.cells), packager, clock, root / f"state-{release}.json")
            state = rollout.run()
            figures[release] = {
                "phase": state.phase,
                "wall_seconds": round(time.monotonic() - started, 1),
                "simulated_seconds": round(clock.now() - simulated, 1),
                "waves": [len(w) for w in state.waves],
                "change_sets": rollout.figures.change_sets,
                "executed": rollout.figures.executed,
                "api_deployments": len(rollout.figures.api_deployments),
            }
            print(release, figures[release], flush=True)
        fleet = load_fleet(path)
        started = time.monotonic()
        found = read_fleet(fleet, Cells(fleet.cells))
        figures["status_json_seconds"] = round(time.monotonic() - started, 2)
        figures["status_rows"] = len(found)
        figures["builds"] = packager.builds
    finally:
        aws.stop()
    if report is not None:
        report.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clinics", type=int, default=50)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--report", type=Path, default=Path("fleet-report.json"))
    args = parser.parse_args(argv)
    print(json.dumps(run(args.clinics, args.concurrency, args.report), indent=2))


if __name__ == "__main__":
    main()
