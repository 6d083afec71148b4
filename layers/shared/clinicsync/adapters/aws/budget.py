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
Failure=ALL_OLD``), so an admitted request costs one write uncontended and about two under contention.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
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


@runtime_checkable
class RequestPacer(Protocol):
    """What a CRM client needs from a pacer: block until a request may go out, and back off on a 503."""

    def wait(self) -> None: ...

    def penalise(self) -> None: ...


class BudgetTimeout(Exception):
    """The shared budget is booked further ahead than ``max_wait`` allows (or is too contended).

    Nothing was reserved and nothing was sent: the caller can give up and let the work be retried.
    """


@dataclass(frozen=True)
class _Bucket:
    level: float
    at: float
    version: int


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
        self.dynamodb_calls = 0

    def wait(self) -> None:
        with self._lock:
            delay = self._reserve()
        if delay > 0:
            self._sleep(delay)  # outside the lock: later callers book later slots meanwhile

    def penalise(self) -> None:
        """The portal said 503: record the shared level as full, so every container backs off."""
        with self._lock:
            for _ in range(MAX_CONFLICTS):
                current = self._current()
                level, at = self._drained(current, self._clock())
                if level >= self._burst or self._write(current, float(self._burst), at):
                    return
        raise BudgetTimeout(f"budget {self._key}: too contended to record a 503")

    # --- internals ---------------------------------------------------------------------------------

    def _reserve(self) -> float:
        for _ in range(MAX_CONFLICTS):
            cached = self._known
            current = self._current()
            level, at = self._drained(current, self._clock())
            level += 1
            delay = max(0.0, level - self._burst) / self._rate
            if delay > self._max_wait:
                if cached:  # others only add to the level, but the item may have been reset: look once
                    self._known = False
                    continue
                raise BudgetTimeout(f"budget {self._key}: next slot is {delay:.1f}s away")
            if self._write(current, level, at):
                return delay
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
