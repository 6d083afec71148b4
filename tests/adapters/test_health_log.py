"""The health log on moto: what an invocation's bookkeeping costs, and what ``clinicsync status`` reads back."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mypy_boto3_dynamodb.service_resource import Table

from clinicsync.adapters.aws.health import BUCKET_SECONDS, HealthLog

T0 = datetime(2026, 11, 2, 9, 0, tzinfo=UTC).timestamp()


class Clock:
    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def test_an_invocations_health_record_costs_one_request(template_tables: Callable[[], Table]) -> None:
    table = template_tables()
    calls: list[str] = []
    table.meta.client.meta.events.register("before-call.dynamodb", lambda model, **_: calls.append(model.name))
    log = HealthLog(table, clock=Clock(T0))
    log.record_sync(patients=3, contacts=1, deals=2, crm_requests=2, crm_throttles=0, lag_seconds=4.5)
    log.record_poll(enqueued=3, rejected=0)
    assert calls == ["UpdateItem", "UpdateItem"]
    summary = log.summary(datetime.fromtimestamp(T0, UTC) - timedelta(hours=1))
    assert summary.total("messages") == 1 and summary.total("polls") == 1 and summary.total("patients") == 3
    assert (summary.last_sync_at, summary.last_lag, summary.last_poll_at) == (T0, 4.5, T0)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sync_ago=st.integers(0, 40 * BUCKET_SECONDS),
    poll_ago=st.integers(0, 40 * BUCKET_SECONDS),
    window=st.integers(1, 30),
)
def test_the_last_sync_and_poll_are_the_newest_written_whatever_the_window(
    template_tables: Callable[[], Table], sync_ago: int, poll_ago: int, window: int
) -> None:
    """``last_*`` is the newest figure written, also when it is older than the window the counters cover."""
    table = template_tables()
    clock = Clock(T0)
    log = HealthLog(table, clock=clock)
    for ago, record in sorted([(sync_ago, "sync"), (poll_ago, "poll")], reverse=True):
        for extra in (BUCKET_SECONDS, 0):  # an older figure first: the newer one wins
            clock.at = T0 - ago - extra
            if record == "sync":
                log.record_sync(patients=1, contacts=0, deals=0, crm_requests=0, crm_throttles=0, lag_seconds=extra)
            else:
                log.record_poll(enqueued=1, rejected=0)
    summary = log.summary(datetime.fromtimestamp(T0 - window * BUCKET_SECONDS, UTC))
    assert summary.last_sync_at == T0 - sync_ago and summary.last_lag == 0
    assert summary.last_poll_at == T0 - poll_ago


def test_a_last_item_written_before_the_figures_moved_onto_the_buckets_is_still_read(
    template_tables: Callable[[], Table],
) -> None:
    table = template_tables()
    table.put_item(Item={"pk": "HEALTH", "sk": "LAST", "last_sync_at": int(T0 - 7200), "last_lag": 2})
    log = HealthLog(table, clock=Clock(T0))
    log.record_poll(enqueued=0, rejected=0)
    summary = log.summary(datetime.fromtimestamp(T0 - 3600, UTC))
    assert (summary.last_sync_at, summary.last_lag, summary.last_poll_at) == (T0 - 7200, 2, T0)
