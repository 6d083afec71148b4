"""amoCRM API v4 client: paced under the integration's 7 rps, a circuit breaker on 403, one token
refresh per expiry, 204 as "nothing", and writes that are never resent blindly.

amoCRM answers 429 with an HTML page and no Retry-After, and blocks the account with 403 when the
limit is hit again and again; so the pacer stays under it (a shared DynamoDB bucket at 6 rps) and a
403 stops every caller until an operator looks (the ``AmoCrmCircuitOpen`` metric alarms). A blocked
account answers 403 on the token endpoint too (amocrm-api-php #563): a refresh refused that way is the
same block, never a lost token (nothing was rotated).
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any, Protocol

import httpx
from aws_lambda_powertools.metrics import MetricUnit

from clinicsync.adapters.aws.budget import BudgetTimeout, RequestPacer, expecting
from clinicsync.adapters.http.oauth import OAuthError
from clinicsync.domain.crm_ports import CrmUnavailable
from clinicsync.observability import logger, metrics
from clinicsync.retrying import Replay, Transient, call_with_retries

READ_METHODS = frozenset({"GET"})
# amoCRM's largest page. A list read without ``limit`` gets 50 rows, even for 250 ``filter[id][]``.
PAGE_LIMIT = 250


def embedded(body: Any, key: str) -> list[dict[str, Any]]:
    """The rows under ``_embedded[key]`` of a HAL body (None, a 204, gives none)."""
    if not isinstance(body, dict):
        return []
    rows = (body.get("_embedded") or {}).get(key) or []
    return [row for row in rows if isinstance(row, dict)]


def main_contact(lead: Any) -> str | None:
    """The id of a lead's main contact. A lead may have several (an adopted inquiry keeps the form's
    contact beside the patient's); the one it hangs on is flagged ``is_main``, not the first listed."""
    return next((str(c["id"]) for c in embedded(lead, "contacts") if c.get("is_main")), None)


class AmoCrmAuth(Protocol):
    """What the client needs from an OAuth session or a long-lived token."""

    def access_token(self) -> str: ...

    def refresh(self, stale: str) -> str: ...

    def base_url(self) -> str: ...


class CircuitBreaker(Protocol):
    def is_open(self) -> bool: ...

    def trip(self, reason: str) -> None: ...


class AmoCrmError(Exception):
    """A request amoCRM understood and refused (400 validation, 404 …); ``invalid`` maps request_id -> codes."""

    def __init__(self, status: int, detail: str, invalid: Mapping[str, list[str]] | None = None) -> None:
        super().__init__(f"amoCRM {status}: {detail}")
        self.status = status
        self.detail = detail
        self.invalid = dict(invalid or {})


class AmoCrmBlocked(Exception):
    """403 on an API call or on the token endpoint: amoCRM blocked the account or integration (repeated
    limit violations). Every call stops until the breaker's cool-down."""


# OAuthError code of a 403 from the token endpoint (see clinicsync.adapters.amocrm.oauth).
ACCOUNT_BLOCKED = "account_blocked"


class AmoCrmUnavailable(CrmUnavailable):
    """Retries are exhausted for a transient condition (429, 5xx, timeouts on reads)."""


class AmoCrmOutcomeUnknown(Exception):
    """A write was sent and its response lost (timeout, 5xx, 504): it may have been applied."""


class MemoryCircuitBreaker:
    """In-process breaker (tests, the local runtime); the Lambda wiring uses the DynamoDB one."""

    def __init__(self) -> None:
        self.open_reason: str | None = None

    def is_open(self) -> bool:
        return self.open_reason is not None

    def trip(self, reason: str) -> None:
        self.open_reason = reason


class StoreCircuitBreaker:
    """A breaker shared by every container: ``CIRCUIT/<name>`` in the table, open until ``cooldown``."""

    def __init__(self, table: Any, name: str, cooldown: int = 3600, clock: Callable[[], float] = time.time) -> None:
        self._table = table
        self._key = {"pk": "CIRCUIT", "sk": name}
        self._cooldown = cooldown
        self._clock = clock
        self._checked_at = -1e9
        self._open_until = 0.0
        self._lock = threading.Lock()

    def is_open(self) -> bool:
        with self._lock:
            now = self._clock()
            if now - self._checked_at > 10:  # one read per 10 s per container, not one per request
                item = self._table.get_item(Key=self._key).get("Item") or {}
                self._open_until = float(item.get("open_until", 0))
                self._checked_at = now
            return self._open_until > now

    def trip(self, reason: str) -> None:
        until = int(self._clock()) + self._cooldown
        self._table.put_item(Item={**self._key, "open_until": until, "reason": reason, "expires_at": until + 86400})
        with self._lock:
            self._open_until = until
            self._checked_at = self._clock()


class AmoCrmClient:
    def __init__(
        self,
        auth: AmoCrmAuth,
        http: httpx.Client,
        pacer: RequestPacer,
        breaker: CircuitBreaker | None = None,
        *,
        max_attempts: int = 6,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._auth = auth
        self._http = http
        self._pacer = pacer
        self._breaker = breaker or MemoryCircuitBreaker()
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self.requests = 0
        self.throttled = 0

    def expecting(self, requests: int) -> AbstractContextManager[None]:
        """For a step that knows it sends ``requests`` requests one after another: the shared budget
        books their slots in one write (``clinicsync.adapters.aws.budget``). Steps do not nest."""
        return expecting(self._pacer, requests)

    def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, Any] | list[tuple[str, Any]] | None = None,
        json: Any = None,
    ) -> Any:
        """One API call; returns the decoded JSON, or None for 204 (amoCRM's "no results")."""
        writes = method not in READ_METHODS
        refreshed = False

        def attempt(number: int) -> Any:
            nonlocal refreshed
            if self._breaker.is_open():
                raise AmoCrmBlocked("the amoCRM circuit is open after a 403; see the runbook")
            try:
                self._pacer.wait()
            except BudgetTimeout as exc:
                raise AmoCrmUnavailable(f"{method} {path}: request budget exhausted") from exc
            self.requests += 1
            token = self._auth.access_token()
            try:
                response = self._http.request(
                    method,
                    self._auth.base_url().rstrip("/") + path,
                    params=params,
                    json=json,
                    headers={"Authorization": f"Bearer {token}"},
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                raise self._transient(method, path, type(exc).__name__, number) from None
            except httpx.HTTPError as exc:
                if writes:
                    raise AmoCrmOutcomeUnknown(f"{method} {path}") from exc
                raise self._transient(method, path, type(exc).__name__, number) from None
            status = response.status_code
            if status == 204:
                return None
            if status in (200, 201, 202):
                return response.json() if response.content else None
            if status == 401 and not refreshed:
                try:
                    self._auth.refresh(token)  # once; the new pair is persisted before we use it
                except OAuthError as exc:
                    if exc.code == ACCOUNT_BLOCKED:
                        raise self._blocked("POST /oauth2/access_token (token refresh)") from exc
                    raise
                refreshed = True
                raise Replay
            if status == 429:
                # HTML body, no Retry-After: back off with jitter and let the shared bucket cool down.
                self.throttled += 1
                self._pacer.penalise()
                raise self._transient(method, path, "429", number)
            if status == 403:
                raise self._blocked(f"{method} {path}")
            if status >= 500:
                if writes:
                    raise AmoCrmOutcomeUnknown(f"{method} {path}: HTTP {status}")
                raise self._transient(method, path, str(status), number)
            raise self._refused(response)

        return call_with_retries(
            attempt,
            attempts=self._max_attempts,
            wait=self._backoff_with_jitter,
            sleep=self._sleep,
            exhausted=lambda _: AmoCrmUnavailable(f"{method} {path}: retries exhausted"),
            wait_after_last=True,
        )

    def rows(
        self, path: str, key: str, params: Sequence[tuple[str, Any]] = (), *, first_page: int = 1
    ) -> Iterator[dict[str, Any]]:
        """Every row of the list ``GET path`` (``_embedded[key]``), lazily: every page asks for
        ``limit=250`` and the next page is read only while ``_links.next`` says there is one.

        The one way this package reads an amoCRM list: a read that forgets ``limit`` silently gets 50.
        """
        page = first_page
        while True:
            found, more = self._page(path, key, params, page)
            yield from found
            if not more:
                return
            page += 1

    def rows_since(
        self, path: str, key: str, since: int, params: Sequence[tuple[str, Any]] = ()
    ) -> Iterator[dict[str, Any]]:
        """Rows updated at or after ``since``, oldest first, each state once.

        Paged by moving ``filter[updated_at][from]`` to the last row's ``updated_at`` rather than by page
        number alone: a row changed during the read jumps to the end of the order, and with page numbers
        the row that slides back into a page already read would be skipped. The new read starts past the
        whole pages of that second already read; the few rows of it read twice are dropped. Inside one
        second holding more than a page, only page numbers can move on: when a row of such a second
        shows up again changed, that second is read once more at the end.
        """
        fixed = [(k, v) for k, v in params if k not in ("filter[updated_at][from]", "order[updated_at]")]
        seen: set[tuple[str, Any]] = set()
        first_at: dict[str, Any] = {}
        stepped: set[int] = set()
        dirty = yield from self._since_pass(path, key, fixed, since, None, seen, first_at, stepped)
        for second in sorted(dirty):
            yield from self._since_pass(path, key, fixed, second, second, seen, first_at, set())

    def _since_pass(
        self,
        path: str,
        key: str,
        fixed: Sequence[tuple[str, Any]],
        since: int,
        only: int | None,
        seen: set[tuple[str, Any]],
        first_at: dict[str, Any],
        stepped: set[int],
    ) -> Generator[dict[str, Any], None, set[int]]:
        """One pass of :meth:`rows_since` (up to second ``only`` if given); returns the seconds read by page
        number past their first page in which a row changed mid-read."""
        page, run = 1, 0  # run: rows of second ``run_at`` so far, from its first in amoCRM's order
        run_at: Any = since
        dirty: set[int] = set()
        while True:
            if page > 1:
                stepped.add(since)
            query = [*fixed, ("filter[updated_at][from]", since), ("order[updated_at]", "asc")]
            found, more = self._page(path, key, query, page)
            for row in found:
                updated = row.get("updated_at")
                run, run_at = (run + 1, run_at) if updated == run_at else (1, updated)
                rid = str(row.get("id"))
                before = first_at.setdefault(rid, updated)
                if before != updated and before in stepped:
                    dirty.add(before)
                if (rid, updated) not in seen:
                    seen.add((rid, updated))
                    yield row
            if not more or (only is not None and isinstance(run_at, int) and run_at > only):
                return dirty
            if isinstance(run_at, int) and run_at > since:
                since, page = run_at, 1 + run // PAGE_LIMIT
                run = (page - 1) * PAGE_LIMIT
            else:
                page += 1

    def _page(
        self, path: str, key: str, params: Sequence[tuple[str, Any]], page: int
    ) -> tuple[list[dict[str, Any]], bool]:
        """One page of a list read, always with ``limit=250``; and whether ``_links.next`` names another."""
        fixed = [(k, v) for k, v in params if k not in ("limit", "page")]
        body = self.request("GET", path, params=[*fixed, ("limit", PAGE_LIMIT), ("page", page)])
        found = embedded(body, key)
        return found, bool(found) and "next" in ((body or {}).get("_links") or {})

    def rows_by_id(
        self, path: str, key: str, ids: Sequence[str], params: Sequence[tuple[str, Any]] = ()
    ) -> Iterator[dict[str, Any]]:
        """The rows of ``ids`` (duplicates dropped), ``filter[id][]`` 250 at a time through :meth:`rows`."""
        unique = list(dict.fromkeys(ids))
        for start in range(0, len(unique), PAGE_LIMIT):
            chunk = [("filter[id][]", rid) for rid in unique[start : start + PAGE_LIMIT]]
            yield from self.rows(path, key, [*chunk, *params])

    def _blocked(self, where: str) -> AmoCrmBlocked:
        """Open the breaker for every container; the reason names where the 403 came from."""
        reason = f"403 on {where}: amoCRM blocked the account or integration"
        self._breaker.trip(reason)
        metrics.add_metric(name="CrmCircuitOpen", unit=MetricUnit.Count, value=1)  # alarmed in the template
        logger.error("amoCRM blocked the integration; circuit opened", extra={"where": where})
        return AmoCrmBlocked(f"{reason}; calls stop for the breaker's cool-down (see the runbook)")

    @staticmethod
    def _transient(method: str, path: str, reason: str, attempt: int) -> Transient:
        logger.warning("amocrm retry", extra={"method": method, "path": path, "reason": reason, "attempt": attempt})
        return Transient(reason)

    def _backoff_with_jitter(self, attempt: int) -> float:
        return self._backoff * 2.0 ** (attempt - 1) * (0.5 + random.random() / 2)  # noqa: S311 - jitter

    @staticmethod
    def _refused(response: httpx.Response) -> AmoCrmError:
        try:
            body = response.json()
        except ValueError:
            return AmoCrmError(response.status_code, "non-JSON error body")
        invalid: dict[str, list[str]] = {}
        for item in body.get("validation-errors", []) if isinstance(body, dict) else []:
            codes = [f"{e.get('code')}:{e.get('path')}" for e in item.get("errors", [])]
            invalid[str(item.get("request_id"))] = codes
        detail = str(body.get("detail", "")) if isinstance(body, dict) else ""
        return AmoCrmError(response.status_code, detail[:200], invalid)
