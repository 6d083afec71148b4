"""A CRM request budget shared by every syncer container: the portal's leaky bucket, kept in DynamoDB.

Bitrix24 counts requests per portal (and source IP) in one leaky bucket: each request adds 1, the level
drains at 2/s, and a request that would take it past 50 gets HTTP 503 ``QUERY_LIMIT_EXCEEDED``. Each
Lambda container pacing itself with its own in-memory :class:`~clinicsync.adapters.http.pacing.Pacer` keeps
*its* traffic under the bucket, but two warm containers together send twice the burst. Here the bucket's
level lives in one DynamoDB item that every container updates with optimistic concurrency.

Item (single table, see docs/storage.md)::

    pk="BUDGET"  sk=<key, e.g. the portal's member id>
    level       Number  bucket level at ``at`` (requests admitted or booked, minus what has drained)
    at          Number  unix time of that level (wall clock: containers share it)
    ver         Number  version, +1 per write; every write is conditional on the version it read
    expires_at  Number  TTL, a week after the last write, so an abandoned key disappears

Admission is a reservation, decided and recorded in one conditional write: the level (drained to now)
plus one is written back; if that is at most ``burst`` the request goes at once, otherwise the caller
sleeps ``excess / rate`` for its booked slot. Reserved slots are spaced at exactly 1/rate, so nobody
has to re-read after sleeping. A container keeps the state of its last write; when another container
wrote since, the conditional write fails and returns the current item (``ReturnValuesOnConditionCheck
Failure=ALL_OLD``), so a booking costs one write uncontended and about two under contention.

A client that knows its next ``n`` requests (a gateway's write batches, a list's pages) says so with
:meth:`SharedLeakyBucket.expect`: the next booking then takes up to ``n`` slots in that one write (level
``+= n``), at exactly the times ``n`` single reservations made at that moment would get, and the
container hands them out locally. A held slot is used only while the booking still accounts for it:
when a request comes late, the slots that have fallen due are more than the part of our booking the
bucket still holds would cover, so the oldest ones are dropped (:meth:`_Booking.take`). A dropped slot
is capacity nobody uses, never a request the bucket did not count.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from boto3.dynamodb.types import TypeDeserializer
from botocore.exceptions import ClientError

from clinicsync.adapters.aws.table import failed_condition

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

BUDGET_PK = "BUDGET"
ITEM_TTL_SECONDS = 7 * 24 * 3600
MAX_CONFLICTS = 100  # lost conditional writes in a row before giving up (each one is someone else's progress)
# Slots one write may book: bounds what a container holds and may drop (5 s of Bitrix24, 1.5 s of amoCRM)
# when its requests are slower than the rate (a real portal's batch can take a second or more).
MAX_BOOKED = 10
ROUNDING = 1e-3  # of a request: times of ~1.8e9 s lose ~1e-7 s to floats, levels are stored to 1e-6


@runtime_checkable
class RequestPacer(Protocol):
    """What a CRM client needs from a pacer: block until a request may go out, and back off on a 503;
    ``expect(n)``: the next ``n`` requests follow one another (a pacer may book them together)."""

    def wait(self) -> None: ...

    def penalise(self) -> None: ...

    def expect(self, count: int) -> None: ...


@contextmanager
def expecting(pacer: RequestPacer, count: int) -> Iterator[None]:
    """Announce ``count`` requests to ``pacer`` for the block; what the block did not send is withdrawn at
    its end, so a step that stopped early leaves no announcement to the next. Blocks do not nest."""
    pacer.expect(count)
    try:
        yield
    finally:
        pacer.expect(0)


class BudgetTimeout(Exception):
    """The shared budget is booked further ahead than ``max_wait`` allows (or is too contended).

    Nothing was reserved and nothing was sent: the caller can give up and let the work be retried.
    """


@dataclass(frozen=True)
class _Bucket:
    level: float
    at: float
    version: int


@dataclass
class _Booking:
    """Slots this container booked in one write and has not used yet.

    ``level`` is what the write recorded at local time ``start``: the bucket before it plus ``count``, the
    later slots counted as if already sent. Draining in order, the part of it that is ours at time ``t`` is
    ``min(count, level - (t - start) × rate)``, less the slots still ahead of ``t``: what our requests
    sent on their slots would hold in the bucket. Slots whose times have passed may still be used while
    they are no more than that: every request then adds to the bucket no more than its slot would have,
    so nobody else's booking can overrun it. Used on time, a slot always passes (at slot k of n the
    part is ``n - k + burst`` less the ``n - k`` slots ahead)."""

    level: float
    start: float
    count: int
    rate: float
    slots: deque[float] = field(default_factory=deque)  # local times, ascending

    def ours(self, at: float) -> float:
        """Our part of the bucket at ``at`` had every slot been used on time."""
        ahead = sum(1 for slot in self.slots if slot > at)
        return min(float(self.count), max(0.0, self.level - (at - self.start) * self.rate)) - ahead

    def take(self, now: float) -> float | None:
        """The time of the next usable held slot (dropping those that came too late), or None."""
        while self.slots:
            at = max(now, self.slots[0])
            due = sum(1 for slot in self.slots if slot <= at)
            if due <= self.ours(at) + ROUNDING:
                return self.slots.popleft()
            self.slots.popleft()
        return None


def _decimal(value: float) -> Decimal:
    # DynamoDB numbers are Decimals; a fixed precision keeps boto3's Inexact/Rounded traps quiet.
    return Decimal(f"{value:.6f}")


def _bucket(item: Mapping[str, Any]) -> _Bucket:
    return _Bucket(level=float(item["level"]), at=float(item["at"]), version=int(item["ver"]))


_deserialize = TypeDeserializer().deserialize


class SharedLeakyBucket:
    """Paces requests so that all holders of ``key`` together stay under one leaky bucket.

    Same interface as :class:`~clinicsync.adapters.http.pacing.Pacer` (both are :class:`RequestPacer`);
    ``rate`` and ``burst`` should sit a little under the portal's own limits (the defaults per CRM are
    ``clinicsync.domain.config.CRM_BUDGETS``) to absorb lateness between booking a slot and the request
    reaching the portal.
    """

    def __init__(
        self,
        table: Table,
        key: str,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_wait: float = 60.0,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self._table = table
        self._key = key
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._sleep = sleep
        self._max_wait = max_wait
        self._lock = threading.Lock()  # threads of one container share the cached state
        self._known = False  # whether _state reflects the table (None then means "no item yet")
        self._state: _Bucket | None = None
        self._booking: _Booking | None = None  # slots booked ahead, not used yet
        self._expected = 0  # requests announced by expect() and not sent yet
        self.dynamodb_calls = 0

    def expect(self, count: int) -> None:
        """The next ``count`` requests follow one another: the next booking takes slots for all of them
        (at most ``MAX_BOOKED``). ``expect(0)`` withdraws what is left of an announcement."""
        with self._lock:
            self._expected = max(0, count)

    def wait(self) -> None:
        with self._lock:
            now = self._clock()
            held = self._booking.take(now) if self._booking is not None else None
            delay = held - now if held is not None else self._reserve(min(max(1, self._expected), MAX_BOOKED))
            self._expected = max(0, self._expected - 1)
        if delay > 0:
            self._sleep(delay)  # outside the lock: later callers book later slots meanwhile

    def penalise(self) -> None:
        """The portal said 503: record the shared level as full, so every container backs off (and drop
        the slots held: they were booked on a level the portal disagrees with)."""
        with self._lock:
            self._booking = None
            for _ in range(MAX_CONFLICTS):
                current = self._current()
                level, at = self._drained(current, self._clock())
                if level >= self._burst or self._write(current, float(self._burst), at):
                    return
        raise BudgetTimeout(f"budget {self._key}: too contended to record a 503")

    # --- internals ---------------------------------------------------------------------------------

    def _reserve(self, count: int) -> float:
        """Books up to ``count`` slots in one write (those within ``max_wait``); returns the first one's
        delay and holds the others in ``_booking``."""
        for _ in range(MAX_CONFLICTS):
            cached = self._known
            current = self._current()
            now = self._clock()
            level, at = self._drained(current, now)
            delays = [max(0.0, level + k - self._burst) / self._rate for k in range(1, count + 1)]
            booked = [delay for delay in delays if delay <= self._max_wait]  # ascending: a prefix
            if not booked:
                if cached:  # others only add to the level, but the item may have been reset: look once
                    self._known = False
                    continue
                raise BudgetTimeout(f"budget {self._key}: next slot is {delays[0]:.1f}s away")
            if self._write(current, level + len(booked), at):
                written = self._state.level if self._state is not None else level + len(booked)
                slots = deque(now + delay for delay in booked[1:])
                self._booking = _Booking(written, now, len(booked), self._rate, slots) if slots else None
                return booked[0]
        raise BudgetTimeout(f"budget {self._key}: too contended")

    def _current(self) -> _Bucket | None:
        if not self._known:
            self.dynamodb_calls += 1
            item = self._table.get_item(Key={"pk": BUDGET_PK, "sk": self._key}, ConsistentRead=True).get("Item")
            self._state = _bucket(item) if item else None
            self._known = True
        return self._state

    def _drained(self, bucket: _Bucket | None, now: float) -> tuple[float, float]:
        """Level at ``now`` and the time to record with it (never earlier than the stored one, so a
        container whose clock lags cannot make the bucket drain twice)."""
        if bucket is None:
            return 0.0, now
        elapsed = max(0.0, now - bucket.at)
        return max(0.0, bucket.level - elapsed * self._rate), max(now, bucket.at)

    def _write(self, previous: _Bucket | None, level: float, at: float) -> bool:
        """Conditional put on the version read; on conflict, adopt the item that won and return False."""
        version = previous.version + 1 if previous else 1
        item: dict[str, Any] = {
            "pk": BUDGET_PK,
            "sk": self._key,
            "level": _decimal(level),
            "at": _decimal(at),
            "ver": version,
            "expires_at": int(at) + ITEM_TTL_SECONDS,
        }
        self.dynamodb_calls += 1
        try:
            if previous is None:
                self._table.put_item(
                    Item=item,
                    ConditionExpression="attribute_not_exists(pk)",
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
            else:
                self._table.put_item(
                    Item=item,
                    ConditionExpression="ver = :v",
                    ExpressionAttributeValues={":v": previous.version},
                    ReturnValuesOnConditionCheckFailure="ALL_OLD",
                )
        except ClientError as exc:
            if not failed_condition(exc):
                raise
            # The error carries the winning item in wire format (the resource layer leaves it raw).
            raw: Mapping[str, Any] | None = exc.response.get("Item")  # type: ignore[assignment]
            self._state = _bucket({k: _deserialize(v) for k, v in raw.items()}) if raw else None
            self._known = True
            return False
        self._state = _bucket(item)
        self._known = True
        return True
