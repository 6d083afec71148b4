"""The bench's simulated clock and harness: fast_bitrix24's coroutines wait in it side by side, so their waits
overlap; the same commit gives the same simulated figures; a contestant's incomplete run gives none."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import datetime
from decimal import Decimal
from typing import Any

import pytest
import time_machine
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.aws.budget import _decimal
from sandbox.bench.peers import InProcessSession, Visit, virtualise_fast_bitrix24
from sandbox.bench.run import InvalidRun, _check_deals, differences, simulated_figures
from sandbox.bench.simclock import (
    BENCH_INSTANT,
    GRAIN,
    PHASE,
    ClockedApp,
    SimClock,
    deterministic_start,
    pinned_wall_clock,
)
from sandbox.emulators.bitrix24 import Bitrix24Emulator
from sandbox.seed import build_sample_clinic


def test_concurrent_backoffs_overlap_in_simulated_time() -> None:
    import fast_bitrix24.srh as srh

    clock = SimClock(start=1000.0)
    undo = virtualise_fast_bitrix24(clock)
    try:

        async def fifty_backoffs() -> None:
            await asyncio.gather(*(srh.sleep(10.0) for _ in range(50)))
            await srh.sleep(2.5)  # after them, one more wait: it does add

        asyncio.get_event_loop().run_until_complete(fifty_backoffs())
    finally:
        undo()
    assert clock.now() == 1012.5  # 50 concurrent 10 s waits take 10 s, not 500 s


def test_concurrent_waits_wake_in_the_order_of_their_deadlines_at_their_own_time() -> None:
    """fast_bitrix24's throttler and back-off wait side by side; a short wait started after a long one
    must not be held until the long one ends (it sends its request at its own slot)."""
    clock = SimClock(start=1000.0)
    woke: list[tuple[str, float]] = []
    undo = virtualise_fast_bitrix24(clock)
    try:

        async def wait(name: str, seconds: float) -> None:
            await asyncio.sleep(seconds)
            woke.append((name, clock.now()))

        async def both() -> None:
            await asyncio.gather(wait("long", 0.5), wait("short", 0.2))

        asyncio.get_event_loop().run_until_complete(both())
    finally:
        undo()
    assert woke == [("short", 1000.2), ("long", 1000.5)]


# --- the same commit gives the same simulated figures -------------------------------------------------


@given(
    wall_a=st.floats(min_value=1.7e9, max_value=2.1e9),
    wall_b=st.floats(min_value=1.7e9, max_value=2.1e9),
    steps=st.lists(st.floats(min_value=0.0, max_value=600.0), min_size=1, max_size=40),
)
def test_simulated_time_rounds_alike_whatever_the_moment_the_bench_starts(
    wall_a: float, wall_b: float, steps: list[float]
) -> None:
    """The shared budget stores its times in DynamoDB to the microsecond: from a start with digits below
    that, the rounding (and so every slot, wait and 503 decided to the last bit) changed with the
    moment the bench was started. From a start on the grain it is the same in every run."""
    a, b = SimClock(start=deterministic_start(wall_a)), SimClock(start=deterministic_start(wall_b))
    assert a.started > wall_a and b.started > wall_b
    for step in steps:
        a.sleep(step)
        b.sleep(step)
        assert a.elapsed() == b.elapsed()
        assert float(_decimal(a.now()) - Decimal(a.started)) == float(_decimal(b.now()) - Decimal(b.started))


@given(first=st.floats(min_value=0.0, max_value=PHASE - 1), second=st.floats(min_value=0.0, max_value=PHASE - 1))
def test_each_contestant_starts_where_no_wall_timed_phase_before_it_can_move_it(first: float, second: float) -> None:
    """The webhook burst and the unsubscribe latency run on the wall clock and move the simulated one
    by however long they took: the next contestant starts on the next phase boundary regardless."""
    a, b = SimClock(start=GRAIN), SimClock(start=GRAIN)
    a.advance(first)
    b.advance(second)
    assert a.next_phase() == b.next_phase() == GRAIN + PHASE


def _fast_bitrix24_import(contacts: int) -> tuple[int, int, int, float, int]:
    """fast_bitrix24, as its users run it (its own pool, pacing and retries), on a rate-limited portal."""
    from fast_bitrix24 import Bitrix

    clock = SimClock(start=GRAIN)
    portal = Bitrix24Emulator(webhook_secret="bench", clock=clock, rate_limit=True)
    app = ClockedApp(portal, clock)
    undo = virtualise_fast_bitrix24(clock)
    try:
        bitrix = Bitrix(portal.webhook_url("http://bench.invalid"), verbose=False, client=InProcessSession(app, clock))
        bitrix.call("crm.contact.add", [{"fields": {"NAME": "N", "ORIGIN_ID": str(i)}} for i in range(contacts)])
    finally:
        undo()
    origins = Counter(str(c.get("ORIGIN_ID")) for c in portal.contacts.values())
    return len(origins), max(origins.values()), app.requests, clock.elapsed(), app.statuses[503]


def test_fast_bitrix24_runs_to_the_end_on_the_simulated_clock_and_twice_alike() -> None:
    """Past the portal's bucket of 50 the library meets 503s and retries them itself; over real sockets
    that order was the OS's and once ended in "All attempts to get data from server exhausted"."""
    contacts = 60 * 50  # 60 batches: more than the bucket holds
    first = _fast_bitrix24_import(contacts)
    distinct, most, requests, seconds, refused = first
    assert (distinct, most) == (contacts, 1)  # every record once, nothing missing
    assert requests == 60 + refused  # each 503 is counted and retried by the library
    assert seconds > (60 - 50) / 2.0  # paced by the portal's drain, in simulated time
    assert _fast_bitrix24_import(contacts) == first


def _figure(contestant: str, requests: float, cpu: float) -> dict[str, Any]:
    return {
        "crm": "bitrix24",
        "contestant": contestant,
        "workload": "backfill",
        "crm_requests": requests,
        "sim_seconds_at_rate_limit": 44.0,
        "refused_503_429": 0,
        "floor_requests": 132,
        "appointments": 4670,
        "cpu_ms": cpu,
    }


def test_the_second_run_is_compared_on_simulated_figures_only() -> None:
    first = simulated_figures([_figure("clinicsync", 160, 9.9), _figure("fast_bitrix24", 182, 1.0)])
    same = simulated_figures([_figure("clinicsync", 160, 12.3), _figure("fast_bitrix24", 182, 2.0)])
    other = simulated_figures([_figure("clinicsync", 160, 9.9), _figure("fast_bitrix24", 181, 1.0)])
    assert differences(first, same) == []
    assert differences(first, other) == ["bitrix24 / fast_bitrix24 / backfill crm_requests: 182 → 181"]
    assert differences(first, {}) != []


def test_a_backfill_with_a_deal_missing_or_written_twice_gives_no_figure() -> None:
    visits = [Visit({"id": 1}, {"id": a}) for a in (10, 11, 12)]

    class View:
        def __init__(self, deals: dict[str, int]) -> None:
            self.deals = Counter(deals)

        def deals_by_origin(self) -> Counter[str]:
            return self.deals

    assert "all 3 deals" in _check_deals("peer", "bitrix24", View({"10": 1, "11": 1, "12": 1, "99": 2}), visits)
    with pytest.raises(InvalidRun, match="1 of 3 deals missing"):
        _check_deals("peer", "bitrix24", View({"10": 1, "11": 1}), visits)
    with pytest.raises(InvalidRun, match="1 written twice"):
        _check_deals("peer", "bitrix24", View({"10": 1, "11": 2, "12": 1}), visits)


def _bench_start_seen_on(day: str, pinned: str | None) -> tuple[Any, float]:
    """What a bench process started on ``day`` (the machine's real date) seeds and where its simulated clock
    starts, with the wall clock pinned at ``pinned`` (None: the real one)."""
    with time_machine.travel(datetime.fromisoformat(day), tick=False), pinned_wall_clock(pinned):
        clinic = build_sample_clinic(patients=40, appointments=60)
        return tuple((a.id, a.start, a.status) for a in clinic.appointments), SimClock().started


def test_a_pinned_wall_clock_gives_every_day_the_same_seeded_clinic_and_clock() -> None:
    """The seed is built relative to today in Moscow and the simulated clock starts after the wall clock:
    pinned, a run on any day (and either side of a Moscow midnight) seeds and starts as the recorded one."""
    days = ("2026-12-07T10:46:00+00:00", "2026-12-07T21:30:00+00:00", "2027-05-19T03:00:00+00:00")
    pinned = {_bench_start_seen_on(day, BENCH_INSTANT) for day in days}
    assert len(pinned) == 1
    real = {_bench_start_seen_on(day, None) for day in days}
    assert len(real) == len(days)  # the real clock's seed and start move with the day: what the pin removes
