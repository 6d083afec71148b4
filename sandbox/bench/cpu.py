"""``python -m sandbox.bench.cpu --crm bitrix24 [--appointments 5000] [--profile out.txt]``: our CPU per
event alone, cheaply: clinicsync's backfill and steady day on one CRM (the same steps, clock and meter as
``make bench``'s, without the peers, burst, latencies and imports), about a minute a run.

``--profile`` samples the stack of the thread running a handler every millisecond and weights each sample
by that thread's own CPU time since the last one (``pthread_getcpuclockid``), so the emulators' threads and
the moto process never count, as in the bench's figure. The profile lists self and inclusive CPU per
function and per area (``--phase``: the backfill, the day, or both). A sample lands where the thread lets
go of the interpreter lock, so self times pile up on socket calls: read the inclusive shares. (cProfile
is no help here: since Python 3.12 it also records threads started while it runs, i.e. the emulators'
per-request threads.) The day's AWS calls are counted by the clinicsync function that made them, and
httpx's requests (MIS, CRM) by their CPU on our thread."""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType
from typing import Any

from sandbox.bench.harness import ChangeMaker, cpu_ms_per_event, diff, metered, simulated
from sandbox.bench.moto_process import ProcessAws
from sandbox.bench.run import POLL_INTERVAL, Sizes, _quiet, measure_backfill, seeded_clinic
from sandbox.bench.scale import seeded
from sandbox.bench.simclock import BENCH_INSTANT, SimClock, pinned_wall_clock


class Sampler:
    """CPU-weighted stack samples of whichever thread is inside a metered invocation."""

    def __init__(self, interval: float = 0.001) -> None:
        self.interval = interval
        self.self_cpu: defaultdict[str, float] = defaultdict(float)
        self.incl_cpu: defaultdict[str, float] = defaultdict(float)
        self.file_cpu: defaultdict[str, float] = defaultdict(float)
        self.total = 0.0
        self.enabled = True  # off: invocations run unsampled (e.g. only the day is profiled)
        self._target: int | None = None
        self._clock: int | None = None
        self._last = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @contextmanager
    def watching(self) -> Iterator[None]:
        """Samples the calling thread while inside."""
        if not self.enabled:
            yield
            return
        self._target = threading.get_ident()
        self._clock = time.pthread_getcpuclockid(self._target)
        self._last = time.clock_gettime(self._clock)
        try:
            yield
        finally:
            self._take()
            self._target = None

    def _take(self) -> None:
        target, clock = self._target, self._clock
        if target is None or clock is None:
            return
        frame = sys._current_frames().get(target)
        now = time.clock_gettime(clock)
        spent, self._last = now - self._last, now
        if frame is None or spent <= 0:
            return
        self.total += spent
        seen: set[str] = set()
        files: set[str] = set()
        first = True
        f: FrameType | None = frame
        while f is not None:
            code = f.f_code
            name = f"{_short(code.co_filename)}:{code.co_firstlineno}({code.co_name})"
            if first:
                self.self_cpu[name] += spent
                first = False
            if name not in seen:
                seen.add(name)
                self.incl_cpu[name] += spent
            where = _area(code.co_filename)
            if where not in files:
                files.add(where)
                self.file_cpu[where] += spent
            f = f.f_back
        return

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._take()

    def start(self) -> Sampler:
        # The sampler runs only when the sampled thread lets go of the GIL: at its I/O, or when the
        # switch interval (5 ms by default) runs out. A short one keeps samples off the I/O calls.
        sys.setswitchinterval(self.interval / 5)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def report(self, top: int = 60) -> str:
        lines = [f"sampled CPU {self.total:.2f} s"]
        parts = (("by area (inclusive)", self.file_cpu), ("self", self.self_cpu), ("inclusive", self.incl_cpu))
        for title, counter in parts:
            lines.append(f"--- {title}")
            for name, secs in sorted(counter.items(), key=lambda kv: -kv[1])[:top]:
                lines.append(f"{100 * secs / max(self.total, 1e-9):6.1f}%  {secs:7.3f} s  {name}")
        return "\n".join(lines)


def _short(path: str) -> str:
    for marker in ("site-packages/", "layers/shared/", "lib/python3.13/", "/sandbox/"):
        if marker in path:
            return path.split(marker, 1)[1]
    return path


def _area(path: str) -> str:
    """A coarse owner of a frame: our package's module group, or a library's top-level package."""
    short = _short(path)
    if short.startswith("clinicsync/"):
        return "/".join(short.split("/")[:3])
    if "site-packages/" in path:
        return "lib:" + short.split("/")[0]
    return "stdlib:" + short.split("/")[0]


@contextmanager
def _http_cpu(spent: defaultdict[str, float], calls: Counter[str]) -> Iterator[None]:
    """Our thread's CPU inside httpx's ``Client.send`` (the MIS's and the CRM's requests), by path head."""
    import httpx

    real = httpx.Client.send

    def send(client: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        started = time.thread_time()
        try:
            return real(client, request, **kwargs)
        finally:
            path = request.url.path
            kind = "crm" if "/api/v2/" not in path else "medods " + path.split("/api/v2/", 1)[1].split("/")[0]
            kind += "/{id}" if kind.startswith("medods") and path.rstrip("/").count("/") > 3 else ""
            spent[kind] += time.thread_time() - started
            calls[kind] += 1

    setattr(httpx.Client, "send", send)  # noqa: B010
    try:
        yield
    finally:
        setattr(httpx.Client, "send", real)  # noqa: B010


@contextmanager
def _callers(where: Counter[str]) -> Iterator[None]:
    """Each AWS call of our code counted by operation and the clinicsync function that made it."""
    import botocore.client

    real = getattr(botocore.client.BaseClient, "_make_api_call")  # noqa: B009 (private, untyped)

    def call(client: Any, operation: str, params: dict[str, Any]) -> Any:
        frame: FrameType | None = sys._getframe(1)
        while frame is not None and "clinicsync/" not in frame.f_code.co_filename.replace("\\", "/"):
            frame = frame.f_back
        if frame is not None:
            code = frame.f_code
            where[f"{operation} <- {_short(code.co_filename)}:{code.co_name}"] += 1
        return real(client, operation, params)

    setattr(botocore.client.BaseClient, "_make_api_call", call)  # noqa: B010
    try:
        yield
    finally:
        setattr(botocore.client.BaseClient, "_make_api_call", real)  # noqa: B010


def _profiled(stack: Any, sampler: Sampler | None, by_function: dict[str, float]) -> None:
    real = stack.invoke

    def invoke(function_id: str, event: Any) -> Any:
        started = time.thread_time()
        try:
            if sampler is None:
                return real(function_id, event)
            with sampler.watching():
                return real(function_id, event)
        finally:
            by_function[function_id] = by_function.get(function_id, 0.0) + time.thread_time() - started

    stack.invoke = invoke


def run(
    crm: str,
    appointments: int,
    day_cycles: int,
    per_cycle: int,
    sampler: Sampler | None,
    phase: str = "both",
) -> dict[str, Any]:
    patients, appointments = seeded(appointments)
    clock = SimClock()
    aws = ProcessAws().start()
    try:
        clinic, wired = seeded_clinic(crm, patients, appointments, "cpu", aws, clock)
        try:
            app = wired.crm
            by_function: dict[str, float] = {}
            _profiled(clinic.stack, sampler, by_function)  # inside the meter's wrapper: its clock and ours agree
            with metered(clinic.stack) as meter, simulated(clock), _quiet():
                meter.trace_left = 0
                if sampler is not None:
                    sampler.enabled = phase in ("both", "backfill")
                backfill = measure_backfill(crm, clinic, app, clock, meter)
                if sampler is not None:
                    sampler.enabled = False
                clock.advance(POLL_INTERVAL)
                clinic.sync()
                clock.advance(POLL_INTERVAL)
                clinic.sync()
                maker = ChangeMaker(clinic)
                by_function.clear()
                if sampler is not None:
                    sampler.enabled = phase in ("both", "day")
                snap = meter.snapshot()
                callers: Counter[str] = Counter()
                http_spent: defaultdict[str, float] = defaultdict(float)
                http_calls: Counter[str] = Counter()
                crm_before, refused_before = sum(app.statuses.values()), app.refused
                day_sim_seconds = 0.0  # at the CRM's limits, as the bench's day figure counts it
                with _callers(callers), _http_cpu(http_spent, http_calls):
                    for _ in range(day_cycles):
                        clock.advance(POLL_INTERVAL)
                        maker.cycle(per_cycle)
                        started = clock.now()
                        clinic.sync()
                        day_sim_seconds += clock.now() - started
                day = diff(meter.snapshot(), snap)
                day_crm = sum(app.statuses.values()) - crm_before
                day_refused = app.refused - refused_before
                mismatched = len(clinic.mismatches())
        finally:
            with _quiet():
                clinic.close()
    finally:
        aws.stop()
    return {
        "crm": crm,
        "appointments": appointments,
        "backfill_ms": cpu_ms_per_event(backfill.cost),
        "backfill_sdk_ms": cpu_ms_per_event(backfill.cost, sdk=True),
        "day_ms": cpu_ms_per_event(day),
        "day_sdk_ms": cpu_ms_per_event(day, sdk=True),
        "backfill_events": backfill.cost["events"],
        "day_events": day["events"],
        "backfill_crm_requests": backfill.figure.requests,
        "day_crm_requests": day_crm,
        "backfill_sim_seconds": round(backfill.figure.sim_seconds, 3),
        "day_sim_seconds": round(day_sim_seconds, 3),
        "refused": backfill.figure.refused + day_refused,
        "backfill_aws": _calls(backfill.cost),
        "day_aws": _calls(day),
        "day_cpu_seconds_by_function": {k: round(v, 3) for k, v in by_function.items()},
        "day_aws_callers": dict(callers.most_common()),
        "day_aws_calls": sum(callers.values()),
        "day_http_cpu_ms_per_call": {k: round(1000 * v / http_calls[k], 3) for k, v in http_spent.items()},
        "day_http_calls": dict(http_calls),
        "mismatches": mismatched,
        "invocations": dict(backfill.cost["invocations"] + day["invocations"]),
    }


def _calls(cost: dict[str, Any]) -> dict[str, int]:
    return dict(sorted(cost["aws"].items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sandbox.bench.cpu")
    parser.add_argument("--crm", choices=("bitrix24", "amocrm"), default="bitrix24")
    parser.add_argument("--appointments", type=int, default=5000)
    parser.add_argument("--day-cycles", type=int, default=Sizes().day_cycles)
    parser.add_argument("--per-cycle", type=int, default=Sizes().day_changes // Sizes().day_cycles)
    parser.add_argument("--profile", help="write a CPU profile of our thread here")
    parser.add_argument("--phase", choices=("both", "backfill", "day"), default="both", help="what --profile samples")
    parser.add_argument("--json", help="append the figures as one JSON line here")
    parser.add_argument("--at", default=BENCH_INSTANT, help="pin the wall clock here (ISO 8601 with offset), or 'now'")
    args = parser.parse_args(argv)
    sampler = Sampler().start() if args.profile else None
    started = time.perf_counter()
    try:
        with pinned_wall_clock(None if args.at == "now" else args.at):
            out = run(args.crm, args.appointments, args.day_cycles, args.per_cycle, sampler, args.phase)
    finally:
        if sampler is not None:
            sampler.stop()
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["profiled"] = sampler is not None
    print(json.dumps(out, indent=1))
    if args.json:
        with Path(args.json).open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(out) + "\n")
    if sampler is not None:
        Path(args.profile).write_text(sampler.report(), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
