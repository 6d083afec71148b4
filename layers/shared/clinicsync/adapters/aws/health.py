"""The stack's health in its own table: counters per 10-minute bucket, for ``clinicsync status`` and the report.

CloudWatch gets the same figures as metrics (the dashboard); this copy lets the CLI answer "how is this
clinic doing" from one DynamoDB query, against a deployed stack and the local runtime alike.

Items (single table, see docs/storage.md)::

    pk="HEALTH"  sk="B#<YYYY-MM-DDTHH:M0>"   counters ADDed atomically (messages, patients, contacts, deals,
                                              crm_requests, crm_throttles, lag_sum, errors, polls, enqueued,
                                              rejected, unsub_jobs, unsub_latency_sum), expires after 90 days;
                                              last_sync_at, last_lag, last_poll_at SET in the same request
    pk="HEALTH"  sk="LAST"                    last_* as written before they moved onto the buckets (read only)

Counts and seconds only: nothing here names a patient.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import BotoCoreError, ClientError

from clinicsync.observability import logger

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

HEALTH_PK = "HEALTH"
BUCKET_SECONDS = 600
KEEP_SECONDS = 90 * 86400
COUNTERS = (
    "messages",
    "patients",
    "contacts",
    "deals",
    "crm_requests",
    "crm_throttles",
    "lag_sum",
    "errors",
    "polls",
    "enqueued",
    "rejected",
    "unsub_jobs",
    "unsub_latency_sum",
)
LAST = ("last_sync_at", "last_lag", "last_poll_at")  # SET on the bucket beside its counters


def bucket_key(at: float) -> str:
    start = int(at) - int(at) % BUCKET_SECONDS
    return datetime.fromtimestamp(start, UTC).strftime("B#%Y-%m-%dT%H:%M")


def bucket_time(sk: str) -> datetime:
    return datetime.strptime(sk.removeprefix("B#"), "%Y-%m-%dT%H:%M").replace(tzinfo=UTC)


@dataclass
class Bucket:
    start: datetime
    counts: dict[str, float] = field(default_factory=dict)

    def get(self, name: str) -> float:
        return self.counts.get(name, 0.0)


@dataclass
class HealthSummary:
    buckets: list[Bucket]
    last_sync_at: float | None = None
    last_lag: float | None = None
    last_poll_at: float | None = None

    def total(self, name: str, since: datetime | None = None) -> float:
        return sum(b.get(name) for b in self.buckets if since is None or b.start >= since)


def _number(value: float) -> Decimal:
    return Decimal(f"{value:.3f}")


class HealthLog:
    def __init__(self, table: Table, clock: Any = time.time) -> None:
        self._table = table
        self._clock = clock

    def _add(self, counts: Mapping[str, float], last: Mapping[str, float] | None = None) -> None:
        """Best effort: the bookkeeping never fails the work it describes (a message synced stays synced)."""
        try:
            self._write(counts, last)
        except (ClientError, BotoCoreError) as exc:
            logger.warning("health counters not recorded", extra={"error": type(exc).__name__})

    def _write(self, counts: Mapping[str, float], last: Mapping[str, float] | None) -> None:
        """One UpdateItem on the current bucket: the counters ADDed, the ``last_*`` figures SET beside them
        (a LAST item of their own cost every invocation a second request)."""
        now = self._clock()
        values = {k: v for k, v in counts.items() if v}
        if not values and not last:
            return
        names = {f"#c{i}": k for i, k in enumerate(values)} | {f"#l{i}": k for i, k in enumerate(last or {})}
        adds = ", ".join(f"#c{i} :v{i}" for i in range(len(values)))
        sets = ", ".join(["expires_at = :exp", *(f"#l{i} = :l{i}" for i in range(len(last or {})))])
        self._table.update_item(
            Key={"pk": HEALTH_PK, "sk": bucket_key(now)},
            UpdateExpression=(f"ADD {adds} " if adds else "") + f"SET {sets}",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={
                **{f":v{i}": _number(v) for i, v in enumerate(values.values())},
                **{f":l{i}": _number(v) for i, v in enumerate((last or {}).values())},
                ":exp": int(now) + KEEP_SECONDS,
            },
        )

    def record_sync(
        self, *, patients: int, contacts: int, deals: int, crm_requests: int, crm_throttles: int, lag_seconds: float
    ) -> None:
        """One sync message written: its lag is from the poll that read it to now (the CRM write)."""
        self._add(
            {
                "messages": 1,
                "patients": patients,
                "contacts": contacts,
                "deals": deals,
                "crm_requests": crm_requests,
                "crm_throttles": crm_throttles,
                "lag_sum": max(0.0, lag_seconds),
            },
            {"last_sync_at": self._clock(), "last_lag": max(0.0, lag_seconds)},
        )

    def record_crm_calls(self, crm_requests: int, crm_throttles: int) -> None:
        self._add({"crm_requests": crm_requests, "crm_throttles": crm_throttles})

    def record_error(self) -> None:
        self._add({"errors": 1})

    def record_poll(self, enqueued: int, rejected: int) -> None:
        self._add({"polls": 1, "enqueued": enqueued, "rejected": rejected}, {"last_poll_at": self._clock()})

    def record_unsubscribes(self, latencies: list[float]) -> None:
        """Consent jobs whose outputs are all done: seconds from the opt-out to every system showing it."""
        if latencies:
            self._add({"unsub_jobs": len(latencies), "unsub_latency_sum": sum(max(0.0, x) for x in latencies)})

    def summary(self, since: datetime) -> HealthSummary:
        """The buckets since ``since``; the ``last_*`` figures from the newest bucket holding each, looked
        for before ``since`` too (newest first) and, for a table written before they moved onto the
        buckets, in the old LAST item."""
        buckets: list[Bucket] = []
        last: dict[str, float] = {}
        for item in self._buckets(Key("sk").between(bucket_key(since.timestamp()), "B#~"), forward=True):
            counts = {k: float(v) for k, v in item.items() if k in COUNTERS and isinstance(v, Decimal | int)}
            buckets.append(Bucket(bucket_time(str(item["sk"])), counts))
            _take_last(last, item, newer=True)
        if any(name not in last for name in LAST):
            for item in self._buckets(Key("sk").between("B#", bucket_key(since.timestamp())), forward=False):
                _take_last(last, item, newer=False)
                if all(name in last for name in LAST):
                    break
        if any(name not in last for name in LAST):
            _take_last(last, self._table.get_item(Key={"pk": HEALTH_PK, "sk": "LAST"}).get("Item") or {}, newer=False)
        return HealthSummary(
            sorted(buckets, key=lambda b: b.start),
            last.get("last_sync_at"),
            last.get("last_lag"),
            last.get("last_poll_at"),
        )

    def _buckets(self, condition: Any, forward: bool) -> Iterator[dict[str, Any]]:
        kwargs: dict[str, Any] = {
            "KeyConditionExpression": Key("pk").eq(HEALTH_PK) & condition,
            "ScanIndexForward": forward,
        }
        while True:
            page = self._table.query(**kwargs)
            yield from page.get("Items", [])
            if "LastEvaluatedKey" not in page:
                return
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]


def _take_last(last: dict[str, float], item: Mapping[str, Any], newer: bool) -> None:
    """Note ``item``'s ``last_*`` figures: over what is noted if ``item`` is newer, else only where none is."""
    for name in LAST:
        value = item.get(name)
        if isinstance(value, Decimal | int) and (newer or name not in last):
            last[name] = float(value)


def hours_ago(hours: float, now: datetime | None = None) -> datetime:
    return (now or datetime.now(UTC)) - timedelta(hours=hours)
