"""Bitrix24 adapter: a paced, retrying REST client and the gateway that translates canonical writes.

The gateway never decides anything: it turns the domain's ContactWrite/DealWrite into
``crm.contact.*``/``crm.deal.*`` commands and packs them into ``batch`` calls of at most 50.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

import httpx

from clinicsync.adapters.aws.budget import BudgetTimeout, RequestPacer, expecting
from clinicsync.adapters.bitrix24.oauth import Bitrix24OAuth
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.domain.crm_ports import CrmPaused, CrmUnavailable
from clinicsync.observability import logger
from clinicsync.retrying import Replay, Transient, call_with_retries, exponential

BATCH_LIMIT = 50
Command = tuple[str, Mapping[str, Any]]  # one `batch` command: the method and its parameters
PAGE_SIZE = 50


def chunks[T](items: Sequence[T], size: int) -> list[Sequence[T]]:
    """``items`` in runs of at most ``size`` (commands per ``batch``, ids per list filter)."""
    return [items[start : start + size] for start in range(0, len(items), size)]


def rows(value: Any) -> list[dict[str, Any]]:
    """A list method's rows (a failed or non-list answer has none)."""
    return [row for row in value if isinstance(row, dict)] if isinstance(value, list) else []


def portal_budget_key(creds: Mapping[str, Any]) -> str:
    """The request-budget key of the clinic's portal (a DynamoDB key, and named in budget errors).

    Bitrix24 limits a portal as a whole, so the key names the portal: its ``member_id``, else its host.
    Never the incoming-webhook URL: its path holds the secret (``/rest/<user>/<secret>/``)."""
    member = str(creds.get("member_id") or "")
    if member:
        return f"bitrix24:{member}"
    url = str(creds.get("webhook_url") or creds.get("client_endpoint") or "")
    return f"bitrix24:{urlsplit(url).hostname or 'portal'}"


class Bitrix24Error(Exception):
    """A permanent error: the request was understood and refused."""

    def __init__(self, code: str, description: str, status: int) -> None:
        super().__init__(f"{status} {code}: {description}")
        self.code = code
        self.description = description
        self.status = status


class Bitrix24Unavailable(CrmUnavailable):
    """Retries are exhausted for a transient condition (limits, 5xx, timeouts)."""


class Bitrix24OutcomeUnknown(Exception):
    """A write was sent but its response was lost: it may or may not have been applied."""


class Bitrix24MethodBlocked(CrmPaused):
    """The portal's operating-time budget blocks this method until ``until``; other methods still work."""

    def __init__(self, method: str, until: float, now: float) -> None:
        super().__init__(f"{method} is blocked by the operating-time limit for {until - now:.0f} s", until)
        self.method = method


# Errors that mean the portal refused the request before running it, so a resend is safe.
NOT_EXECUTED = frozenset({"QUERY_LIMIT_EXCEEDED", "OVERLOAD_LIMIT"})
OPERATING_PAUSE = 60.0  # when the portal does not say when the method's budget resets
# Each method may run 480 s in any 10 minutes (``time.operating``); past that the portal refuses it for
# up to 10 minutes. The client spends a method's time through a bucket that holds OPERATING_BURST and
# refills at OPERATING_RATE, so no 10 minutes ever see more than 240 + 600 x 0.4 = 480 s of it: a large
# first import (50,000 visits are ~2,300 s of crm.deal.add) slows to the budget instead of being refused,
# and a 5,000-visit one (~230 s) stays inside the burst, unslowed.
OPERATING_LIMIT = 480.0
OPERATING_WINDOW = 600.0
OPERATING_BURST = 240.0
OPERATING_RATE = (OPERATING_LIMIT - OPERATING_BURST) / OPERATING_WINDOW
# A call waits for its bucket at most this long (a batch of 50 fast commands waits seconds); a method
# slower than the bucket can pace is sent anyway, and the portal's own refusal pauses it.
OPERATING_MAX_WAIT = 60.0
# A wait for the budget that would run into the last DEADLINE_MARGIN seconds of the invocation is not
# slept: the method is paused instead, so the sync stores what it wrote and its other patients go on,
# and the rest come back with their message. Sleeping on would let Lambda kill the invocation mid-batch.
DEADLINE_MARGIN = 30.0
# Under the operating-time limit Bitrix24 has answered /batch with a text/html page instead of its JSON
# error (fast_bitrix24 issue 216). Such a page is the limit when it names it, or when its status is 429:
# Bitrix24 answers 429 for that limit only.
OPERATING_PAGE_MARKERS = ("operation_time_limit", "operation time limit", "превышает 480 секунд")


def _operating_page(response: httpx.Response) -> bool:
    if response.status_code == 429:
        return True
    text = response.text[:4096].lower()
    return any(marker in text for marker in OPERATING_PAGE_MARKERS)


def _commands_of(method: str, params: Mapping[str, Any] | None) -> dict[str, str]:
    """Each command's method by its key: a batch's sub-commands, or the method itself (key "")."""
    cmd = (params or {}).get("cmd") if method == "batch" else None
    items = cmd.items() if isinstance(cmd, Mapping) else enumerate(cmd) if isinstance(cmd, list | tuple) else ()
    names = {str(key): str(q).partition("?")[0].strip().lower().removesuffix(".json") for key, q in items}
    return {key: name for key, name in names.items() if name} or {"": method}


@dataclass
class _OperatingBucket:
    """One method's operating time as this client spends it: a leaky bucket (level at ``at``, draining at
    OPERATING_RATE), and the longest a command of it took, to know what the next call will cost."""

    level: float = 0.0
    at: float = 0.0
    cost: float = 0.0

    def drained(self, now: float) -> float:
        return max(0.0, self.level - (now - self.at) * OPERATING_RATE)


def _operating_reset(body: Mapping[str, Any] | None) -> float | None:
    reset = ((body or {}).get("time") or {}).get("operating_reset_at")
    return float(reset) if isinstance(reset, int | float) else None


def php_query(params: Mapping[str, Any]) -> str:
    """PHP ``http_build_query``: nested keys in brackets, every value URL-encoded (``+`` must survive)."""
    pairs: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}[{key}]", sub)
        elif isinstance(value, list | tuple):
            for index, sub in enumerate(value):
                walk(f"{prefix}[{index}]", sub)
        elif value is None:
            pairs.append(f"{quote(prefix, safe='[]')}=")
        else:
            text = ("Y" if value else "N") if isinstance(value, bool) else str(value)
            # References like $result[c0] are resolved by Bitrix before decoding, so keep them raw.
            encoded = text if text.startswith("$result[") else quote(text, safe="")
            pairs.append(f"{quote(prefix, safe='[]')}={encoded}")

    for key, value in params.items():
        walk(str(key), value)
    return "&".join(pairs)


@dataclass
class BatchResult:
    result: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, dict[str, Any]] = field(default_factory=dict)
    total: dict[str, int] = field(default_factory=dict)
    next: dict[str, int] = field(default_factory=dict)


def _as_dict(value: Any) -> dict[str, Any]:
    # PHP serialises an empty map as [] and numeric-keyed maps as lists.
    if isinstance(value, dict):
        return value
    if isinstance(value, list):
        return {str(i): v for i, v in enumerate(value)}
    return {}


class Bitrix24Client:
    """One httpx client per process, shared by every caller; retries limits, 5xx and timeouts."""

    def __init__(
        self,
        webhook_url: str | None = None,
        http: httpx.Client | None = None,
        pacer: RequestPacer | None = None,
        max_attempts: int = 6,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
        *,
        oauth: Bitrix24OAuth | None = None,
        user_id: str = "",
        clock: Callable[[], float] = time.time,
        time_left: Callable[[], float | None] = lambda: None,
    ) -> None:
        """Incoming webhook (``webhook_url``) or OAuth app (``oauth``): exactly one of them. ``time_left``:
        seconds until the Lambda invocation's deadline, on the wall clock (None outside one)."""
        if (webhook_url is None) == (oauth is None):
            raise ValueError("give either an incoming-webhook URL or an OAuth session")
        self._oauth = oauth
        self._webhook = webhook_url.rstrip("/") + "/" if webhook_url else None
        # Incoming-webhook URLs are /rest/<user id>/<secret>/: every write we make is made as that user.
        parts = [p for p in urlsplit(self._webhook or "").path.split("/") if p]
        self.user_id = user_id or (parts[1] if len(parts) >= 3 and parts[0] == "rest" else "")
        self._blocked: dict[str, float] = {}
        self._operating: dict[str, _OperatingBucket] = {}
        self._clock = clock
        self._time_left = time_left
        self._http = http or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
        self._pacer = pacer or Pacer()
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self.requests = 0
        self.throttled = 0

    def expecting(self, requests: int) -> AbstractContextManager[None]:
        """For a step that knows it sends ``requests`` requests one after another: the shared budget
        books their slots in one write (``clinicsync.adapters.aws.budget``). Steps do not nest."""
        return expecting(self._pacer, requests)

    @property
    def is_oauth(self) -> bool:
        """An OAuth app (event.* methods allowed), not an incoming webhook."""
        return self._oauth is not None

    def note_blocked(self, method: str, error: Mapping[str, Any], reset_at: float | None = None) -> None:
        """Remember a 429 OPERATION_TIME_LIMIT for one method; the others keep going."""
        if error.get("error") == "OPERATION_TIME_LIMIT":
            self._blocked[method] = reset_at or self._clock() + OPERATING_PAUSE

    def blocked_until(self, method: str) -> float | None:
        until = self._blocked.get(method)
        if until is not None and until <= self._clock():
            del self._blocked[method]
            return None
        return until

    def _pace_operating(self, commands: Mapping[str, str]) -> None:
        """Wait until every method of the call has room in its bucket for its commands."""
        counts: dict[str, int] = {}
        for name in commands.values():
            counts[name] = counts.get(name, 0) + 1
        now = self._clock()
        waits = {
            name: (bucket.drained(now) + n * bucket.cost - OPERATING_BURST) / OPERATING_RATE
            for name, n in counts.items()
            if (bucket := self._operating.get(name)) is not None
        }
        wait = max(waits.values(), default=0.0)
        if not 0 < wait <= OPERATING_MAX_WAIT:
            return
        left = self._time_left()
        if left is not None and wait > left - DEADLINE_MARGIN:
            over = {name: w for name, w in waits.items() if w > left - DEADLINE_MARGIN}
            for name, w in over.items():
                self._blocked[name] = now + w
            name = max(over, key=over.__getitem__)
            raise Bitrix24MethodBlocked(name, now + over[name], now)
        self._sleep(wait)

    def _spent_operating(self, commands: Mapping[str, str], body: Mapping[str, Any]) -> None:
        """Charge each method's bucket with what its commands took (``time``, a batch's ``result_time``)."""
        single = "" in commands
        times = {"": body.get("time")} if single else _as_dict(_as_dict(body.get("result")).get("result_time"))
        now = self._clock()
        for key, name in commands.items():
            block = times.get(key)
            took = block.get("duration") if isinstance(block, Mapping) else None
            if not isinstance(took, int | float):
                continue
            bucket = self._operating.setdefault(name, _OperatingBucket(at=now))
            bucket.level, bucket.at = bucket.drained(now) + float(took), now
            bucket.cost = max(bucket.cost, float(took))

    def call(self, method: str, params: Mapping[str, Any] | None = None, *, writes: bool = False) -> dict[str, Any]:
        """POST one method. Requests that never ran (limits, refused connections) are retried with
        backoff. A write whose response is lost (timeout, 5xx, HTML) may have been applied, so it is
        never resent blindly: ``Bitrix24OutcomeUnknown`` sends the caller back to look up by MIS id.
        A method paused by the operating-time limit is not sent until its pause ends."""
        commands = _commands_of(method, params)
        methods = list(dict.fromkeys(commands.values()))
        self._refuse_paused(methods)
        self._pace_operating(commands)
        refreshed = False

        def attempt(number: int) -> dict[str, Any]:
            nonlocal refreshed
            try:
                self._pacer.wait()
            except BudgetTimeout as exc:
                raise Bitrix24Unavailable(f"{method}: the shared request budget is exhausted") from exc
            self.requests += 1
            url, body_params, token = self._target(method, params)
            try:
                response = self._http.post(url, json=body_params)
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise self._transient(method, type(exc).__name__, number) from None
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if writes:
                    raise Bitrix24OutcomeUnknown(method) from exc
                raise self._transient(method, type(exc).__name__, number) from None
            body = self._json(response)
            if response.status_code == 200 and body is not None and "error" not in body:
                self._spent_operating(commands, body)
                return body
            if body is None and _operating_page(response):
                raise self._operating_refusal(method, methods, response.status_code, writes=writes)
            code = str((body or {}).get("error", "")) or f"HTTP_{response.status_code}"
            if code == "expired_token" and self._oauth is not None and token and not refreshed:
                # Refresh once and replay; the new refresh token replaces the old one before first use.
                self._oauth.refresh(token)
                refreshed = True
                raise Replay
            if code == "OPERATION_TIME_LIMIT":
                reset = _operating_reset(body)
                self.note_blocked(method, {"error": code}, reset)
                self.throttled += 1
                raise Bitrix24MethodBlocked(method, self._blocked[method], self._clock())
            if code in NOT_EXECUTED:
                self.throttled += 1
                if code == "QUERY_LIMIT_EXCEEDED":
                    self._pacer.penalise()
                raise self._transient(method, code, number)
            if response.status_code >= 500 or body is None:
                if writes:
                    raise Bitrix24OutcomeUnknown(method)
                raise self._transient(method, code, number)
            raise Bitrix24Error(code, str((body or {}).get("error_description", "")), response.status_code)

        return call_with_retries(
            attempt,
            attempts=self._max_attempts,
            wait=exponential(self._backoff),
            sleep=self._sleep,
            exhausted=lambda _: Bitrix24Unavailable(f"{method}: retries exhausted"),
            wait_after_last=True,
        )

    def _refuse_paused(self, methods: list[str]) -> None:
        for name in methods:
            if (until := self.blocked_until(name)) is not None:
                raise Bitrix24MethodBlocked(name, until, self._clock())

    def _operating_refusal(self, method: str, methods: list[str], status: int, *, writes: bool) -> Exception:
        """An HTML page naming the operating-time limit. It does not say which sub-command is over
        budget, so every method of the call pauses. Only the 429 refusal proves that nothing ran: a page
        in another status may follow a partly run batch, so such a write stays outcome-unknown."""
        for name in methods:
            self.note_blocked(name, {"error": "OPERATION_TIME_LIMIT"})
        self.throttled += 1
        if writes and status != 429:
            return Bitrix24OutcomeUnknown(method)
        return Bitrix24MethodBlocked(methods[0], self._blocked[methods[0]], self._clock())

    def _target(self, method: str, params: Mapping[str, Any] | None) -> tuple[str, dict[str, Any], str | None]:
        body = dict(params or {})
        if self._oauth is None:
            return f"{self._webhook}{method}.json", body, None
        token = self._oauth.access_token()
        body["auth"] = token  # in the body, never the URL: URLs end up in access logs
        return f"{self._oauth.client_endpoint()}{method}.json", body, token

    @staticmethod
    def _transient(method: str, reason: str, attempt: int) -> Transient:
        logger.warning("bitrix24 retry", extra={"method": method, "reason": reason, "attempt": attempt})
        return Transient(reason)

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any] | None:
        # Overloaded portals answer some errors with an HTML page; treat that as transient.
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def batch(self, commands: Mapping[str, Command], halt: bool = False, *, writes: bool = False) -> BatchResult:
        if len(commands) > BATCH_LIMIT:
            raise ValueError(f"batch takes at most {BATCH_LIMIT} commands")
        cmd = {key: f"{method}?{php_query(params)}" for key, (method, params) in commands.items()}
        body = self.call("batch", {"halt": 1 if halt else 0, "cmd": cmd}, writes=writes)
        inner = _as_dict(body.get("result"))
        return BatchResult(
            result=_as_dict(inner.get("result")),
            errors={k: _as_dict(v) for k, v in _as_dict(inner.get("result_error")).items()},
            total={k: int(v) for k, v in _as_dict(inner.get("result_total")).items()},
            next={k: int(v) for k, v in _as_dict(inner.get("result_next")).items()},
        )
