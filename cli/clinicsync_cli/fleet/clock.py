"""Time for the rollout: a clock the tests drive, and a token bucket that paces control-plane calls.

Bake times, polls and rate limits all go through a ``Clock``; ``ManualClock`` moves only when someone
sleeps on it, so a rollout with a 10-minute bake and 1-per-5-s API deployments runs in milliseconds.
"""

from __future__ import annotations

import threading
import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float: ...

    def sleep_until(self, at: float) -> None: ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def sleep_until(self, at: float) -> None:
        delay = at - time.time()
        if delay > 0:
            time.sleep(delay)


class ManualClock:
    """Time advances to whatever a sleeper waits for; concurrent sleepers never move it backwards."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._now = start
        self._lock = threading.Lock()

    def now(self) -> float:
        with self._lock:
            return self._now

    def sleep_until(self, at: float) -> None:
        with self._lock:
            self._now = max(self._now, at)

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def sleep(clock: Clock, seconds: float) -> None:
    clock.sleep_until(clock.now() + seconds)


class TokenBucket:
    """At most ``burst`` calls at once and ``rate`` per second on average, across threads.

    ``acquire`` reserves the next free slot under a lock and sleeps outside it, so callers are served in
    order and the reserved slots never exceed the rate, whatever the clock.
    """

    def __init__(self, rate: float, burst: int, clock: Clock) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate, self.burst, self._clock = rate, burst, clock
        self._tokens = float(burst)
        self._updated = clock.now()
        self._lock = threading.Lock()
        self.granted: list[float] = []  # when each call was let through (figures for the report)

    def acquire(self) -> float:
        """Wait for a token; returns the time the call may go."""
        with self._lock:
            now = self._clock.now()
            at = max(now, self._updated)
            self._tokens = min(float(self.burst), self._tokens + (at - self._updated) * self.rate)
            self._updated = at
            if self._tokens >= 1:
                self._tokens -= 1
            else:
                wait = (1 - self._tokens) / self.rate
                at += wait
                self._tokens = 0.0
                self._updated = at
            self.granted.append(at)
        self._clock.sleep_until(at)
        return at
