"""``python -m sandbox.bench --scale 1000,5000``: the scale curve of clinicsync's first import.

For each size N the sample clinic is seeded with N appointments in the main bench's mix (its patients
per appointment), clinicsync's backfill runs against each CRM at its real limits on a fresh simulated
clock, and :func:`sandbox.bench.run.measure_backfill` (the same code as ``make bench``'s backfill
figure) checks every deal in the CRM and prices the run against the floor. Each (size, CRM) point runs
in a fresh process (clean module caches, a clean peak RSS); a point that fails or leaves the CRM
incomplete stops the run with no report. The report ends with the linearity check: per-appointment
requests, simulated time and wall time, and the syncer's peak memory, largest size against smallest.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import resource
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from sandbox.bench.harness import (
    cpu_ms_per_event,
    failures_told,
    metered,
    moto_transactions_copy_once,
    simulated,
)
from sandbox.bench.moto_process import ProcessAws
from sandbox.bench.run import (
    InvalidRun,
    Sizes,
    _log_to_stderr,
    _quiet,
    differences,
    measure_backfill,
    seeded_clinic,
    simulated_figures,
)
from sandbox.bench.simclock import BENCH_INSTANT, SimClock, pinned_wall_clock

SCALE_SIZES = (1_000, 5_000)  # make bench-scale; make bench-scale-50k runs 50_000 alone
# The 1st, 11th, 21st... syncer invocation is traced: the peak covers the end of a large import too (a
# cache that grows with the clinic would show there), and even a small import keeps untraced invocations
# for the CPU per event (tracemalloc slows the traced ones several times over).
TRACE_EVERY = 10
# Per-appointment cost that moves less than this between the smallest and the largest size is called
# linear; memory per invocation is called bounded if the peak moves less than MEMORY_BOUNDED.
LINEAR_WITHIN = 1.15
MEMORY_BOUNDED = 1.5


def batch_commands(crm_app: Any) -> dict[str, int]:
    """The commands the CRM emulator has run inside ``batch`` requests so far, by method (Bitrix24's
    counter; an emulator without one gives none)."""
    stats = getattr(crm_app, "stats", None)
    return dict(stats().get("batch_commands", {})) if callable(stats) else {}


def seeded(appointments: int) -> tuple[int, int]:
    """Patients and appointments for a clinic of ``appointments``: the main bench's mix."""
    base = Sizes()
    return round(appointments * base.patients / base.appointments), appointments


def run_point(
    crm: str, appointments: int, verbose: bool = False, wall_clock: str | None = BENCH_INSTANT
) -> dict[str, Any]:
    """One size on one CRM, from an empty CRM and table: seed, backfill, check, price. The wall clock is
    pinned at ``wall_clock`` (:func:`~sandbox.bench.simclock.pinned_wall_clock`), so the point is the same
    on any day."""
    patients, appointments = seeded(appointments)
    started = time.perf_counter()
    with moto_transactions_copy_once(), pinned_wall_clock(wall_clock):
        clock = SimClock()
        aws = ProcessAws().start()
        try:
            clinic, wired = seeded_clinic(crm, patients, appointments, "scale", aws, clock)
            seeding = time.perf_counter() - started
            try:
                with metered(clinic.stack) as meter, simulated(clock), _quiet():
                    meter.trace_every = TRACE_EVERY
                    meter.progress = _log_to_stderr if verbose else None
                    commands_before = batch_commands(wired.crm.app)
                    backfill = measure_backfill(crm, clinic, wired.crm, clock, meter)
                    commands = Counter(batch_commands(wired.crm.app))
                    commands.subtract(commands_before)
                    contacts = len(clinic.crm.contacts_by_origin())
                failed = backfill.summary.drain.get("failed", 0)
                told = failures_told(clinic, meter.failed_messages) if failed else ""  # why they failed
            finally:
                with _quiet():
                    clinic.close()
        finally:
            aws.stop()
    if failed:
        # Nothing fails on a healthy CRM at its limits, and a retried message's repeated requests would
        # make the figure depend on when it came back.
        raise InvalidRun(
            f"{crm} {appointments:,}: {failed} syncer messages failed and were retried during the backfill"
            f"{'; ' + told if told else ''}; the figure would depend on the machine: no figure"
        )
    figure = backfill.figure
    figure.workload = f"backfill, {appointments:,} appointments seeded"
    return {
        "crm": crm,
        "seeded_appointments": appointments,
        "seeded_patients": patients,
        "figure": figure.as_dict(),
        "contacts_without_visits": backfill.without_visits["contacts"],
        "contacts_in_crm": contacts,
        # Bitrix24: the import's commands by method, all of its requests being ``batch`` (amoCRM: none).
        "crm_batch_commands": {method: n for method, n in sorted(commands.items()) if n},
        "syncer_invocations": backfill.cost["invocations"]["StageSyncerFunction"],
        "syncer_peak_mib": round(backfill.peak_bytes / 2**20, 1),
        "syncer_invocations_traced": meter.traced,
        "cpu_ms_per_event": cpu_ms_per_event(backfill.cost),
        "backfill_wall_seconds": round(backfill.wall_seconds, 1),
        "wall_seconds_by_function": {k: round(v, 1) for k, v in sorted(backfill.cost["seconds"].items())},
        "poll": backfill.summary.poll,
        "drain": backfill.summary.drain,
        "seeding_wall_seconds": round(seeding, 1),
        # ru_maxrss is KiB on Linux; the point's whole process: our code, the emulators and the MIS data.
        "process_max_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }


def _points(
    sizes: Sequence[int],
    crms: Sequence[str],
    parallel: bool,
    log: Callable[[str], None],
    verbose: bool,
    wall_clock: str | None,
) -> list[dict[str, Any]]:
    wanted = [(n, crm) for n in sizes for crm in crms]
    if not parallel:
        return [_logged(run_point(crm, n, verbose, wall_clock), log) for n, crm in wanted]
    # The spawned points take PYTHONHASHSEED=0, so every run orders its sets alike (as make bench's do);
    # one process per point (max_tasks_per_child=1), the CRMs of a size side by side on the two cores.
    os.environ["PYTHONHASHSEED"] = "0"
    context = multiprocessing.get_context("spawn")
    out = []
    with concurrent.futures.ProcessPoolExecutor(len(crms), mp_context=context, max_tasks_per_child=1) as pool:
        futures = [pool.submit(run_point, crm, n, verbose, wall_clock) for n, crm in wanted]
        for future in futures:
            out.append(_logged(future.result(), log))
    return out


def _logged(point: dict[str, Any], log: Callable[[str], None]) -> dict[str, Any]:
    f = point["figure"]
    log(
        f"{point['crm']} {point['seeded_appointments']:,}: {f['crm_requests']:.0f} requests "
        f"({f['ratio_to_floor']}× floor), {f['sim_seconds_at_rate_limit']:.0f} s simulated "
        f"({f['time_ratio_to_floor']}× floor time), {f['refused_503_429']} refused, "
        f"syncer peak {point['syncer_peak_mib']} MiB, {point['backfill_wall_seconds']} s wall"
    )
    return point


def _per_appointment(point: dict[str, Any]) -> dict[str, float | None]:
    """The costs that stay flat when the whole grows linearly. Time is taken against the floor time, not
    per appointment: Bitrix24's bucket lets the first 50 requests through at once, so even the floor's
    time is not proportional to its requests at small sizes."""
    f = point["figure"]
    appts = max(1, f["appointments"])
    return {
        "requests_per_appointment": f["crm_requests"] / appts,
        "requests_x_floor": f["ratio_to_floor"],
        "time_x_floor_time": f["time_ratio_to_floor"],
        "cpu_ms_per_event": point["cpu_ms_per_event"],
        "wall_ms_per_appointment": 1000 * point["backfill_wall_seconds"] / appts,
        "syncer_peak_mib": point["syncer_peak_mib"],
    }


def linearity(points: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per CRM: each size's cost per eligible appointment (and against the floor), and the largest
    size's against the smallest (1.0 is exactly linear; for memory, flat). Wall time is the shared
    machine's, so its ratio is the least exact; CPU is our code's thread time."""
    out: dict[str, Any] = {}
    for crm in dict.fromkeys(p["crm"] for p in points):
        mine = sorted((p for p in points if p["crm"] == crm), key=lambda p: p["seeded_appointments"])
        rows = [
            {"seeded_appointments": p["seeded_appointments"], "eligible_appointments": p["figure"]["appointments"]}
            | {k: None if v is None else round(v, 4) for k, v in _per_appointment(p).items()}
            for p in mine
        ]
        small, large = _per_appointment(mine[0]), _per_appointment(mine[-1])
        ratios = {k: _ratio(large[k], v) for k, v in small.items()}
        verdicts = {
            k: _verdict(v, MEMORY_BOUNDED if k == "syncer_peak_mib" else LINEAR_WITHIN, k == "syncer_peak_mib")
            for k, v in ratios.items()
        }
        name = f"{mine[-1]['seeded_appointments']:,}/{mine[0]['seeded_appointments']:,}"
        out[crm] = {"by_size": rows, "ratio": name, "ratios": ratios, "verdicts": verdicts}
    return out


def _ratio(large: float | None, small: float | None) -> float | None:
    return round(large / small, 3) if large is not None and small else None


def _verdict(ratio: float | None, within: float, memory: bool) -> str:
    if ratio is None:
        return "not measured"
    if memory:
        return "bounded" if ratio <= within else f"grows with the clinic (×{ratio})"
    if ratio <= within:
        return "linear" if ratio >= 1 / within else f"sub-linear (×{ratio} per appointment)"
    return f"super-linear (×{ratio} per appointment)"


def run_scale(
    sizes: Sequence[int],
    crms: Sequence[str],
    log: Callable[[str], None] = print,
    parallel: bool = True,
    twice: bool = False,
    verbose: bool = False,
    wall_clock: str | None = BENCH_INSTANT,
) -> dict[str, Any]:
    """Every (size, CRM) point; with ``twice`` all of them again, and the simulated figures compared."""
    started = time.perf_counter()
    points = _points(sizes, crms, parallel, log, verbose, wall_clock)
    determinism = None
    if twice:
        again = _points(sizes, crms, parallel, log, verbose, wall_clock)
        diffs = differences(
            simulated_figures([p["figure"] for p in points]), simulated_figures([p["figure"] for p in again])
        )
        determinism = {"runs": 2, "identical": not diffs, "differences": diffs}
    return {
        "kind": "scale curve: clinicsync's backfill from an empty CRM, one fresh process per size and CRM",
        "sizes": list(sizes),
        "crms": list(crms),
        "wall_clock": wall_clock,
        "patients_per_appointment": Sizes().patients / Sizes().appointments,
        "syncer_memory": (
            f"tracemalloc peak of the 1st, {TRACE_EVERY + 1}th, {2 * TRACE_EVERY + 1}st... syncer invocation; "
            "CPU per event (our code's thread CPU, not the emulators' or moto's) over the others"
        ),
        "points": points,
        "linearity": linearity(points),
        "determinism": determinism,
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
