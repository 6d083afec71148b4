"""``clinicsync fleet deploy``: one release to every clinic's stack, through CloudFormation change sets,
in waves (canary, then fractions of the rest), each wave baked and watched before the next.

States (docs/fleet.md has the diagram). Per clinic: pending -> deployed -> done, or unchanged / pinned /
planned (dry run) / failed / rolled_back. Per rollout: running -> done | halted | rolled_back | planned.
The state is saved to a JSON file after every transition, so an interrupted rollout resumes where it
stopped; a clinic whose stack already runs the target release is never updated twice.
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from pydantic import BaseModel, Field

from clinicsync.domain.config import ClinicConfig, parse_clinic_config
from clinicsync_cli import connect, deployment
from clinicsync_cli.clinic import SECRET_KEYS, clinic_secret_ref, load_secrets_file
from clinicsync_cli.fleet.cells import Cells
from clinicsync_cli.fleet.clock import Clock, TokenBucket
from clinicsync_cli.fleet.health import read_fleet
from clinicsync_cli.fleet.registry import Fleet, FleetClinic
from clinicsync_cli.fleet.release import Packager, ReleaseStore, release_of
from clinicsync_cli.stack import stack_name

TERMINAL_OK = ("CREATE_COMPLETE", "UPDATE_COMPLETE", "IMPORT_COMPLETE")
NO_CHANGES = ("didn't contain changes", "No updates are to be performed")
# Resource types whose change makes API Gateway create a deployment (1 per 5 s per account, fixed).
API_DEPLOYING_TYPES = ("AWS::ApiGatewayV2::", "AWS::Serverless::HttpApi", "AWS::ApiGateway::")

Observer = Callable[[str, str | None, dict[str, Any]], None]


class RolloutError(Exception):
    pass


class ClinicState(BaseModel):
    cell: str
    state: str = "pending"
    previous: str | None = None  # the release before this rollout touched the stack
    change_set: str | None = None
    changes: int = 0
    api_deployment: bool = False
    reason: str = ""


class RolloutState(BaseModel):
    release: str
    phase: str = "running"
    dry_run: bool = False
    waves: list[list[str]]
    wave: int = 0  # the first wave not yet done
    clinics: dict[str, ClinicState]
    breach: dict[str, list[str]] = Field(default_factory=dict)
    started_at: float
    updated_at: float

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(".tmp")
        scratch.write_text(self.model_dump_json(indent=2), encoding="utf-8")
        scratch.replace(path)  # atomic: an interruption leaves the old or the new state, never half

    @classmethod
    def load(cls, path: Path) -> RolloutState | None:
        if not path.is_file():
            return None
        return cls.model_validate_json(path.read_text(encoding="utf-8"))


@dataclass
class Figures:
    change_sets: int = 0
    executed: int = 0
    rolled_back: int = 0
    api_deployments: list[float] = field(default_factory=list)


class Rollout:
    def __init__(
        self,
        fleet: Fleet,
        base: Path,
        cells: Cells,
        packager: Packager,
        clock: Clock,
        state_path: Path,
        *,
        dry_run: bool = False,
        observer: Observer | None = None,
    ) -> None:
        self.fleet, self.base, self.cells, self.packager, self.clock = fleet, base, cells, packager, clock
        self.state_path, self.dry_run = state_path, dry_run
        self.observer: Observer = observer or (lambda _event, _clinic, _detail: None)
        policy = fleet.rollout
        # One bucket per account: the quotas are per account, and cells are accounts.
        self.api_buckets = {name: TokenBucket(policy.api_deployments_per_second, 1, clock) for name in fleet.cells}
        self.cfn_buckets = {name: TokenBucket(policy.cfn_calls_per_second, 2, clock) for name in fleet.cells}
        self.figures = Figures()
        self._pending_config: dict[str, tuple[str, str]] = {}  # clinic -> SSM name and text, after its code
        self._lock = threading.Lock()
        self.state: RolloutState

    # -- the run ------------------------------------------------------------------------------------------

    def run(self, restart: bool = False) -> RolloutState:
        self.state = self._start(restart)
        self._package()
        while self.state.wave < len(self.state.waves) and self.state.phase == "running":
            self._run_wave(self.state.wave)
        if self.state.phase == "running":
            self.state.phase = "planned" if self.dry_run else "done"
        self._save()
        self.observer("finished", None, {"phase": self.state.phase})
        return self.state

    def _start(self, restart: bool) -> RolloutState:
        existing = None if restart else RolloutState.load(self.state_path)
        if existing is not None and existing.phase == "running":
            if existing.release != self.fleet.release or existing.dry_run != self.dry_run:
                raise RolloutError(
                    f"an unfinished rollout of {existing.release} is in {self.state_path}; "
                    "resume it with that release, or pass --restart to abandon it"
                )
            self.observer("resumed", None, {"wave": existing.wave})
            return existing
        now = self.clock.now()
        waves = self.fleet.waves()
        clinics = {c.id: ClinicState(cell=c.cell) for c in self.fleet.clinics}
        for clinic in self.fleet.clinics:
            if self.fleet.target_release(clinic) != self.fleet.release:
                clinics[clinic.id].state = "pinned"
                clinics[clinic.id].reason = f"pinned to {clinic.release}"
        state = RolloutState(
            release=self.fleet.release,
            dry_run=self.dry_run,
            waves=waves,
            clinics=clinics,
            started_at=now,
            updated_at=now,
        )
        state.save(self.state_path)
        return state

    def _package(self) -> None:
        """Build once; publish to every cell that lacks the release (a resumed rollout builds nothing)."""
        missing = [
            name
            for name in sorted({c.cell for c in self.fleet.clinics})
            if not self._store(name).exists(self.state.release)
        ]
        if not missing:
            return
        self.observer("building", None, {"release": self.state.release})
        packaged = self.packager.build(self.state.release)
        for name in missing:
            self._store(name).publish(packaged)
        self.observer("packaged", None, {"release": self.state.release, "cells": missing})

    def _run_wave(self, index: int) -> None:
        known = {c.id for c in self.fleet.clinics}
        for gone in [i for i in self.state.waves[index] if i not in known]:  # removed while interrupted
            self._set(gone, state="skipped", reason="no longer in the registry")
        ids = [i for i in self.state.waves[index] if self.state.clinics[i].state not in ("pinned", "done", "skipped")]
        self.observer("wave", None, {"index": index, "clinics": ids})
        self._each(self._deploy_clinic, ids)
        failed = {i: [self.state.clinics[i].reason] for i in ids if self.state.clinics[i].state == "failed"}
        if self.dry_run:
            self._advance(index, ids, "planned")
            return
        breach = failed or self._bake(ids)
        if breach:
            self.state.breach = breach
            self.observer("breach", None, {"wave": index, "clinics": breach})
            self._roll_back(ids)
            self.state.phase = "rolled_back"
            self._save()
            return
        self._advance(index, ids, "done")

    def _advance(self, index: int, ids: list[str], final: str) -> None:
        with self._lock:
            for clinic_id in ids:
                if self.state.clinics[clinic_id].state in ("deployed", "unchanged", "planned"):
                    self.state.clinics[clinic_id].state = final
            self.state.wave = index + 1
        self._save()
        self.observer("wave_done", None, {"index": index})

    # -- one clinic -----------------------------------------------------------------------------------------

    def _deploy_clinic(self, clinic_id: str) -> None:
        clinic = self.fleet.clinic(clinic_id)
        entry = self.state.clinics[clinic_id]
        if entry.state in ("deployed", "unchanged", "planned"):
            return  # resumed: already there
        try:
            current, status = self._current(clinic)
            if entry.previous is None and current != self.state.release:
                self._set(clinic_id, previous=current)
            if current == self.state.release and status in TERMINAL_OK:
                self._set(clinic_id, state="unchanged", reason="already on the release")
                self.observer("unchanged", clinic_id, {})
                return
            parameters = self._parameters(clinic)
            name, changes = self._change_set(clinic, self.state.release, parameters, create=status is None)
            if name is None:
                self._set(clinic_id, state="unchanged", reason="no changes")
                self.observer("unchanged", clinic_id, {})
                return
            api = any(c.startswith(API_DEPLOYING_TYPES) for c in changes)
            self._set(clinic_id, change_set=name, changes=len(changes), api_deployment=api)
            if self.dry_run:
                self._set(clinic_id, state="planned")
                self.observer("planned", clinic_id, {"changes": len(changes)})
                return
            self._execute(clinic, name, api)
            self._store_pending_config(clinic)
            self._set(clinic_id, state="deployed")
            self.observer("deployed", clinic_id, {"changes": len(changes)})
        except (RolloutError, ClientError, BotoCoreError, ValueError, OSError, RuntimeError) as exc:
            # RuntimeError: typer.Exit from the single-clinic helpers (they print their own message)
            reason = str(exc) if isinstance(exc, RolloutError) else f"{type(exc).__name__}: {exc}"[:300]
            self._set(clinic_id, state="failed", reason=reason)
            self.observer("failed", clinic_id, {"reason": reason})

    def _current(self, clinic: FleetClinic) -> tuple[str | None, str | None]:
        """The stack's release and status; (None, None) when there is no stack (or only a dry run's)."""
        cfn = self.cells.client(clinic.cell, "cloudformation")
        stack = stack_name(clinic.id)
        try:
            status = str(cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"])
        except ClientError:
            return None, None
        if status == "REVIEW_IN_PROGRESS":
            return None, None
        template = cfn.get_template(StackName=stack, TemplateStage="Original")["TemplateBody"]
        return release_of(template), status

    def _parameters(self, clinic: FleetClinic) -> dict[str, str]:
        """The single-clinic deploy's own steps: secrets to Secrets Manager, the config to SSM, and the
        stack parameters from the config (a dry run only reads the secrets' ARNs)."""
        config_path = self.base / clinic.config
        text = config_path.read_text(encoding="utf-8")
        config: ClinicConfig = parse_clinic_config(text)
        if config.clinic_id != clinic.id:
            raise RolloutError(f"{config_path} is clinic {config.clinic_id!r}, not {clinic.id!r}")
        refs = {"mis": config.mis.secret_ref, "crm": config.crm.secret_ref, "clinic": clinic_secret_ref(clinic.id)}
        parameter = f"/clinicsync/{clinic.id}/config"
        with self.cells.bound(clinic.cell):
            if clinic.secrets is not None and not self.dry_run:
                values = _secrets_file(self.base / clinic.secrets)
                # Merged as `clinicsync deploy` merges: a stored OAuth pair is never overwritten by an older one.
                arns, _ = deployment.store_secrets(refs, values, crm_token_keys=connect.token_keys(config.crm.kind))
            else:
                sm = self.cells.client(clinic.cell, "secretsmanager")
                arns = {k: str(sm.describe_secret(SecretId=ref)["ARN"]) for k, ref in refs.items()}
            if not self.dry_run:
                # Code before config (docs/deploy.md): only a first deploy needs the config before its stack.
                if deployment.config_exists(parameter):
                    self._pending_config[clinic.id] = (parameter, text)
                else:
                    deployment.store_config(parameter, text)
        overrides = deployment.parameter_overrides(config, parameter, arns, self.fleet.alarm_topic_arn)
        return {**overrides, **clinic.parameters}

    def _store_pending_config(self, clinic: FleetClinic) -> None:
        pending = self._pending_config.pop(clinic.id, None)
        if pending is not None:
            with self.cells.bound(clinic.cell):
                deployment.store_config(*pending)

    def _change_set(
        self, clinic: FleetClinic, release: str, parameters: dict[str, str], *, create: bool
    ) -> tuple[str | None, list[str]]:
        """Create and describe a change set; (None, []) when the stack already matches."""
        cfn = self.cells.client(clinic.cell, "cloudformation")
        stack = stack_name(clinic.id)
        # Unique per attempt: a resumed rollout may create another change set for the same release.
        name = f"clinicsync-{release.replace('.', '-').replace('_', '-')}-{uuid.uuid4().hex[:12]}"
        self.cfn_buckets[clinic.cell].acquire()
        created = cfn.create_change_set(
            StackName=stack,
            ChangeSetName=name,
            ChangeSetType="CREATE" if create else "UPDATE",
            Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in parameters.items()],
            Capabilities=["CAPABILITY_IAM", "CAPABILITY_NAMED_IAM", "CAPABILITY_AUTO_EXPAND"],
            Tags=[{"Key": "app", "Value": "clinicsync"}, {"Key": "clinic", "Value": clinic.id}],
            Description=f"clinicsync release {release}",
            **self._store(clinic.cell).template_source(release),
        )
        with self._lock:
            self.figures.change_sets += 1
        described = self._wait_change_set(cfn, created["Id"])
        if described["Status"] == "FAILED":
            if any(marker in described.get("StatusReason", "") for marker in NO_CHANGES):
                cfn.delete_change_set(ChangeSetName=created["Id"])
                return None, []
            raise RolloutError(f"change set failed: {described.get('StatusReason', '')}"[:300])
        changes = [str(c["ResourceChange"]["ResourceType"]) for c in described.get("Changes", [])]
        return str(created["Id"]), changes

    def _wait_change_set(self, cfn: Any, change_set: str) -> dict[str, Any]:
        while True:
            described: dict[str, Any] = cfn.describe_change_set(ChangeSetName=change_set)
            if described["Status"] in ("CREATE_COMPLETE", "FAILED"):
                return described
            self.clock.sleep_until(self.clock.now() + self.fleet.rollout.stack_poll_seconds)

    def _execute(self, clinic: FleetClinic, change_set: str, api_deployment: bool) -> None:
        cfn = self.cells.client(clinic.cell, "cloudformation")
        self.cfn_buckets[clinic.cell].acquire()
        if api_deployment:
            at = self.api_buckets[clinic.cell].acquire()
            with self._lock:
                self.figures.api_deployments.append(at)
        cfn.execute_change_set(ChangeSetName=change_set)
        with self._lock:
            self.figures.executed += 1
        stack = stack_name(clinic.id)
        while True:
            status = str(cfn.describe_stacks(StackName=stack)["Stacks"][0]["StackStatus"])
            if status in TERMINAL_OK:
                return
            if status.endswith(("_FAILED", "ROLLBACK_COMPLETE")):
                raise RolloutError(f"stack ended {status}")
            self.clock.sleep_until(self.clock.now() + self.fleet.rollout.stack_poll_seconds)

    # -- bake and roll back ----------------------------------------------------------------------------------

    def _bake(self, ids: list[str]) -> dict[str, list[str]]:
        """Watch the wave's clinics for the bake time; the first breach ends it."""
        policy = self.fleet.rollout
        watched = [i for i in ids if self.state.clinics[i].state == "deployed"]
        if not watched:
            return {}  # nothing changed in this wave: nothing to watch
        end = self.clock.now() + policy.bake_seconds
        self.observer("baking", None, {"clinics": watched, "seconds": policy.bake_seconds})
        while True:
            found = {h.clinic_id: h.breaches for h in read_fleet(self.fleet, self.cells, watched) if h.breaches}
            self.observer("baked", None, {"breaching": sorted(found)})
            if found or self.clock.now() >= end:
                return found
            self.clock.sleep_until(min(end, self.clock.now() + policy.poll_seconds))

    def _roll_back(self, ids: list[str]) -> None:
        """Every clinic of the wave this rollout changed goes back to the release it ran before."""
        targets = [i for i in ids if self.state.clinics[i].state in ("deployed", "failed")]
        self._each(self._roll_back_clinic, targets)

    def _each(self, work: Callable[[str], None], ids: list[str]) -> None:
        """``concurrency`` clinics at a time. On an interruption the clinics not started are skipped
        (their state stays pending); the ones under way finish and save their state first."""
        stop = threading.Event()

        def guarded(clinic_id: str) -> None:
            if stop.is_set():
                return
            try:
                work(clinic_id)
            except BaseException:
                stop.set()
                raise

        pool = ThreadPoolExecutor(max_workers=self.fleet.rollout.concurrency)
        try:
            for future in [pool.submit(guarded, clinic_id) for clinic_id in ids]:
                future.result()
        except BaseException:
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _roll_back_clinic(self, clinic_id: str) -> None:
        clinic = self.fleet.clinic(clinic_id)
        entry = self.state.clinics[clinic_id]
        previous = entry.previous
        if previous is None or not self._store(clinic.cell).exists(previous):
            self._set(clinic_id, reason=f"{entry.reason}; no earlier fleet release to roll back to".lstrip("; "))
            return
        try:
            current, status = self._current(clinic)
            if current != previous or status not in TERMINAL_OK:
                name, changes = self._change_set(clinic, previous, self._parameters(clinic), create=False)
                if name is not None:
                    api = any(c.startswith(API_DEPLOYING_TYPES) for c in changes)
                    self._execute(clinic, name, api)
            with self._lock:
                self.figures.rolled_back += 1
            self._set(clinic_id, state="rolled_back", reason=f"back on {previous}")
            self.observer("rolled_back", clinic_id, {"release": previous})
        except (RolloutError, ClientError, BotoCoreError, ValueError, OSError) as exc:
            self._set(clinic_id, state="failed", reason=f"rollback failed: {type(exc).__name__}")
            self.observer("failed", clinic_id, {"reason": "rollback failed"})

    # -- bookkeeping --------------------------------------------------------------------------------------

    def _store(self, cell: str) -> ReleaseStore:
        spec = self.cells.cell(cell)
        return ReleaseStore(self.cells.client(cell, "s3"), spec.artifacts_bucket, spec.region)

    def _set(self, clinic_id: str, **changes: Any) -> None:
        with self._lock:
            entry = self.state.clinics[clinic_id]
            for key, value in changes.items():
                setattr(entry, key, value)
        self._save()

    def _save(self) -> None:
        with self._lock:
            self.state.updated_at = self.clock.now()
            self.state.save(self.state_path)


def _secrets_file(path: Path) -> dict[str, dict[str, Any]]:
    values = load_secrets_file(path)
    missing = [k for k in SECRET_KEYS if k != "clinic" and not values[k]]
    if missing:
        raise RolloutError(f"{path} lacks {', '.join(missing)} credentials")
    return values


def state_summary(state: RolloutState) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for entry in state.clinics.values():
        counts[entry.state] = counts.get(entry.state, 0) + 1
    return {"release": state.release, "phase": state.phase, "wave": state.wave, "clinics": counts}


def dump_state(state: RolloutState) -> str:
    return json.dumps(state.model_dump(mode="json"), indent=2)
