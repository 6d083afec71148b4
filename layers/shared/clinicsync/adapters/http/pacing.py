"""In-process request pacing shared by the CRM clients (Bitrix24, amoCRM, vTiger).

:class:`Pacer` is a :class:`clinicsync.adapters.aws.budget.RequestPacer`; the DynamoDB bucket that several containers
share is :class:`clinicsync.adapters.aws.budget.SharedLeakyBucket`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class Pacer:
    """Mirrors a CRM's leaky bucket locally: each request adds 1, the level drains at ``rate``/s.

    Requests go out at once while the level is under ``burst`` and are spaced at 1/rate beyond it,
    so a burst of work uses the bucket's headroom and steady state never meets a 503.
    """

    def __init__(
        self,
        rate: float = 2.0,
        burst: int = 40,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._level = 0.0
        self._at = clock()
        self._lock = threading.Lock()

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            self._level = max(0.0, self._level - (now - self._at) * self._rate)
            self._at = now
            excess = self._level + 1 - self._burst
            if excess > 0:
                delay = excess / self._rate
                self._sleep(delay)
                self._level = max(0.0, self._level - delay * self._rate)
                self._at = now + delay
            self._level += 1

    def expect(self, count: int) -> None:
        """Nothing to book ahead: the level is in memory, so each wait() costs no I/O anyway."""

    def penalise(self) -> None:
        """The CRM said it is overloaded (a 503): assume its bucket is full and let it drain before the next call."""
        with self._lock:
            self._level = float(self._burst)
