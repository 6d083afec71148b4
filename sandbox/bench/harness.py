"""Plumbing for the benchmark: the simulated clock wired into clinicsync and the emulators, counters for
AWS calls and our own CPU, handler import times, and the MIS change generator every contestant replays."""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import os
import random
import re
import subprocess
import sys
import threading
import time
import tracemalloc
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from unittest import mock

from sandbox.bench.peers import Visit, eligible
from sandbox.bench.simclock import ClockedApp, SimClock
from sandbox.runtime import tune_moto

ROOT = Path(__file__).resolve().parents[2]
HANDLERS = ("mis_poller", "stage_syncer", "crm_webhook", "unsubscribe")


# --- the simulated clock, wired in ----------------------------------------------------------------


@dataclass
class Wired:
    clock: SimClock
    crm_apps: list[ClockedApp] = field(default_factory=list)

    @property
    def crm(self) -> ClockedApp:
        return self.crm_apps[-1]


@contextlib.contextmanager
def simulated(clock: SimClock) -> Iterator[Wired]:
    """CRM emulators built in here run on ``clock`` behind a :class:`ClockedApp`; clinicsync's pacers,
    shared budget and back-off sleeps wait in simulated time; the emulators keep connections alive.
    Everything else is untouched."""
    import sandbox.local as local
    from clinicsync.adapters.amocrm import client as amocrm
    from clinicsync.adapters.aws import budget
    from clinicsync.adapters.bitrix24 import client as bitrix24
    from clinicsync.adapters.http import pacing
    from clinicsync.runtime import wiring
    from sandbox.emulators.amocrm import AmoCrmEmulator
    from sandbox.emulators.bitrix24 import Bitrix24Emulator

    wired = Wired(clock)
    real_served = local.ServedApp
    real_breaker = amocrm.StoreCircuitBreaker

    def served(app: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(app, Bitrix24Emulator | AmoCrmEmulator):
            app = ClockedApp(app, clock)
            wired.crm_apps.append(app)
        # The vendors' endpoints keep connections alive, as AWS's do (moto_process.KeepAliveHandler): a
        # warm container's pooled connection is not a TCP connect per request on our thread.
        return real_served(app, *args, keep_alive=True, **kwargs)

    # wiring imports the adapters where it builds them, so patching the modules reaches it.
    bucket = functools.partial(budget.SharedLeakyBucket, clock=clock.now, sleep=clock.sleep)
    patches = [
        (local, "ServedApp", served),
        (local, "Bitrix24Emulator", functools.partial(Bitrix24Emulator, clock=clock)),
        (local, "AmoCrmEmulator", functools.partial(AmoCrmEmulator, clock=clock)),
        (pacing, "Pacer", functools.partial(pacing.Pacer, clock=clock.monotonic, sleep=clock.sleep)),
        (budget, "SharedLeakyBucket", bucket),  # wiring imports it from here where it builds one
        # The portal's pause (operating_reset_at) is on the emulator's clock: the client reads it on the same.
        (bitrix24, "Bitrix24Client", functools.partial(bitrix24.Bitrix24Client, sleep=clock.sleep, clock=clock.now)),
        (amocrm, "AmoCrmClient", functools.partial(amocrm.AmoCrmClient, sleep=clock.sleep)),
        # Its one read per 10 s follows the clock the requests run on: the AWS calls repeat run after run.
        (amocrm, "StoreCircuitBreaker", lambda *args, **kw: real_breaker(*args, **(kw | {"clock": clock.now}))),
    ]
    with contextlib.ExitStack() as stack:
        for module, name, replacement in patches:
            stack.enter_context(mock.patch.object(module, name, replacement))
        stack.callback(wiring.reset)  # the container's CRM clients were built with the patched parts
        wiring.reset()
        yield wired


# --- moto, made to scale to a 3,000-patient table ------------------------------------------------------


@contextlib.contextmanager
def moto_transactions_copy_once() -> Iterator[None]:
    """moto made to scale to a 3,000-patient table: see :func:`sandbox.runtime.tune_moto` (permanent)."""
    tune_moto()
    yield


# --- what our code costs: CPU of the invoking thread, AWS calls, memory ------------------------------


@dataclass
class Meter:
    """Wraps a ClinicStack's invocations: our CPU (this thread only: the emulators and moto serve from
    their own threads, so their time is excluded), invocation counts and durations, AWS calls."""

    cpu: float = 0.0
    sdk_cpu: float = 0.0  # of which inside boto3/botocore calls (client side: serialising, signing, parsing)
    invocations: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    aws: Counter[str] = field(default_factory=Counter)  # "dynamodb.PutItem" -> calls; "+items" for batches
    peak_bytes: int = 0
    # tracemalloc slows the traced code several times over: only the first ``trace_left`` syncer
    # invocations are traced, and their CPU and events are kept apart so they do not count in CPU/event.
    trace_left: int = 0
    trace_every: int = 0  # also trace the 1st, (n+1)th, (2n+1)th... syncer invocation (the scale curve)
    traced: int = 0  # syncer invocations traced so far
    events: int = 0  # appointments delivered to the syncer in SQS messages
    traced_cpu: float = 0.0
    traced_sdk_cpu: float = 0.0
    traced_events: int = 0
    # CPU of the untraced invocations that carry no appointments (the poller, other queues' batches): it
    # serves every event, so it is spread over all of them, traced or not (see cpu_ms_per_event).
    shared_cpu: float = 0.0
    shared_sdk_cpu: float = 0.0
    progress: Any = None  # callable(str) for long runs, or None
    failed_messages: list[str] = field(default_factory=list)  # sync messages an invocation failed, in order

    def snapshot(self) -> dict[str, Any]:
        return {
            "cpu": self.cpu,
            "sdk_cpu": self.sdk_cpu,
            "events": self.events,
            "traced_cpu": self.traced_cpu,
            "traced_sdk_cpu": self.traced_sdk_cpu,
            "traced_events": self.traced_events,
            "shared_cpu": self.shared_cpu,
            "shared_sdk_cpu": self.shared_sdk_cpu,
            "invocations": Counter(self.invocations),
            "seconds": Counter(self.seconds),
            "aws": Counter(self.aws),
        }


@contextlib.contextmanager
def metered(stack: Any) -> Iterator[Meter]:
    import botocore.client

    meter = Meter()
    inside = threading.local()  # set on the thread running a handler: its boto3 calls are our CPU
    real_invoke = stack.invoke
    real_call = botocore.client.BaseClient._make_api_call

    def invoke(function_id: str, event: Any) -> Any:
        cpu, wall, sdk = time.thread_time(), time.perf_counter(), meter.sdk_cpu
        nth = meter.invocations[function_id] + 1
        tracing = function_id == "StageSyncerFunction" and (
            meter.trace_left > 0 or (meter.trace_every > 0 and nth % meter.trace_every == 1)
        )
        events = _appointments_in(event)
        if tracing:
            meter.trace_left = max(0, meter.trace_left - 1)
            meter.traced += 1
            tracemalloc.start()
        inside.invocation = True
        records = (event.get("Records") or []) if isinstance(event, dict) else []
        try:
            result = real_invoke(function_id, event)
        except BaseException:
            meter.failed_messages += [str(r.get("messageId")) for r in records]
            raise
        else:
            failures = (result or {}).get("batchItemFailures", []) if isinstance(result, dict) else []
            meter.failed_messages += [str(f.get("itemIdentifier")) for f in failures]
            return result
        finally:
            inside.invocation = False
            spent = time.thread_time() - cpu
            if tracing:
                meter.peak_bytes = max(meter.peak_bytes, tracemalloc.get_traced_memory()[1])
                tracemalloc.stop()
                meter.traced_cpu += spent
                meter.traced_sdk_cpu += meter.sdk_cpu - sdk
                meter.traced_events += events
            elif events == 0:
                meter.shared_cpu += spent
                meter.shared_sdk_cpu += meter.sdk_cpu - sdk
            meter.events += events
            meter.cpu += spent
            meter.invocations[function_id] += 1
            meter.seconds[function_id] += time.perf_counter() - wall
            if meter.progress is not None:
                records = event.get("Records") or [{}]
                queue = str(records[0].get("eventSourceARN", "schedule")).rsplit(":", 1)[-1]
                meter.progress(
                    f"{function_id} #{meter.invocations[function_id]} ({queue}, {len(records)} records): "
                    f"{time.perf_counter() - wall:.1f} s"
                )

    def make_api_call(client: Any, operation: str, params: dict[str, Any]) -> Any:
        service = client.meta.service_model.service_name
        meter.aws[f"{service}.{operation}"] += 1
        if operation == "BatchWriteItem":
            meter.aws["dynamodb.items_written"] += sum(len(v) for v in params.get("RequestItems", {}).values())
        elif operation == "BatchGetItem":
            meter.aws["dynamodb.items_read"] += sum(
                len(v.get("Keys", [])) for v in params.get("RequestItems", {}).values()
            )
        elif operation == "TransactWriteItems":
            meter.aws["dynamodb.items_transacted"] += len(params.get("TransactItems", []))
        elif operation in ("SendMessageBatch", "DeleteMessageBatch"):
            meter.aws[f"sqs.{operation}.entries"] += len(params.get("Entries", []))
        if not getattr(inside, "invocation", False):
            return real_call(client, operation, params)  # the runtime's own polling, not our code's CPU
        started = time.thread_time()
        try:
            return real_call(client, operation, params)
        finally:
            meter.sdk_cpu += time.thread_time() - started

    stack.invoke = invoke
    botocore.client.BaseClient._make_api_call = make_api_call  # type: ignore[method-assign]
    try:
        yield meter
    finally:
        stack.invoke = real_invoke
        botocore.client.BaseClient._make_api_call = real_call  # type: ignore[method-assign]


def _appointments_in(event: Any) -> int:
    """Appointments carried by a sync-queue batch (the events the CPU is divided by); 0 for others."""
    count = 0
    for record in (event.get("Records") or []) if isinstance(event, dict) else []:
        try:
            body = json.loads(record.get("body") or "{}")
        except ValueError:
            continue
        if isinstance(body, dict) and body.get("kind") == "mis_changes":
            count += sum(len(change.get("appointments", [])) for change in body.get("changes", []))
    return count


def cpu_ms_per_event(cost: dict[str, Any], sdk: bool = False) -> float | None:
    """Our CPU per appointment delivered to the syncer: the untraced syncer invocations' CPU over their
    appointments, plus the CPU that serves all appointments (the poller's, batches of other queues) over
    all of them. Without tracing this is all CPU over all appointments. The shared part is never divided
    by the untraced appointments alone: with the backfill's first invocation traced (4,337 of 5,000
    appointments at 5k) that charged the whole poll to the other 663, and read 3-4 times the real cost."""
    key = "sdk_cpu" if sdk else "cpu"
    events, untraced = cost["events"], cost["events"] - cost["traced_events"]
    if untraced <= 0:
        return None
    shared: float = cost[f"shared_{key}"]
    own: float = cost[key] - cost[f"traced_{key}"] - shared
    return round(1000 * (shared / events + own / untraced), 3)


def diff(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {
        "cpu": after["cpu"] - before["cpu"],
        "sdk_cpu": after["sdk_cpu"] - before["sdk_cpu"],
        "events": after["events"] - before["events"],
        "traced_cpu": after["traced_cpu"] - before["traced_cpu"],
        "traced_sdk_cpu": after["traced_sdk_cpu"] - before["traced_sdk_cpu"],
        "traced_events": after["traced_events"] - before["traced_events"],
        "shared_cpu": after["shared_cpu"] - before["shared_cpu"],
        "shared_sdk_cpu": after["shared_sdk_cpu"] - before["shared_sdk_cpu"],
        "invocations": after["invocations"] - before["invocations"],
        "seconds": after["seconds"] - before["seconds"],
        "aws": after["aws"] - before["aws"],
    }


def failures_told(clinic: Any, message_ids: Sequence[str], queue: str = "sync", shown: int = 3) -> str:
    """Why a run is refused, as the operator would read it (``clinicsync dlq list``): the recorded reasons
    of the messages that failed (the commonest first) and how many of them the queue's DLQ holds."""
    from clinicsync_cli.dlq import dead_letters
    from clinicsync_cli.stack import StackHandle

    with clinic.stack.environment():
        handle = StackHandle.find(clinic.stack.stack_name)
        _, dlq_url = handle.queue_urls(queue)
        dead = len(dead_letters(handle.sqs(), dlq_url, handle.failure_log(), queue))
        known = handle.failure_log().reasons(queue, list(message_ids)) if message_ids else {}
    if not message_ids and not dead:
        return ""
    failed = list(dict.fromkeys(message_ids))
    reasons = Counter(known.get(mid, {}).get("reason") or "no recorded reason" for mid in failed)
    common = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(shown))
    more = f"; and {len(reasons) - shown} other reasons" if len(reasons) > shown else ""
    return f"{len(failed)} messages failed, {dead} of them in the {queue} DLQ; last reasons: {common}{more}"


# --- import time of each handler, in a fresh interpreter -----------------------------------------------


LAYER_PYTHON = ROOT / ".venv-layer" / "bin" / "python"


def import_python() -> Path:
    """The interpreter that imports like the deployed function: ``.venv-layer`` (made by ``make bench``)
    holds only the layer's requirements. The dev venv also has the CLI's rich/click/pygments, which
    httpx imports when present, so it would overstate a handler's import."""
    return LAYER_PYTHON if LAYER_PYTHON.exists() else Path(sys.executable)


@dataclass
class ImportTiming:
    ms: float
    by_package_ms: dict[str, float]  # self time summed per top-level package, the largest first


def deployed_constants() -> dict[str, str]:
    """The functions' environment every stack has (the template's Globals with plain values, e.g.
    Powertools' settings and PYDANTIC_DISABLE_PLUGINS): an import is timed with it, as deployed."""
    from sandbox.cfn_yaml import load_template

    variables = load_template(ROOT / "template.yaml")["Globals"]["Function"]["Environment"]["Variables"]
    return {name: value for name, value in variables.items() if isinstance(value, str)}


def import_ms(handler: str, runs: int = 3, top: int = 6) -> ImportTiming:
    """``python -X importtime``: the handler module's cumulative import time, best of ``runs`` (the
    machine is shared, so the minimum is the least disturbed measurement), and where that best run
    spent it: self times summed per top-level package, so the parts add up to the whole."""
    env = {
        **os.environ,
        **deployed_constants(),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "functions" / handler), str(ROOT / "layers" / "shared")]),
        "AWS_DEFAULT_REGION": "eu-central-1",
        # As deployed: in Lambda (the X-Ray SDK's recorder takes its Lambda path; outside it builds a botocore
        # X-Ray client at import) with tracing on (template: Tracing: Active).
        "LAMBDA_TASK_ROOT": str(ROOT / "functions" / handler),
    }
    env.pop("POWERTOOLS_TRACE_DISABLED", None)
    # The layer ships bytecode (layers/shared/Makefile); a shell that forbids writing it would have every
    # run compile our package again (~100 ms), so the first run writes it and the best of the rest counts.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    best: ImportTiming | None = None
    for _ in range(runs):
        done = subprocess.run(
            [str(import_python()), "-X", "importtime", "-c", "import app"],
            env=env,
            cwd=str(ROOT / "functions" / handler),
            capture_output=True,
            text=True,
            check=True,
        )
        total = 0.0
        by_package: Counter[str] = Counter()
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)$", line)
            if not match:
                continue
            self_us, cumulative_us, module = int(match.group(1)), int(match.group(2)), match.group(4)
            by_package[module.split(".")[0]] += self_us
            if module == "app":
                total = cumulative_us / 1000
        if best is None or total < best.ms:
            parts = {name: round(us / 1000, 1) for name, us in by_package.most_common(top)}
            best = ImportTiming(round(total, 1), parts)
    assert best is not None and best.ms > 0, f"no import time line for {handler}"
    return best


# --- MIS changes: applied to the MEDODS emulator, recorded so every peer replays the same ones ------------


def visits_now(medods: Any, appointment_ids: Any = None) -> list[Visit]:
    """Snapshots (copies) of eligible visits, with their patients, as the MIS shows them now."""
    clients = {int(c["id"]): c for c in medods.all_clients()}
    rows = medods.all_appointments()
    if appointment_ids is not None:
        wanted = set(appointment_ids)
        rows = [r for r in rows if int(r["id"]) in wanted]
    out = []
    for row in rows:
        client = clients.get(int(row["clientId"]))
        if client is not None and eligible(client, row):
            out.append(Visit(copy.deepcopy(client), copy.deepcopy(row)))
    return out


MOVES = {
    "need_approval": ("confirm", "cancel"),
    "approved": ("confirm", "arrive", "cancel", "no_show"),
    "confirmed_by_administrator": ("arrive", "cancel", "no_show"),
    "arrived": ("complete",),
    "serviced": ("bill",),
    "billed": ("pay",),
}


class ChangeMaker:
    """A front desk's day: mostly status moves of booked visits, some bookings, a few new patients."""

    def __init__(self, clinic: Any, seed: int = 9) -> None:
        self.clinic = clinic
        self.medods = clinic.medods
        self.rng = random.Random(seed)
        self.new_patients = 0

    def _slot(self) -> Any:
        day = self.rng.randrange(1, 30)
        minute = self.rng.randrange(9 * 4, 20 * 4) * 15
        at = self.clinic.mis.at(day, f"{minute // 60:02d}:{minute % 60:02d}")
        return at + timedelta(seconds=self.rng.randrange(60))

    def _eligible_clients(self) -> list[dict[str, Any]]:
        return [c for c in self.medods.all_clients() if not (c.get("archived") or c.get("denyDataProcessing"))]

    def _movable(self) -> list[dict[str, Any]]:
        clients = {int(c["id"]) for c in self._eligible_clients()}
        return [
            r
            for r in self.medods.all_appointments()
            if r["status"] in MOVES
            and not r.get("anonymous")
            and not r.get("deletedAt")
            and int(r["clientId"]) in clients
        ]

    def status_move(self, movable: list[dict[str, Any]] | None = None) -> int | None:
        """Move one booked visit on; ``movable`` (a cycle's candidates) loses the visit it moved, so a
        visit moves at most once a cycle and the MIS is scanned once a cycle, not once a change."""
        rows = self._movable() if movable is None else movable
        if not rows:
            return None
        row = rows.pop(self.rng.randrange(len(rows)))
        getattr(self.medods, self.rng.choice(MOVES[row["status"]]))(int(row["id"]))
        return int(row["id"])

    def one(self, movable: list[dict[str, Any]] | None = None) -> int | None:
        roll = self.rng.random()
        if roll < 0.10:
            client = self.rng.choice(self._eligible_clients())
            return int(self.clinic.mis.book(int(client["id"]), self._slot()))
        if roll < 0.15:
            self.new_patients += 1
            phone = f"+7 9{self.rng.randrange(10**8, 10**9)}"
            client_id = self.clinic.mis.add_client(f"Новикова{self.rng.randrange(10**6)}", phone)
            return int(self.clinic.mis.book(client_id, self._slot()))
        return self.status_move(movable)

    def cycle(self, changes: int) -> list[int]:
        movable = self._movable()
        done = [a for a in (self.one(movable) for _ in range(changes)) if a is not None]
        return list(dict.fromkeys(done))
