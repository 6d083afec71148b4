"""The fleet tool end to end: the real ``template.yaml`` through the SAM transform (samtranslator), every
clinic's stack created and updated by moto's CloudFormation through change sets, on the session's moto
server. Outcomes are judged through the AWS APIs (GetTemplate, DescribeStacks, DescribeChangeSet) and the
rollout's saved state; the clock is a ManualClock, so bake times and API rate limits cost no real time.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from typer.testing import CliRunner

from clinicsync.adapters.aws.health import HealthLog
from clinicsync.domain.config import load_clinic_config
from clinicsync_cli.app import app
from clinicsync_cli.clinic import console
from clinicsync_cli.fleet.cells import Cells
from clinicsync_cli.fleet.clock import ManualClock, TokenBucket
from clinicsync_cli.fleet.commands import run_rollout
from clinicsync_cli.fleet.drift import read_drift
from clinicsync_cli.fleet.registry import Fleet, dump_fleet, fleet_json_schema, load_fleet, parse_fleet
from clinicsync_cli.fleet.release import ReleaseStore, release_of
from clinicsync_cli.fleet.rollout import Rollout, RolloutState
from clinicsync_cli.stack import stack_name
from sandbox import fleet as local_fleet
from sandbox import sam_transform
from sandbox.runtime import REGION, ClinicStack, LocalAws

DOCS = Path(__file__).resolve().parents[2] / "docs"

needs_sam = pytest.mark.skipif(not sam_transform.available(), reason=".venv-sam not installed (make sam-venv)")


class Events:
    """The rollout's observer: records every event; ``on`` runs an action at a chosen event."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None, dict[str, Any]]] = []
        self.actions: list[tuple[str, Any]] = []

    def on(self, event: str, action: Any) -> None:
        self.actions.append((event, action))

    def __call__(self, event: str, clinic: str | None, detail: dict[str, Any]) -> None:
        self.seen.append((event, clinic, detail))
        for wanted, action in self.actions:
            if wanted == event:
                action(clinic, detail)

    def clinics(self, event: str) -> list[str]:
        return [c for e, c, _ in self.seen if e == event and c is not None]


# The fleet tests deploy into their own account (a cell reached by assuming a role, as a host's
# organisation would): the session's default account keeps the other tests' stacks and alarms only.
CELL_ACCOUNT = "210987654321"


def cell(account: str, bucket: str) -> dict[str, Any]:
    role = f"arn:aws:iam::{account}:role/clinicsync-deployer"
    return {"account_id": account, "region": REGION, "role_arn": role, "artifacts_bucket": bucket}


class LocalFleet:
    """A fleet directory plus the account it deploys into (one artifacts bucket per test)."""

    def __init__(self, root: Path, name: str, clinics: int, rollout: dict[str, Any]) -> None:
        self.root, self.bucket = root, f"fleet-{name}"
        cells = {"default": cell(CELL_ACCOUNT, self.bucket)}
        self.path = local_fleet.write_fleet(root, clinics, "r1", prefix=name, rollout=rollout, cells=cells)
        self.aws = Cells(load_fleet(self.path).cells).session("default")
        local_fleet.prepare_account(self.aws.client("s3"), self.bucket)
        self.packager = local_fleet.LocalPackager()
        self.state_path = root / ".clinicsync" / "rollout.json"

    def rollout(self, release: str, events: Events | None = None, dry_run: bool = False) -> Rollout:
        local_fleet.set_release(self.path, release)
        fleet = load_fleet(self.path)
        return Rollout(
            fleet,
            self.root,
            Cells(fleet.cells),
            self.packager,
            ManualClock(),
            self.state_path,
            dry_run=dry_run,
            observer=events,
        )

    @property
    def ids(self) -> list[str]:
        return [c.id for c in load_fleet(self.path).clinics]

    def release(self, clinic_id: str) -> str | None:
        """The clinic's release as CloudFormation reports it (its current template)."""
        body = self.aws.client("cloudformation").get_template(StackName=stack_name(clinic_id))["TemplateBody"]
        return release_of(body)

    def physical(self, clinic_id: str, logical_id: str) -> str:
        listed = self.aws.client("cloudformation").describe_stack_resources(StackName=stack_name(clinic_id))
        return next(r["PhysicalResourceId"] for r in listed["StackResources"] if r["LogicalResourceId"] == logical_id)


@pytest.fixture
def make_fleet(local_aws: LocalAws, tmp_path: Path) -> Any:
    def make(name: str, clinics: int, **rollout: Any) -> LocalFleet:
        policy = {"concurrency": 2, "bake_seconds": 600, "poll_seconds": 300, **rollout}
        return LocalFleet(tmp_path / name, name, clinics, policy)

    return make


# --- the three rollout scenarios ------------------------------------------------------------------------


@needs_sam
@pytest.mark.slow
def test_full_rollout_goes_canary_first_in_baked_waves_and_builds_each_release_once(make_fleet: Any) -> None:
    fleet = make_fleet("full", 6)
    first = fleet.rollout("r1").run()
    assert first.phase == "done"
    assert all(fleet.release(i) == "r1" for i in fleet.ids)

    events = Events()
    rollout = fleet.rollout("r2", events)
    state = rollout.run()

    assert state.phase == "done"
    assert {i: fleet.release(i) for i in fleet.ids} == dict.fromkeys(fleet.ids, "r2")
    assert state.waves == [[fleet.ids[0]], fleet.ids[1:3], fleet.ids[3:]]  # canary, then 25 %, then the rest
    deployed = events.clinics("deployed")
    assert deployed[0] == fleet.ids[0] and sorted(deployed) == sorted(fleet.ids)
    # Every wave was watched before the next one started.
    order = [e for e, _, _ in events.seen if e in ("wave", "baking", "wave_done")]
    assert order == ["wave", "baking", "wave_done"] * 3
    assert rollout.figures.change_sets == rollout.figures.executed == 6
    assert fleet.packager.builds == ["r1", "r2"]  # built once per release, not once per clinic
    # The previous release stays deployable: its template and archives are kept.
    store = ReleaseStore(fleet.aws.client("s3"), fleet.bucket, REGION)
    assert store.exists("r1") and store.exists("r2")
    assert RolloutState.load(fleet.state_path) == state


@needs_sam
@pytest.mark.slow
def test_creating_http_apis_is_paced_at_one_api_deployment_per_five_seconds(make_fleet: Any) -> None:
    fleet = make_fleet("paced", 4, concurrency=4, bake_seconds=0)
    rollout = fleet.rollout("r1")
    assert rollout.run().phase == "done"
    granted = sorted(rollout.figures.api_deployments)
    assert len(granted) == 4  # every new stack creates an HTTP API (a deployment)
    assert all(b - a >= 5.0 - 1e-9 for a, b in itertools.pairwise(granted))


def _force_alarm(fleet: LocalFleet, clinic: str) -> None:
    alarm = fleet.physical(clinic, "SyncLagAlarm")
    fleet.aws.client("cloudwatch").set_alarm_state(AlarmName=alarm, StateValue="ALARM", StateReason="test")


def _force_lag(fleet: LocalFleet, clinic: str) -> None:
    table = fleet.aws.resource("dynamodb").Table(fleet.physical(clinic, "Table"))
    HealthLog(table).record_sync(patients=1, contacts=1, deals=1, crm_requests=2, crm_throttles=0, lag_seconds=3600)


@needs_sam
@pytest.mark.slow
@pytest.mark.parametrize("breach", [_force_alarm, _force_lag], ids=["alarm", "sync-lag"])
def test_a_breaching_canary_is_rolled_back_and_the_rest_stay_on_the_old_release(make_fleet: Any, breach: Any) -> None:
    fleet = make_fleet(f"canary-{breach.__name__[7:]}".replace("_", "-"), 4)
    assert fleet.rollout("r1").run().phase == "done"
    canary = fleet.ids[0]

    events = Events()
    events.on("deployed", lambda clinic, _detail: breach(fleet, clinic) if clinic == canary else None)
    rollout = fleet.rollout("r2", events)
    state = rollout.run()

    assert state.phase == "rolled_back"
    assert list(state.breach) == [canary]
    assert state.clinics[canary].state == "rolled_back"
    assert {i: fleet.release(i) for i in fleet.ids} == dict.fromkeys(fleet.ids, "r1")
    assert events.clinics("deployed") == [canary]  # no other clinic was touched
    assert all(state.clinics[i].state == "pending" and state.clinics[i].change_set is None for i in fleet.ids[1:])
    assert rollout.figures.executed == 2  # the canary's update and its rollback


class Interrupted(KeyboardInterrupt):
    pass


@needs_sam
@pytest.mark.slow
def test_an_interrupted_rollout_resumes_without_redeploying_or_rebuilding(make_fleet: Any) -> None:
    fleet = make_fleet("resume", 5, concurrency=1)
    assert fleet.rollout("r1").run().phase == "done"

    def interrupt(_clinic: str | None, detail: dict[str, Any]) -> None:
        if detail["clinics"] == fleet.ids[1:2]:  # wave 1 deployed, its bake under way
            raise Interrupted

    events = Events()
    events.on("baking", interrupt)
    first = fleet.rollout("r2", events)
    with pytest.raises(Interrupted):
        first.run()
    saved = RolloutState.load(fleet.state_path)
    assert saved is not None and saved.phase == "running" and saved.wave == 1
    assert [i for i, c in saved.clinics.items() if c.state in ("done", "deployed")] == fleet.ids[:2]

    resumed_events = Events()
    resumed = fleet.rollout("r2", resumed_events)
    state = resumed.run()

    assert state.phase == "done"
    assert {i: fleet.release(i) for i in fleet.ids} == dict.fromkeys(fleet.ids, "r2")
    assert sorted(resumed_events.clinics("deployed")) == fleet.ids[2:]  # nobody deployed twice
    assert first.figures.executed + resumed.figures.executed == 5
    assert fleet.packager.builds == ["r1", "r2"]  # the resumed run built nothing
    baked = [d["clinics"] for e, _, d in resumed_events.seen if e == "baking"]
    assert baked[0] == fleet.ids[1:2]  # the interrupted wave is baked again before going on


@needs_sam
@pytest.mark.slow
def test_an_interruption_mid_wave_cancels_the_clinics_not_started_and_the_resume_deploys_only_them(
    make_fleet: Any,
) -> None:
    fleet = make_fleet("midwave", 4, concurrency=1, bake_seconds=0)
    assert fleet.rollout("r1").run().phase == "done"
    last_wave = fleet.ids[2:]

    def interrupt(clinic: str | None, _detail: dict[str, Any]) -> None:
        if clinic == last_wave[0]:
            raise Interrupted  # in the worker, as a crash of the tool would stop it there

    events = Events()
    events.on("deployed", interrupt)
    with pytest.raises(Interrupted):
        fleet.rollout("r2", events).run()
    saved = RolloutState.load(fleet.state_path)
    assert saved is not None
    assert saved.clinics[last_wave[0]].state == "deployed" and saved.clinics[last_wave[1]].state == "pending"
    assert fleet.release(last_wave[1]) == "r1"  # cancelled before it started

    resumed_events = Events()
    assert fleet.rollout("r2", resumed_events).run().phase == "done"
    assert resumed_events.clinics("deployed") == [last_wave[1]]
    assert {i: fleet.release(i) for i in fleet.ids} == dict.fromkeys(fleet.ids, "r2")


@needs_sam
@pytest.mark.slow
def test_a_dry_run_creates_change_sets_and_executes_none(make_fleet: Any, capsys: pytest.CaptureFixture[str]) -> None:
    fleet = make_fleet("dry", 2)
    assert fleet.rollout("r1").run().phase == "done"
    local_fleet.set_release(fleet.path, "r2")
    console.width = 200
    state = run_rollout(load_fleet(fleet.path), fleet.path, fleet.packager, None, dry_run=True, clock=ManualClock())

    assert state.phase == "planned"
    out = capsys.readouterr().out
    assert "release r2: planned" in out and "2 change set(s), 0 executed" in out  # the final table and figures
    assert all(fleet.release(i) == "r1" for i in fleet.ids)
    cfn = fleet.aws.client("cloudformation")
    for clinic in fleet.ids:
        described = cfn.describe_change_set(ChangeSetName=state.clinics[clinic].change_set)
        assert described["Status"] == "CREATE_COMPLETE" and described["ExecutionStatus"] == "AVAILABLE"
        assert {c["ResourceChange"]["ResourceType"] for c in described["Changes"]} >= {"AWS::Lambda::Function"}


@needs_sam
@pytest.mark.slow
def test_a_fleet_over_two_cells_puts_each_stack_in_its_cells_account(local_aws: LocalAws, tmp_path: Path) -> None:
    """Past the first wall (IAM roles per account): cells are accounts; each clinic's stack, secrets and
    config land in its own cell's account, and each account gets its own copy of the release."""
    accounts = {"east": "310987654321", "west": "410987654321"}
    cells = {name: cell(account, f"fleet-cells-{name}") for name, account in accounts.items()}
    path = local_fleet.write_fleet(tmp_path, 2, "r1", prefix="cells", rollout={"bake_seconds": 0}, cells=cells)
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    data["clinics"][1]["cell"] = "west"
    data["clinics"][0]["cell"] = "east"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    fleet = load_fleet(path)
    sessions = Cells(fleet.cells)
    for name in cells:
        local_fleet.prepare_account(sessions.session(name).client("s3"), f"fleet-cells-{name}")
    packager = local_fleet.LocalPackager()

    state = Rollout(fleet, tmp_path, Cells(fleet.cells), packager, ManualClock(), tmp_path / "state.json").run()

    assert state.phase == "done" and packager.builds == ["r1"]  # built once, published to both accounts
    for clinic, name in (("cells-000", "east"), ("cells-001", "west")):
        session = sessions.session(name)
        assert session.client("sts").get_caller_identity()["Account"] == accounts[name]
        body = session.client("cloudformation").get_template(StackName=stack_name(clinic))["TemplateBody"]
        assert release_of(body) == "r1"
        assert session.client("ssm").get_parameter(Name=f"/clinicsync/{clinic}/config")["Parameter"]["Value"]
        other = sessions.session("west" if name == "east" else "east").client("cloudformation")
        assert stack_name(clinic) not in [s["StackName"] for s in other.describe_stacks()["Stacks"]]


@needs_sam
@pytest.mark.slow
def test_drift_names_clinics_on_another_release_or_with_other_parameters(make_fleet: Any) -> None:
    fleet = make_fleet("drift", 2, bake_seconds=0)
    assert fleet.rollout("r1").run().phase == "done"
    cells = Cells(load_fleet(fleet.path).cells)
    assert all(not d.differences for d in read_drift(load_fleet(fleet.path), fleet.root, cells, detect=False))

    data = yaml.safe_load(fleet.path.read_text(encoding="utf-8"))
    data["release"] = "r2"  # the registry moved on; nothing was deployed
    data["clinics"][1]["release"] = "r1"  # ... except that this clinic is pinned to what it runs
    data["clinics"][1]["parameters"] = {"SyncerMaxConcurrency": "8"}
    fleet.path.write_text(yaml.safe_dump(data), encoding="utf-8")
    found = {d.clinic_id: d for d in read_drift(load_fleet(fleet.path), fleet.root, cells, detect=False)}

    first, second = fleet.ids
    assert found[first].differences == ["release r1, registry says r2"]
    assert len(found[second].differences) == 1 and "SyncerMaxConcurrency" in found[second].differences[0]


def test_fleet_add_onboards_through_init_and_check_into_the_first_cell_with_room(
    make_clinic: Any, tmp_path: Path
) -> None:
    clinic = make_clinic(patients=3, appointments=3, rate_limit=False, crm="amocrm")
    sm = clinic.stack.aws.client("secretsmanager")
    values = {
        k: json.loads(sm.get_secret_value(SecretId=f"clinicsync/{clinic.config.clinic_id}/{k}")["SecretString"])
        for k in ("mis", "crm")
    }
    (tmp_path / "clinics").mkdir()
    secrets = tmp_path / "clinics" / "new.secrets.json"
    secrets.write_text(json.dumps(values), encoding="utf-8")
    registry = {
        "version": 1,
        "release": "r1",
        "cells": {
            "full": {"account_id": "111111111111", "artifacts_bucket": "bucket-full", "max_clinics": 1},
            "roomy": {"account_id": "222222222222", "artifacts_bucket": "bucket-roomy"},
        },
        "clinics": [{"id": "old-clinic", "config": "clinics/old-clinic/clinic.yaml", "cell": "full"}],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(registry), encoding="utf-8")
    args = ["fleet", "add", "--fleet", str(path), "--clinic-id", "fresh-fleet", "--mis", "medods"]
    args += ["--mis-url", clinic.config.mis.base_url, "--crm", "amocrm", "--secrets", str(secrets)]

    result = CliRunner().invoke(app, args)

    assert result.exit_code == 0, result.output
    added = load_fleet(path).clinic("fresh-fleet")
    assert added.cell == "roomy"  # the first cell is full
    assert added.config == Path("clinics/fresh-fleet/clinic.yaml")
    assert added.secrets == Path("clinics/new.secrets.json")
    assert load_clinic_config(tmp_path / added.config).clinic_id == "fresh-fleet"  # init's proposal, checked
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 1 and "already in" in again.output


# --- status across the fleet -----------------------------------------------------------------------------


def test_fleet_status_json_reads_50_local_clinics_breaching_first(local_aws: LocalAws, tmp_path: Path) -> None:
    local_fleet.speed_up_moto_server()
    demo = local_fleet.DEMO_CONFIG.read_text(encoding="utf-8")
    secrets = {"mis": {"api_key": "k"}, "crm": {"webhook_url": "http://127.0.0.1/"}, "clinic": {"hash_key": "h"}}
    ids = [f"status-{n:03d}" for n in range(50)]
    stacks = {clinic: ClinicStack(local_aws, clinic, demo.replace("demo-dental", clinic), secrets) for clinic in ids}
    lagging = ids[17]
    dynamodb = boto3.resource("dynamodb", endpoint_url=local_aws.endpoint, region_name=REGION)
    HealthLog(dynamodb.Table(stacks[lagging].table_name)).record_sync(
        patients=1, contacts=1, deals=1, crm_requests=3, crm_throttles=0, lag_seconds=7200
    )
    registry = {
        "version": 1,
        "release": "r1",
        "cells": {"default": {"account_id": "123456789012", "region": REGION, "artifacts_bucket": "unused"}},
        "clinics": [{"id": c, "config": f"{c}.yaml"} for c in ids],
    }
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(registry), encoding="utf-8")

    # Its speed (< 5 s for 50 clinics) is a figure of `make fleet-50`, not a timed test.
    result = CliRunner().invoke(app, ["fleet", "status", "--fleet", str(path), "--json"])

    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 50 and {r["clinic_id"] for r in rows} == set(ids)
    assert rows[0]["clinic_id"] == lagging and rows[0]["breaches"]  # breaching clinics first
    assert not any(r["breaches"] for r in rows[1:])


# --- rules ------------------------------------------------------------------------------------------------


@given(
    rate=st.floats(0.05, 20),
    burst=st.integers(1, 5),
    gaps=st.lists(st.floats(0, 30), min_size=1, max_size=40),
)
def test_token_bucket_never_lets_more_through_than_burst_plus_rate_times_window(
    rate: float, burst: int, gaps: list[float]
) -> None:
    clock = ManualClock(start=0.0)  # small times: the float error stays far below the tolerance
    bucket = TokenBucket(rate, burst, clock)
    for gap in gaps:
        clock.advance(gap)
        bucket.acquire()
    granted = bucket.granted
    assert granted == sorted(granted)
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            window = granted[j] - start
            assert j - i + 1 <= burst + rate * window + 1e-6


def _registry(clinics: int, waves: list[float], canary: list[str] | None = None) -> dict[str, Any]:
    return {
        "version": 1,
        "release": "r1",
        "cells": {"a": {"account_id": "111111111111", "artifacts_bucket": "bucket-a"}},
        "rollout": {"waves": waves, "canary": canary or []},
        "clinics": [{"id": f"c-{n}", "config": f"c-{n}.yaml", "cell": "a"} for n in range(clinics)],
    }


@given(
    clinics=st.integers(1, 60),
    waves=st.lists(st.floats(0.01, 1.0), min_size=0, max_size=4).map(lambda w: [*sorted(w), 1.0]),
)
def test_waves_put_the_canary_first_and_every_clinic_in_exactly_one_wave(clinics: int, waves: list[float]) -> None:
    fleet = Fleet.model_validate(_registry(clinics, waves))
    planned = fleet.waves()
    flat = [c for wave in planned for c in wave]
    assert sorted(flat) == sorted(c.id for c in fleet.clinics) and len(flat) == len(set(flat))
    assert planned[0] == ["c-0"] and all(planned)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda r: r["clinics"].append(dict(r["clinics"][0])), "listed twice"),
        (lambda r: r["rollout"].update(waves=[0.5]), "ending with 1.0"),
        (lambda r: r["rollout"].update(canary=["nope"]), "canary clinics not in the fleet"),
        (lambda r: r["clinics"][0].update(cell="b"), "unknown cell"),
        (lambda r: r["cells"]["a"].update(max_clinics=1), "over its max_clinics"),
        (lambda r: r["clinics"][0].update(parameters={"ClinicId": "x"}), "not tunable"),
        (lambda r: r.update(version=2), "version"),
        (lambda r: r["cells"]["a"].update(role_arn="arn:aws:iam::222222222222:role/x"), "own account"),
    ],
)
def test_an_inconsistent_registry_is_refused_with_the_reason(change: Any, message: str) -> None:
    registry = _registry(2, [1.0])
    change(registry)
    with pytest.raises(ValidationError, match=message):
        parse_fleet(yaml.safe_dump(registry))


def test_the_fleet_schema_and_example_are_current() -> None:
    schema = json.loads((DOCS / "fleet.schema.json").read_text(encoding="utf-8"))
    assert schema == fleet_json_schema(), "run `make schema`"
    example = load_fleet(DOCS / "fleet.example.yaml")
    assert parse_fleet(dump_fleet(example)) == example  # what `fleet add` writes back reads the same


def test_fleet_commands_say_what_is_wrong_with_a_registry_and_what_to_do(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    registry = _registry(2, [0.5])
    path.write_text(yaml.safe_dump(registry), encoding="utf-8")
    for command in ("status", "drift", "deploy"):
        result = CliRunner().invoke(app, ["fleet", command, "--fleet", str(path)])
        assert result.exit_code == 1, result.output
        assert "not a valid fleet registry" in result.output and "rollout" in result.output
        assert "next:" in result.output and "Traceback" not in result.output
    missing = CliRunner().invoke(app, ["fleet", "status", "--fleet", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 1 and "fleet.example.yaml" in missing.output
