"""A fleet of clinics on this machine: the real ``template.yaml`` through the SAM transform (samtranslator),
stacks created and updated by moto's CloudFormation through change sets, and the fleet tool driving them.

``python -m sandbox.fleet --clinics 50`` (``make fleet-50``) runs four rollouts over 50 clinics (create,
update, a canary breach rolled back, an interrupted rollout resumed), checks each through CloudFormation,
times a fleet-wide status read, and writes the figures (wall time, change sets, concurrency) to a report.
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


def _releases(cells: Any, ids: list[str]) -> dict[str, str | None]:
    """Each clinic's release as CloudFormation reports it (GetTemplate)."""
    from clinicsync_cli.fleet.release import release_of
    from clinicsync_cli.stack import stack_name

    cfn = cells.client("default", "cloudformation")
    return {i: release_of(cfn.get_template(StackName=stack_name(i))["TemplateBody"]) for i in ids}


def run(clinics: int, concurrency: int, report: Path | None) -> dict[str, Any]:
    """Four rollouts over the same clinics, each checked through CloudFormation: r1 creates every stack,
    r2 updates every stack, r3's canary breaches (an alarm fires) and is rolled back while the rest stay
    on r2, r4 is interrupted during a bake and resumed."""
    import tempfile

    from clinicsync_cli.fleet.cells import Cells
    from clinicsync_cli.fleet.clock import ManualClock
    from clinicsync_cli.fleet.health import read_fleet
    from clinicsync_cli.fleet.registry import load_fleet
    from clinicsync_cli.fleet.rollout import Rollout

    class Interrupted(KeyboardInterrupt):
        pass

    aws = LocalAws().start()
    figures: dict[str, Any] = {"clinics": clinics, "concurrency": concurrency}
    failures: list[str] = []
    try:
        prepare_account(aws.client("s3"))
        root = Path(tempfile.mkdtemp(prefix="clinicsync-fleet-"))
        path = write_fleet(root, clinics, "r1", rollout={"concurrency": concurrency})
        packager = LocalPackager()
        ids = [f"clinic-{n:03d}" for n in range(clinics)]

        def rollout(release: str, observer: Any = None) -> tuple[Rollout, Any]:
            set_release(path, release)
            fleet = load_fleet(path)
            clock = ManualClock()
            cells = Cells(fleet.cells)
            return Rollout(fleet, root, cells, packager, clock, root / "rollout.json", observer=observer), clock

        def record(name: str, runs: list[tuple[Rollout, Any, float, float]], expected: dict[str, str]) -> None:
            last = runs[-1][0]
            found = _releases(last.cells, ids)
            if found != expected:
                failures.append(f"{name}: {sum(found[i] != expected[i] for i in ids)} clinic(s) not as expected")
            figures[name] = {
                "phase": last.state.phase,
                "wall_seconds": round(sum(time.monotonic() - started for _, _, started, _ in runs), 1),
                "simulated_seconds": round(sum(c.now() - t0 for _, c, _, t0 in runs), 1),
                "waves": [len(w) for w in last.state.waves],
                "change_sets": sum(r.figures.change_sets for r, *_ in runs),
                "executed": sum(r.figures.executed for r, *_ in runs),
                "rolled_back": sum(r.figures.rolled_back for r, *_ in runs),
                "api_deployments": sum(len(r.figures.api_deployments) for r, *_ in runs),
            }
            print(name, figures[name], flush=True)

        for release in ("r1", "r2"):  # create every stack, then update every stack
            r, clock = rollout(release)
            started, t0 = time.monotonic(), clock.now()
            r.run()
            record(release, [(r, clock, started, t0)], dict.fromkeys(ids, release))

        def breach(clinic: str | None, _detail: Any) -> None:
            if clinic == ids[0]:
                cfn = aws.client("cloudformation")
                listed = cfn.describe_stack_resources(StackName=f"clinicsync-{clinic}")["StackResources"]
                alarm = next(x["PhysicalResourceId"] for x in listed if x["LogicalResourceId"] == "SyncLagAlarm")
                aws.client("cloudwatch").set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="drill")

        r, clock = rollout("r3", lambda event, clinic, detail: breach(clinic, detail) if event == "deployed" else None)
        started, t0 = time.monotonic(), clock.now()
        r.run()
        record("r3-canary-breach", [(r, clock, started, t0)], dict.fromkeys(ids, "r2"))
        cfn = aws.client("cloudformation")
        listed = cfn.describe_stack_resources(StackName=f"clinicsync-{ids[0]}")["StackResources"]
        alarm = next(x["PhysicalResourceId"] for x in listed if x["LogicalResourceId"] == "SyncLagAlarm")
        aws.client("cloudwatch").set_alarm_state(AlarmName=alarm, StateValue="OK", StateReason="fixed")

        def interrupt(event: str, _clinic: str | None, detail: dict[str, Any]) -> None:
            if event == "baking" and ids[1] in detail["clinics"]:
                raise Interrupted

        first, clock1 = rollout("r4", interrupt)
        started1, t1 = time.monotonic(), clock1.now()
        try:
            first.run(restart=True)
            failures.append("r4: the interruption did not happen")
        except Interrupted:
            pass
        second, clock2 = rollout("r4")
        started2, t2 = time.monotonic(), clock2.now()
        second.run()
        runs = [(first, clock1, started1, t1), (second, clock2, started2, t2)]
        record("r4-interrupted-and-resumed", runs, dict.fromkeys(ids, "r4"))
        if first.figures.executed + second.figures.executed != clinics:
            failures.append("r4: a clinic was deployed twice or not at all")

        fleet = load_fleet(path)
        started = time.monotonic()
        found = read_fleet(fleet, Cells(fleet.cells))
        figures["status_json_seconds"] = round(time.monotonic() - started, 2)
        figures["status_rows"] = len(found)
        figures["builds"] = packager.builds
        figures["failures"] = failures
    finally:
        aws.stop()
    if report is not None:
        report.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")
    if failures:
        raise SystemExit("; ".join(failures))
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
