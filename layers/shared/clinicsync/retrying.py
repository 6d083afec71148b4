"""Retry mechanics (tenacity) that keep the project's classification of failures; no transport here, so
use cases, the AWS adapters and the HTTP clients share them (``adapters.http.retrying`` adds HTTP's rule).

An attempt ends in one of four ways:

* it returns: that is the answer;
* it raises :class:`Transient`: the request never ran (a refused connection, a rate limit) or only
  read, so sending it again is safe; it is retried after the caller's backoff;
* it raises :class:`Replay`: send it again at once (a refreshed access token); it counts as an attempt;
* it raises anything else, which goes to the caller at once. That covers permanent refusals and a
  write whose response was lost ("outcome unknown"): it may have been applied, so it is never resent.

When the attempts run out, the caller's ``exhausted(reason)`` error is raised (``reason``: the last
:class:`Transient`'s).

:func:`poll` is the other loop: ask again until an answer is final (a lease is free, a batch finished),
with a backoff, for as long as the caller's ``stop`` allows.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tenacity import RetryCallState

# tenacity (and the asyncio it imports) loads with the first retried call: the HTTP handlers' routes never
# retry, while the poller's and the syncer's runtime modules import it with the handler (every run retries).


class Transient(Exception):
    """The attempt failed in a way that is safe to repeat; ``reason`` names it without PII."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Replay(Exception):
    """Send the request again now, without a backoff (the client refreshed its access token)."""


def exponential(first: float, cap: float | None = None) -> Callable[[int], float]:
    """The wait after attempt ``n`` (1-based): ``first * 2**(n-1)``, at most ``cap``."""

    def wait(attempt: int) -> float:
        seconds = first * 2.0 ** (attempt - 1)
        return seconds if cap is None else min(cap, seconds)

    return wait


class _Policy:
    """Per call: waits only after a :class:`Transient`, so a :class:`Replay` goes out at once."""

    def __init__(
        self,
        wait: Callable[[int], float],
        sleep: Callable[[float], None],
        exhausted: Callable[[str], Exception],
        wait_after_last: bool,
    ) -> None:
        self._wait = wait
        self._sleep = sleep
        self._exhausted = exhausted
        self._wait_after_last = wait_after_last
        self._replaying = False

    def wait(self, state: RetryCallState) -> float:
        self._replaying = isinstance(_failure(state), Replay)
        return 0.0 if self._replaying else self._wait(state.attempt_number)

    def sleep(self, seconds: float) -> None:
        if not self._replaying:
            self._sleep(seconds)

    def give_up(self, state: RetryCallState) -> None:
        failure = _failure(state)
        if isinstance(failure, Transient) and self._wait_after_last:
            self._sleep(self._wait(state.attempt_number))
        reason = failure.reason if isinstance(failure, Transient) else type(failure).__name__
        raise self._exhausted(reason) from None


def _failure(state: RetryCallState) -> BaseException | None:
    return state.outcome.exception() if state.outcome is not None else None


def call_with_retries[T](
    attempt: Callable[[int], T],
    *,
    attempts: int,
    wait: Callable[[int], float],
    sleep: Callable[[float], None],
    exhausted: Callable[[str], Exception],
    wait_after_last: bool = False,
) -> T:
    """Run ``attempt(n)`` for n = 1, 2, … until it returns, raises a non-retryable error, or
    ``attempts`` are spent. ``wait(n)`` is the pause after a transient failure of attempt n, passed to
    ``sleep`` (the client's injectable sleep). ``wait_after_last`` keeps the pause some clients have
    always made after their last attempt, before giving up."""
    from tenacity import Retrying, retry_if_exception_type, stop_after_attempt

    policy = _Policy(wait, sleep, exhausted, wait_after_last)
    numbers = itertools.count(1)
    retrying = Retrying(
        stop=stop_after_attempt(attempts),
        wait=policy.wait,
        sleep=policy.sleep,
        retry=retry_if_exception_type((Transient, Replay)),
        retry_error_callback=policy.give_up,
    )
    result: T = retrying(lambda: attempt(next(numbers)))
    return result


def poll[T](
    probe: Callable[[], T],
    *,
    until: Callable[[T], bool],
    wait: Callable[[int], float],
    sleep: Callable[[float], None],
    stop: Callable[[float], bool],
) -> T:
    """Call ``probe`` until ``until(answer)``, waiting ``wait(n)`` after the n-th answer that is not.
    After each such answer ``stop(waited)`` (``waited``: the seconds slept so far) may end the poll; the
    last answer is returned either way. An exception from ``probe`` ends the poll at once."""
    from tenacity import Retrying, retry_if_result

    def last_answer(state: RetryCallState) -> T:
        assert state.outcome is not None  # tenacity calls this only after an attempt
        answer: T = state.outcome.result()
        return answer

    retrying = Retrying(
        retry=retry_if_result(lambda answer: not until(answer)),
        wait=lambda state: wait(state.attempt_number),
        sleep=sleep,
        stop=lambda state: stop(state.idle_for),
        retry_error_callback=last_answer,
    )
    answer: T = retrying(probe)
    return answer
