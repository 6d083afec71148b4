"""One simulated clock shared by every contestant, so "time at the rate limit" is exact and free.

The CRM emulators take their time from a :class:`~sandbox.emulators.base.Clock`; here it is frozen and
moves only when someone waits: a client's pacer or back-off sleeps advance it, and every HTTP request
to the emulator takes a fixed network latency (``latency``) of simulated time. The emulators enforce
their real limits (Bitrix24: leaky bucket of 50 draining at 2/s, 503 beyond; amoCRM: 7 requests in
any second, 429 beyond, blocked after five 429s) against that clock, so a contestant that sends too
fast is refused exactly as a real portal would refuse it, and no benchmark second is spent sleeping.

Waiting is "until" rather than "for": concurrent waiters (fast_bitrix24's coroutines) that each sleep
until a slot move the clock to the latest of their slots, not to the sum of their sleeps.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime
from typing import Any

import time_machine

from sandbox.emulators.base import Clock

LATENCY = 0.05  # seconds of simulated network + server time per CRM request (same region, small bodies)
GRAIN = 2.0**16  # the clock starts on a multiple of this (about 18 h): see :func:`deterministic_start`
PHASE = 2.0**15  # each contestant starts on a multiple of this after the start: see SimClock.next_phase


# The wall clock every bench run starts at: the instant the run recorded in docs/bench began (Moscow 13:46).
BENCH_INSTANT = "2026-12-07T13:46:00+03:00"


@contextlib.contextmanager
def pinned_wall_clock(at: str | None) -> Iterator[None]:
    """This process's wall clock (``time.time``, ``datetime.now``...) set to ``at`` and ticking on from there;
    ``None`` leaves the real clock. The seeded clinic is built relative to today in Moscow and the product
    reads its windows (the poller's, eligibility) from the wall clock, so on the real clock the simulated
    figures moved from one day to the next; pinned, a run on any day repeats the recorded one. Monotonic and
    CPU clocks stay real (the wall-time and CPU figures), and so does every other process (moto's, which
    only ever compares times we send it or its own)."""
    if at is None:
        yield
        return
    moment = datetime.fromisoformat(at)
    if moment.tzinfo is None:
        raise ValueError(f"a pinned wall clock needs a UTC offset: {at!r}")
    with time_machine.travel(moment, tick=True):
        yield


def deterministic_start(wall: float | None = None) -> float:
    """The first multiple of ``GRAIN`` seconds after the wall clock. Not the wall clock itself: the
    shared budget stores its times in DynamoDB to the microsecond, so from a start with digits below
    that, its rounding (and every slot and 503 decided by it) changed with the moment the bench was
    started. A whole start rounds alike in every run, and the CRMs' clocks stay within hours of the
    MIS's (timestamps on both sides keep making sense)."""
    wall = time.time() if wall is None else wall
    return (wall // GRAIN + 1) * GRAIN


class SimClock(Clock):
    """A frozen clock that only moves forward, by waits and by request latency."""

    def __init__(self, start: float | None = None) -> None:
        super().__init__()
        self._now = deterministic_start() if start is None else start
        self._mutex = threading.Lock()
        self.started = self._now

    def now(self) -> float:
        with self._mutex:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._mutex:
            self._now += max(0.0, seconds)

    def advance_to(self, at: float) -> None:
        with self._mutex:
            self._now = max(self._now, at)

    def freeze(self, at: float | None = None) -> None:  # already frozen; kept for the Clock interface
        if at is not None:
            self.advance_to(at)

    def unfreeze(self) -> None:
        pass

    def sleep(self, seconds: float) -> None:
        """A blocking wait in simulated time: returns at once, the clock is at least ``now + seconds``."""
        self.advance_to(self.now() + max(0.0, seconds))

    def monotonic(self) -> float:
        return self.now()

    def elapsed(self) -> float:
        return self.now() - self.started

    def next_phase(self) -> float:
        """Move to the next multiple of ``PHASE`` after the start, and return it. Each contestant
        starts there, so its figures do not depend on how far the phases before it (some of them
        timed on the wall clock: the webhook burst, the unsubscribe latency) moved the clock."""
        with self._mutex:
            self._now = self.started + ((self._now - self.started) // PHASE + 1) * PHASE
            return self._now


class ClockedApp:
    """WSGI wrapper: each request takes ``latency`` of simulated time; counts requests and refusals."""

    def __init__(self, app: Any, clock: SimClock, latency: float = LATENCY) -> None:
        self.app = app
        self.clock = clock
        self.latency = latency
        self.statuses: Counter[int] = Counter()
        self.paths: Counter[str] = Counter()
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        return self.handle(environ, start_response, self.latency)

    def handle(self, environ: dict[str, Any], start_response: Callable[..., Any], latency: float) -> Iterable[bytes]:
        """Serve one request; ``latency`` 0 for a caller that waits the latency itself (see
        :class:`sandbox.bench.peers.InProcessSession`: concurrent requests' latencies overlap)."""
        started = self.clock.now()
        seen: list[int] = []
        self.paths[environ.get("PATH_INFO", "")] += 1

        def recording_start(status: str, headers: Any, exc_info: Any = None) -> Any:
            seen.append(int(status.split(" ", 1)[0]))
            return start_response(status, headers, exc_info) if exc_info else start_response(status, headers)

        body = list(self.app(environ, recording_start))
        self.clock.advance_to(started + latency)
        with self._lock:
            self.statuses.update(seen)
        return body

    def __getattr__(self, name: str) -> Any:
        return getattr(self.app, name)

    @property
    def requests(self) -> int:
        return sum(self.statuses.values())

    @property
    def refused(self) -> int:
        return self.statuses[503] + self.statuses[429] + self.statuses[403]


def leaky_bucket_floor_seconds(requests: int, rate: float = 2.0, burst: int = 50, latency: float = LATENCY) -> float:
    """The least time ``requests`` sequential requests take under a leaky bucket (Bitrix24): a perfect
    client sends while the bucket has room and waits exactly for the next drained slot otherwise."""
    now, level = 0.0, 0.0
    for _ in range(requests):
        if level + 1 > burst:
            wait = (level + 1 - burst) / rate
            now += wait
            level -= wait * rate
        level += 1
        now += latency
        level = max(0.0, level - latency * rate)
    return now


def sliding_window_floor_seconds(
    requests: int, per_window: int = 7, window: float = 1.0, latency: float = LATENCY
) -> float:
    """The least time under "at most ``per_window`` requests in any ``window`` seconds" (amoCRM)."""
    sent: list[float] = []
    now = 0.0
    for _ in range(requests):
        if len(sent) >= per_window:
            now = max(now, sent[-per_window] + window)
        sent.append(now)
        now += latency
    return now
