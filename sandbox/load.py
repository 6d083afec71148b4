"""A burst of CRM webhooks against the local HTTP API: is every one acknowledged and queued, and how fast?

Bitrix24 posts one form-encoded event per change and never retries, so a lost acknowledgement is a lost
event. The burst is paced evenly over the window from a pool of senders, as a busy portal would; each
event gets its own deal id so the queue count proves that none was dropped or merged.
"""

from __future__ import annotations

import statistics
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlencode

import httpx

from sandbox.local import LocalClinic


@dataclass
class BurstReport:
    sent: int
    acknowledged: int
    queued: int
    seconds: float
    ack_p50_ms: float
    ack_p99_ms: float
    ack_max_ms: float

    @property
    def lost(self) -> int:
        return self.sent - self.queued


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def webhook_burst(clinic: LocalClinic, events: int = 1000, seconds: float = 10.0, senders: int = 16) -> BurstReport:
    """Post ``events`` Bitrix24 deal-update webhooks within ``seconds``; count acks and queued events."""
    assert clinic.bitrix is not None, "the burst speaks Bitrix24's webhook format"
    url = f"{clinic.api_url}/webhooks/bitrix24"
    auth = {"auth[application_token]": clinic.bitrix.application_token, "auth[member_id]": clinic.bitrix.member_id}
    queued_before = clinic.stack.queue_depth("CrmEventQueue")
    latencies: list[float] = []
    acknowledged = 0
    lock = threading.Lock()
    client = httpx.Client(timeout=30.0, limits=httpx.Limits(max_connections=senders))
    started = time.monotonic()

    def send(n: int) -> None:
        nonlocal acknowledged
        due = started + n * seconds / events
        delay = due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        body = urlencode({"event": "ONCRMDEALUPDATE", "data[FIELDS][ID]": str(900_000 + n), **auth})
        begin = time.perf_counter()
        try:
            response = client.post(url, content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
            ok = response.status_code == 200
        except httpx.HTTPError:
            ok = False
        took = (time.perf_counter() - begin) * 1000
        with lock:
            latencies.append(took)
            acknowledged += ok

    with ThreadPoolExecutor(max_workers=senders) as pool:
        list(pool.map(send, range(events)))
    elapsed = time.monotonic() - started
    client.close()
    queued = clinic.stack.queue_depth("CrmEventQueue") - queued_before
    return BurstReport(
        sent=events,
        acknowledged=acknowledged,
        queued=queued,
        seconds=round(elapsed, 2),
        ack_p50_ms=round(statistics.median(latencies), 1) if latencies else 0.0,
        ack_p99_ms=round(_percentile(latencies, 0.99), 1),
        ack_max_ms=round(max(latencies, default=0.0), 1),
    )
