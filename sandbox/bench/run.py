"""``make bench``: clinicsync against its peers, side by side in one run, on both CRMs.

Every contestant talks HTTP to its own CRM emulator with the real limits enforced, all on one simulated
clock (:mod:`sandbox.bench.simclock`): rate-limit time is exact and costs no wall time. clinicsync runs
in the local runtime (moto, SQS event sources, the real handlers); the peers are in
:mod:`sandbox.bench.peers`. Figures that are ours alone (CPU per event, imports, memory, latency, AWS
cost) are measured on clinicsync only. Speed goals live here and in the README, never in tests.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import io
import logging
import math
import multiprocessing
import os
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from sandbox.bench.harness import (
    HANDLERS,
    LAYER_PYTHON,
    ChangeMaker,
    Meter,
    cpu_ms_per_event,
    diff,
    failures_told,
    import_ms,
    import_python,
    metered,
    moto_transactions_copy_once,
    simulated,
    visits_now,
)
from sandbox.bench.moto_process import ProcessAws
from sandbox.bench.peers import (
    AmoApiPeer,
    BitrixLoopPeer,
    FastBitrixPeer,
    InProcessSession,
    Visit,
    virtualise_fast_bitrix24,
)
from sandbox.bench.simclock import (
    BENCH_INSTANT,
    LATENCY,
    ClockedApp,
    SimClock,
    leaky_bucket_floor_seconds,
    pinned_wall_clock,
    sliding_window_floor_seconds,
)

POLL_INTERVAL = 60.0  # template.yaml PollSchedule default: rate(1 minute)
PEER_EVERY = 5  # peers sync every 5 minutes: one peer cycle per 5 of our poll cycles

# AWS list prices (USD, eu-central-1 where it differs little from us-east-1; on-demand DynamoDB).
LAMBDA_GB_S = 0.0000166667
LAMBDA_REQUEST = 0.20 / 1e6
SQS_REQUEST = 0.50 / 1e6  # FIFO; standard queues are 0.40
DDB_WRU = 0.625 / 1e6
DDB_RRU = 0.125 / 1e6
LAMBDA_GB = 0.5  # MemorySize: 512 in template.yaml
# Backfill syncer invocations traced for peak memory: none. tracemalloc slows a traced invocation ~3.5
# times, so its CPU cannot count, and the first (the one worth tracing) carries 4,337 of the 5k import's
# appointments: the CPU per event of the rest came from the small last invocation, which pays more fixed
# cost per appointment. The scale run (`make bench-scale`) traces and reports the syncer's peak memory.
TRACED_INVOCATIONS = 0
CHANGES_PER_APPOINTMENT = 3  # booked → confirmed/arrived → completed: MIS changes an appointment makes


@dataclass
class Sizes:
    patients: int = 3000
    appointments: int = 5000
    day_changes: int = 600
    day_cycles: int = 30  # our poll cycles the day's changes arrive in (20 a minute: the busy half-hours)
    loop_sample: int = 10  # the per-record peers run on 1/loop_sample of the backfill, scaled back linearly
    webhooks: int = 1000
    webhook_seconds: float = 10.0
    unsubscribe_samples: int = 6
    import_runs: int = 3  # best of n imports per handler
    crms: tuple[str, ...] = ("bitrix24", "amocrm")
    parallel: bool = True  # each CRM's run in its own process
    wall_clock: str | None = BENCH_INSTANT  # where each CRM's process pins its wall clock; None: the real one


class InvalidRun(RuntimeError):
    """A contestant's run did not finish or left its CRM incomplete: the bench stops, with no figure."""


@dataclass
class Figure:
    crm: str
    contestant: str
    workload: str
    requests: float
    appointments: int
    floor_requests: float
    sim_seconds: float
    floor_seconds: float
    refused: float
    scaled: int = 1  # measured on 1/scaled of the workload, multiplied back
    note: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "crm": self.crm,
            "contestant": self.contestant,
            "workload": self.workload,
            "crm_requests": round(self.requests, 1),
            "appointments": self.appointments,
            "requests_per_appointment": round(self.requests / self.appointments, 4) if self.appointments else None,
            "floor_requests": self.floor_requests,
            "ratio_to_floor": round(self.requests / self.floor_requests, 3) if self.floor_requests else None,
            "sim_seconds_at_rate_limit": round(self.sim_seconds, 1),
            "floor_seconds": round(self.floor_seconds, 1),
            "time_ratio_to_floor": round(self.sim_seconds / self.floor_seconds, 3) if self.floor_seconds else None,
            "refused_503_429": round(self.refused),
            "scaled_from_sample": self.scaled,
            "note": self.note,
        }


def _floor_seconds(crm: str, requests: float) -> float:
    n = math.ceil(requests)
    return leaky_bucket_floor_seconds(n) if crm == "bitrix24" else sliding_window_floor_seconds(n)


def backfill_floor(crm: str, contacts: int, deals: int, crm_contacts_before: int = 0) -> int:
    """The fewest requests a from-scratch import needs: every write at 50 per ``batch``/bulk request,
    plus the one look-up that adoption needs (every new patient's phone against the CRM).

    Bitrix24: contacts and deals in batches of 50 commands; phones 20 per ``crm.duplicate.findbycomm``
    command, 50 commands per batch. amoCRM: a new patient and its first visit are one ``leads/complex``
    item (50 per request), other visits bulk-created 50 per request; the CRM's existing contacts are
    read once, 250 per page (one request even for an empty CRM)."""
    if crm == "bitrix24":
        return math.ceil((contacts + deals) / 50) + math.ceil(math.ceil(contacts / 20) / 50)
    return (
        math.ceil(contacts / 50)
        + math.ceil(max(0, deals - contacts) / 50)
        + max(1, math.ceil(crm_contacts_before / 250))
    )


def change_floor(new_patients: int, writes: int) -> int:
    """One cycle of changes: the writes at 50 per request, plus one phone look-up if a patient is new."""
    return math.ceil(writes / 50) + (1 if new_patients else 0)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The handlers log JSON per invocation; the bench prints its table instead."""
    from clinicsync.observability import logger

    sink = io.StringIO()
    level = logger.log_level
    logger.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        try:
            yield
        finally:
            logger.setLevel(level)


def seeded_clinic(crm: str, patients: int, appointments: int, name: str, aws: Any, clock: SimClock) -> tuple[Any, Any]:
    """The sample clinic seeded at this size on ``aws``, its CRM emulator at the real limits on ``clock``:
    the clinic and what ``simulated`` wired (its ``crm`` app counts the requests)."""
    from sandbox.local import start_local_clinic

    with simulated(clock) as wired, _quiet():
        clinic = start_local_clinic(
            patients=patients,
            appointments=appointments,
            crm=crm,
            rate_limit=True,
            clinic_id=f"{name}-{crm}",
            aws=aws,
        )
    return clinic, wired


@dataclass
class CrmRun:
    crm: str
    figures: list[Figure] = field(default_factory=list)
    ours: dict[str, Any] = field(default_factory=dict)


def _segment(clock: SimClock, app: ClockedApp, step: Callable[[], Any]) -> tuple[Any, float, int, int]:
    """Run one step; return its result, simulated seconds, CRM requests and refusals."""
    t0, before, refused = clock.now(), Counter(app.statuses), app.refused
    result = step()
    spent = app.statuses - before
    return result, clock.now() - t0, sum(spent.values()), app.refused - refused


@dataclass
class Backfill:
    """clinicsync's first import of the seeded clinic, checked against its CRM."""

    figure: Figure
    visits: list[Visit]  # the eligible visits, as the MIS showed them before the import
    summary: Any
    cost: dict[str, Any]  # the meter's difference over the import
    peak_bytes: int  # the meter's peak traced memory so far
    without_visits: dict[str, Any]
    wall_seconds: float


def measure_backfill(crm: str, clinic: Any, app: ClockedApp, clock: SimClock, meter: Meter) -> Backfill:
    """Run clinicsync's backfill on its own clock phase, check every deal against the CRM
    (:class:`InvalidRun` if one is missing or doubled), and price it against the floor: the one
    measurement of our import that ``make bench`` and the scale curve both report."""
    visits = visits_now(clinic.medods)
    clock.next_phase()
    snap = meter.snapshot()
    started = time.perf_counter()
    summary, secs, reqs, refused = _segment(clock, app, clinic.backfill)
    wall = time.perf_counter() - started
    poll = summary.poll if isinstance(summary.poll, dict) else {}
    if poll.get("stopped_early"):  # the local runtime's Lambda deadline is wall time: a slow machine hits it
        raise InvalidRun(
            f"{crm}: clinicsync's backfill poll stopped at the poller's deadline after {poll.get('pages')} pages; "
            "the import is incomplete, no figure"
        )
    try:
        _check_deals("clinicsync", crm, clinic.crm, visits)
    except InvalidRun as exc:  # say why: what the DLQ holds, and which patients lack their deals
        told = [str(exc), _missing_told(clinic.crm, visits), failures_told(clinic, meter.failed_messages)]
        raise InvalidRun("; ".join(filter(None, told))) from None
    cost = diff(meter.snapshot(), snap)
    # One floor per workload, the same for every contestant: the eligible visits and their patients.
    visit_patients = {str(v.client["id"]) for v in visits}
    floor = backfill_floor(crm, len(visit_patients), len(visits))
    # Patients become contacts even with no eligible visit in the window; the floor (and every
    # peer) counts only patients with visits, so those creates are stated beside the ratio.
    extra = len(set(clinic.crm.contacts_by_origin()) - visit_patients)
    extra_floor = floor + math.ceil(extra / 50)
    with_extra = {
        "contacts": extra,
        "floor_with_them": extra_floor,
        "ratio_to_that_floor": round(reqs / extra_floor, 3),
        "time_ratio_to_that_floor": round(secs / _floor_seconds(crm, extra_floor), 3),
    }
    note = (
        f"also created {extra} contacts of patients with no eligible visit, outside the floor's workload; "
        f"counting them the floor is {extra_floor} and the ratio {with_extra['ratio_to_that_floor']:.2f}"
        if extra
        else ""
    )
    figure = Figure(
        crm, "clinicsync", "backfill", reqs, len(visits), floor, secs, _floor_seconds(crm, floor), refused, note=note
    )
    return Backfill(figure, visits, summary, cost, meter.peak_bytes, with_extra, wall)


def run_crm(crm: str, sizes: Sizes, clock: SimClock, log: Callable[[str], None], verbose: bool = False) -> CrmRun:
    from sandbox.local import _amocrm_account, _bitrix24_portal

    out = CrmRun(crm)
    phase_started = time.perf_counter()

    def log_phase(line: str) -> None:
        log(f"{line} [{time.perf_counter() - phase_started:.0f} s wall]")

    aws = ProcessAws().start()
    clinic, wired = seeded_clinic(crm, sizes.patients, sizes.appointments, "bench", aws, clock)
    try:
        app = wired.crm
        with metered(clinic.stack) as meter, simulated(clock), _quiet():
            meter.trace_left = TRACED_INVOCATIONS
            meter.progress = log if verbose else None
            backfill = measure_backfill(crm, clinic, app, clock, meter)
            meter.progress = None
            meter.trace_left = 0
            backfill_visits, backfill_cost, summary = backfill.visits, backfill.cost, backfill.summary
            stats = clinic.crm.stats()
            out.ours["backfill_contacts_without_visits"] = backfill.without_visits
            out.figures.append(backfill.figure)
            log_phase(
                f"{crm}: clinicsync backfill {backfill.figure.requests:.0f} requests "
                f"(floor {backfill.figure.floor_requests:.0f}), {backfill.figure.sim_seconds:.0f} s simulated, "
                f"{backfill.figure.refused:.0f} refused"
            )

            # The incremental feed's first poll: its cursor starts where the backfill's window ended.
            clock.advance(POLL_INTERVAL)
            clinic.sync()
            # A poll with no changes.
            clock.advance(POLL_INTERVAL)
            _, secs, reqs, refused = _segment(clock, app, clinic.sync)
            out.figures.append(Figure(crm, "clinicsync", "empty poll", reqs, 0, 0, secs, 0.0, refused))

            # A single known appointment whose status changed.
            maker = ChangeMaker(clinic)
            clock.advance(POLL_INTERVAL)
            single = maker.status_move()
            single_visits = visits_now(clinic.medods, [single])
            _, secs, reqs, refused = _segment(clock, app, clinic.sync)
            out.figures.append(
                Figure(crm, "clinicsync", "single change", reqs, 1, 1, secs, _floor_seconds(crm, 1), refused)
            )

            # One steady-state day: the changes arrive over day_cycles polls.
            per_cycle = max(1, sizes.day_changes // sizes.day_cycles)
            cycles: list[list[Visit]] = []
            day_requests = day_refused = 0
            day_secs = day_floor = day_floor_secs = 0.0
            processing: list[float] = []
            snap = meter.snapshot()
            for _ in range(sizes.day_cycles):
                clock.advance(POLL_INTERVAL)
                new_before = maker.new_patients
                changed = maker.cycle(per_cycle)
                cycles.append(visits_now(clinic.medods, changed))
                started = time.perf_counter()
                _, secs, reqs, refused = _segment(clock, app, clinic.sync)
                processing.append(time.perf_counter() - started)
                day_requests += reqs
                day_refused += refused
                day_secs += secs
                floor = change_floor(maker.new_patients - new_before, len(changed) + maker.new_patients - new_before)
                day_floor += floor
                day_floor_secs += _floor_seconds(crm, floor)
            day_cost = diff(meter.snapshot(), snap)
            day_appts = sum(len(c) for c in cycles)
            out.figures.append(
                Figure(
                    crm,
                    "clinicsync",
                    "steady day",
                    day_requests,
                    day_appts,
                    day_floor,
                    day_secs,
                    day_floor_secs,
                    day_refused,
                )
            )
            empty = _empty_poll_cost(clinic, meter)
            mismatched = len(clinic.mismatches())
            if mismatched:
                raise InvalidRun(f"{crm}: clinicsync's CRM differs from the MIS after the day ({mismatched} records)")
        log_phase(f"{crm}: clinicsync day {day_requests} requests (floor {day_floor:.0f}); CRM mismatches {mismatched}")

        # Unsubscribe → CRM flag, queues served concurrently as on AWS (wall clock: it is a latency).
        unsubscribe = _unsubscribe_latencies(clinic, sizes.unsubscribe_samples, clock)
        burst = _burst(clinic, sizes) if crm == "bitrix24" else None
        log_phase(f"{crm}: unsubscribe and burst done")
        out.ours |= {
            "backfill_summary": {
                "crm_requests": summary.crm_requests,
                "throttled": summary.throttled,
                "poll": summary.poll,
            },
            "crm_mismatches_after_day": mismatched,
            "cpu_ms_per_event": {
                "backfill": cpu_ms_per_event(backfill_cost),
                "steady_day": cpu_ms_per_event(day_cost),
                "backfill_in_aws_sdk": cpu_ms_per_event(backfill_cost, sdk=True),
                "steady_day_in_aws_sdk": cpu_ms_per_event(day_cost, sdk=True),
                "aws_calls_per_event_backfill": round(
                    sum(
                        v
                        for k, v in backfill_cost["aws"].items()
                        if k.count(".") == 1 and k.split(".")[1][:1].isupper()
                    )
                    / max(1, len(backfill_visits)),
                    2,
                ),
            },
            "syncer_peak_mib": round(backfill.peak_bytes / 2**20, 1) if meter.traced else None,
            "mis_to_crm_seconds": _latency(processing),
            "unsubscribe_to_crm_seconds": unsubscribe,
            "webhook_burst": burst,
            "aws_cost_per_10k_appointments_month": _cost(day_cost, day_appts, empty),
            "emulator_stats": {k: stats.get(k) for k in ("requests", "writes", "throttled")},
        }
    finally:
        with _quiet():
            clinic.close()
        aws.stop()

    # --- the peers, replaying the same MIS changes against fresh emulators on the same clock --------------
    with simulated(clock) as wired, _quiet():
        portal = _bitrix24_portal(True) if crm == "bitrix24" else _amocrm_account(True)
    try:
        config = clinic.config
        if crm == "bitrix24":
            webhook = portal.secret["webhook_url"]
            undo = virtualise_fast_bitrix24(clock)
            try:
                fb = FastBitrixPeer(webhook, config, client=InProcessSession(wired.crm, clock))
                out.figures += _peer_runs(
                    crm, "fast_bitrix24", fb.sync, wired.crm, clock, backfill_visits, single_visits, cycles, 1,
                    view=portal.view, note=fb.note,
                )  # fmt: skip
            finally:
                undo()
            log_phase(f"{crm}: fast_bitrix24 done")
            with simulated(clock) as wired2, _quiet():
                portal2 = _bitrix24_portal(True)
            loop = BitrixLoopPeer(portal2.secret["webhook_url"], config, clock)
            try:
                out.figures += _peer_runs(
                    crm,
                    "per-record loop",
                    loop.sync,
                    wired2.crm,
                    clock,
                    backfill_visits,
                    single_visits,
                    cycles,
                    sizes.loop_sample,
                    view=portal2.view,
                )
            finally:
                loop.close()
                portal2.server.stop()
        else:
            fields = {k: int(v) for k, v in config.fields.crm_names.items() if str(v).isdigit()}
            with _amocrm_api(portal):
                peer = AmoApiPeer(config, clock, fields)
                out.figures += _peer_runs(
                    crm,
                    "amocrm-api",
                    peer.sync,
                    wired.crm,
                    clock,
                    backfill_visits,
                    single_visits,
                    cycles,
                    sizes.loop_sample,
                    view=portal.view,
                )
        log_phase(f"{crm}: peers done")
    finally:
        portal.server.stop()
    return out


def _check_deals(contestant: str, crm: str, view: Any, visits: Sequence[Visit]) -> str:
    """A backfill counts only if it wrote every visit's deal exactly once; otherwise the bench stops."""
    by_origin = view.deals_by_origin()
    wanted = {str(v.appointment["id"]) for v in visits}
    missing = len(wanted - set(by_origin))
    doubled = sum(1 for origin, n in by_origin.items() if origin in wanted and n > 1)
    if missing or doubled:
        raise InvalidRun(
            f"{crm}: {contestant}'s backfill is invalid: {missing} of {len(wanted)} deals missing, "
            f"{doubled} written twice; no figure comes from such a run"
        )
    return f"CRM checked: all {len(wanted)} deals, none twice"


def _missing_told(view: Any, visits: Sequence[Visit], shown: int = 5) -> str:
    """The first few missing deals by MIS appointment and patient id (ids only), to trace their messages."""
    by_origin = view.deals_by_origin()
    missing = sorted(
        {(int(v.client["id"]), int(v.appointment["id"])) for v in visits if str(v.appointment["id"]) not in by_origin}
    )
    patients = sorted({pid for pid, _ in missing})
    if not missing:
        return ""
    pairs = ", ".join(f"{aid} of patient {pid}" for pid, aid in missing[:shown])
    return f"{len(patients)} patients lack deals; first missing appointments: {pairs}"


def _peer_runs(
    crm: str,
    name: str,
    sync: Callable[[Sequence[Visit]], None],
    app: ClockedApp,
    clock: SimClock,
    backfill: list[Visit],
    single: list[Visit],
    cycles: list[list[Visit]],
    sample: int,
    view: Any,
    note: str = "",
) -> list[Figure]:
    """Every run must finish (a peer that gives up stops the bench: :class:`InvalidRun`), and the
    backfill must leave every deal of the (sampled) workload in the peer's CRM exactly once."""
    figures = []
    real_sync = sync

    def sync(visits: Sequence[Visit]) -> None:
        try:
            real_sync(visits)
        except Exception as exc:
            raise InvalidRun(f"{crm}: {name}'s run failed ({type(exc).__name__}: {exc}); no figure") from exc

    part = backfill
    sampled = f"measured on {{}} of {len(backfill)} appointments, scaled ×{{:.2f}}"
    if sample > 1:  # whole patients, every sample-th one
        patients = sorted({int(v.client["id"]) for v in backfill})[::sample]
        keep = set(patients)
        part = [v for v in backfill if int(v.client["id"]) in keep]
    scale = len(backfill) / len(part) if part else 1.0
    clock.next_phase()
    with _quiet():
        _, secs, reqs, refused = _segment(clock, app, lambda: sync(part))
    checked = _check_deals(name, crm, view, part)
    floor = backfill_floor(crm, len({v.client["id"] for v in backfill}), len(backfill))  # the whole workload's
    figures.append(
        Figure(
            crm, name, "backfill", reqs * scale, len(backfill), floor, secs * scale,
            _floor_seconds(crm, floor), refused * scale, sample,
            "; ".join(filter(None, [sampled.format(len(part), scale) if sample > 1 else "", checked, note])),
        )
    )  # fmt: skip
    figures.append(Figure(crm, name, "empty poll", 0, 0, 0, 0.0, 0.0, 0, note="nothing changed: nothing sent"))
    clock.advance(300)
    _, secs, reqs, refused = _segment(clock, app, lambda: sync(single))
    figures.append(Figure(crm, name, "single change", reqs, 1, 1, secs, _floor_seconds(crm, 1), refused))
    total = refused_total = 0
    total_secs = floor_total = floor_secs = 0.0
    appts = 0
    for start in range(0, len(cycles), PEER_EVERY):
        window = [v for c in cycles[start : start + PEER_EVERY] for v in c]
        latest = {int(v.appointment["id"]): v for v in window}  # one peer cycle sees each visit once
        clock.advance(300)
        batch = list(latest.values())
        _, secs, reqs, refused = _segment(clock, app, functools.partial(sync, batch))
        total += reqs
        refused_total += refused
        total_secs += secs
        appts += len(window)
    for c in cycles:
        floor_total += change_floor(0, len(c))
        floor_secs += _floor_seconds(crm, change_floor(0, len(c)))
    figures.append(
        Figure(crm, name, "steady day", total, appts, floor_total, total_secs, floor_secs, refused_total,
               note=f"syncs every {PEER_EVERY} min: MIS→CRM latency up to {PEER_EVERY} min")
    )  # fmt: skip
    return figures


@contextlib.contextmanager
def _amocrm_api(portal: Any) -> Iterator[None]:
    """Point the amocrm-api library (hard-wired to https://<subdomain>.amocrm.ru) at the emulator."""
    import requests
    from amocrm.v2 import interaction, tokens
    from requests.adapters import HTTPAdapter

    amo = portal.amocrm
    origin = f"https://{amo.subdomain}.amocrm.ru"
    target = portal.server.base_url

    class Loopback(HTTPAdapter):
        def send(self, request: requests.PreparedRequest, *args: Any, **kwargs: Any) -> requests.Response:
            assert request.url is not None
            request.url = target + request.url[len(origin) :]
            return super().send(request, *args, **kwargs)

    session = interaction._session
    session.mount(origin + "/", Loopback())
    manager = tokens.default_token_manager
    storage = tokens.MemoryTokensStorage()
    saved = manager._storage
    manager._storage = storage
    manager(
        client_id=amo.client_id,
        client_secret=amo.client_secret,
        subdomain=amo.subdomain,
        redirect_url=amo.redirect_uri,
        storage=storage,
    )
    pair = amo.issue_tokens()
    storage.save_tokens(pair["access_token"], pair["refresh_token"])
    try:
        yield
    finally:
        session.adapters.pop(origin + "/", None)
        manager._storage = saved


def _empty_poll_cost(clinic: Any, meter: Meter) -> dict[str, Any]:
    snap = meter.snapshot()
    clinic.sync()
    return diff(meter.snapshot(), snap)


def _percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else 0.0


def _latency(processing: list[float]) -> dict[str, Any]:
    """A change waits for the next poll (uniform over the interval), then is polled and synced: p95 of
    that sum over every measured processing time and 20 evenly spread arrival offsets."""
    offsets = [POLL_INTERVAL * (i + 0.5) / 20 for i in range(20)]
    combined = [o + p for o in offsets for p in processing]
    return {
        "poll_interval": POLL_INTERVAL,
        "processing_p50": round(statistics.median(processing), 2) if processing else None,
        "processing_p95": round(_percentile(processing, 0.95), 2),
        "p95": round(_percentile(combined, 0.95), 2),
        "target": POLL_INTERVAL + 5,
    }


def _unsubscribe_latencies(clinic: Any, samples: int, clock: SimClock) -> dict[str, Any]:
    rows = [str(c["id"]) for c in clinic.medods.all_clients()][: samples * 20]
    candidates = [pid for pid in rows if clinic.crm.contact_of_patient(pid) is not None]
    seconds = []
    with simulated(clock), _quiet():
        for pid in candidates:
            if len(seconds) >= samples:
                break
            with contextlib.suppress(LookupError):
                seconds.append(clinic.unsubscribe_to_crm_seconds(pid, timeout=60))
    return {
        "samples": len(seconds),
        "p50": round(statistics.median(seconds), 2) if seconds else None,
        "p95": round(_percentile(seconds, 0.95), 2) if seconds else None,
        "target": 60,
    }


def _burst(clinic: Any, sizes: Sizes) -> dict[str, Any]:
    from sandbox.load import webhook_burst

    with _quiet():
        report = webhook_burst(clinic, events=sizes.webhooks, seconds=sizes.webhook_seconds)
    return {
        "sent": report.sent,
        "acknowledged": report.acknowledged,
        "queued": report.queued,
        "lost": report.lost,
        "none_lost": report.lost == 0 and report.acknowledged == report.sent,
        "ack_p50_ms": report.ack_p50_ms,
        "ack_p99_ms": report.ack_p99_ms,
    }


def _cost(day: dict[str, Any], changes: int, empty: dict[str, Any]) -> dict[str, Any]:
    """USD a month for a clinic with 10,000 appointments a month, from counted calls: every appointment
    makes CHANGES_PER_APPOINTMENT MIS changes (cost per change measured on the steady day), plus a poll
    every minute all month (the empty poll's measured cost). Lambda duration is the local runtime's wall
    time, which includes the emulators' own time: an upper bound."""

    def usd(cost: dict[str, Any], times: float) -> dict[str, float]:
        aws: Counter[str] = cost["aws"]
        seconds = sum(cost["seconds"].values())
        invocations = sum(cost["invocations"].values())
        sqs_requests = sum(v for k, v in aws.items() if k.startswith("sqs.") and k.count(".") == 1)
        sqs_requests += invocations  # the event source mapping's receive and delete per batch
        wru = sum(v for k, v in aws.items() if k in ("dynamodb.PutItem", "dynamodb.UpdateItem", "dynamodb.DeleteItem"))
        wru += aws["dynamodb.items_written"] + 2 * aws["dynamodb.items_transacted"]
        rru = aws["dynamodb.GetItem"] + aws["dynamodb.Query"] + aws["dynamodb.items_read"]
        return {
            "lambda": times * (seconds * LAMBDA_GB * LAMBDA_GB_S + invocations * LAMBDA_REQUEST),
            "sqs": times * sqs_requests * SQS_REQUEST,
            "dynamodb": times * (wru * DDB_WRU + rru * DDB_RRU),
        }

    per_change = usd(day, CHANGES_PER_APPOINTMENT * 10_000 / max(1, changes))
    polls = usd(empty, 30 * 24 * 60)
    total = {k: per_change[k] + polls[k] for k in per_change}
    return {
        "assumptions": f"{CHANGES_PER_APPOINTMENT} MIS changes per appointment; a poll every minute; list prices",
        "changes_usd": {k: round(v, 3) for k, v in per_change.items()},
        "polls_usd": {k: round(v, 3) for k, v in polls.items()},
        "total_usd": round(sum(total.values()), 2),
    }


def _log_to_stderr(line: str) -> None:
    print(line, file=sys.__stderr__, flush=True)


def _run_crm_alone(crm: str, sizes: Sizes, verbose: bool) -> CrmRun:
    """One CRM's contestants in a process of their own, on their own simulated clock."""
    with moto_transactions_copy_once(), pinned_wall_clock(sizes.wall_clock):
        return run_crm(crm, sizes, SimClock(), _log_to_stderr, verbose)


SIMULATED = ("crm_requests", "sim_seconds_at_rate_limit", "refused_503_429", "floor_requests", "appointments")


def simulated_figures(figures: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The figures that come from the simulated clock and the seeded workload alone: identical on every
    run of a commit (CPU, imports, memory and wall-clock latencies are not, and are left out)."""
    return {f"{f['crm']} / {f['contestant']} / {f['workload']}": {k: f[k] for k in SIMULATED} for f in figures}


def differences(first: dict[str, dict[str, Any]], second: dict[str, dict[str, Any]]) -> list[str]:
    """Each simulated figure that is not the same in both runs, said as ``name key: first → second``."""
    out = []
    for name in sorted(first.keys() | second.keys()):
        a, b = first.get(name, {}), second.get(name, {})
        out += [f"{name} {k}: {a.get(k)} → {b.get(k)}" for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]
    return out


def _run_crms(sizes: Sizes, log: Callable[[str], None], verbose: bool) -> list[CrmRun]:
    # str hashes are salted per process unless PYTHONHASHSEED is set, and set iteration order with
    # them: the spawned processes below take this fixed seed, so every run orders its sets alike.
    os.environ["PYTHONHASHSEED"] = "0"
    if sizes.parallel and len(sizes.crms) > 1:
        # The CRMs' runs share nothing (each has its own clinic, emulators, moto and clock), so they
        # run side by side, one process each: the two cores halve the bench's wall time.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(len(sizes.crms), mp_context=context) as pool:
            futures = [pool.submit(_run_crm_alone, crm, sizes, verbose) for crm in sizes.crms]
            return [f.result() for f in futures]
    with moto_transactions_copy_once(), pinned_wall_clock(sizes.wall_clock):
        clock = SimClock()
        return [run_crm(crm, sizes, clock, log, verbose) for crm in sizes.crms]


def run(sizes: Sizes, log: Callable[[str], None] = print, verbose: bool = False, twice: bool = False) -> dict[str, Any]:
    """One run of every contestant; with ``twice``, a second one, and the simulated figures compared
    (``report["determinism"]``): they must be identical, or the bench proves nothing."""
    started = time.perf_counter()
    runs = _run_crms(sizes, log, verbose)
    figures = [f.as_dict() for r in runs for f in r.figures]
    determinism = None
    if twice:
        again = [f.as_dict() for r in _run_crms(sizes, log, verbose) for f in r.figures]
        diffs = differences(simulated_figures(figures), simulated_figures(again))
        determinism = {"runs": 2, "identical": not diffs, "differences": diffs}
    imports = {h: import_ms(h, sizes.import_runs) for h in HANDLERS}
    interpreter = import_python()
    return {
        "sizes": sizes.__dict__ | {"crms": list(sizes.crms)},
        "clock": {"kind": "simulated, shared by all contestants of a CRM", "latency_per_request_s": LATENCY},
        "wall_clock": sizes.wall_clock,  # where each run's wall clock was pinned (None: the real one)
        "figures": figures,
        "determinism": determinism,
        "ours": {r.crm: r.ours for r in runs},
        "handler_import_ms": {h: t.ms for h, t in imports.items()},
        "handler_import_by_package_ms": {h: t.by_package_ms for h, t in imports.items()},
        "handler_import_interpreter": "layer requirements only (.venv-layer)"
        if interpreter == LAYER_PYTHON
        else "dev venv (no .venv-layer: overstates httpx, which imports the CLI's rich when present)",
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
