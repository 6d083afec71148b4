"""Bitrix24 adapter: a paced, retrying REST client and the gateway that translates canonical writes.

The gateway never decides anything: it turns the domain's ContactWrite/DealWrite into
``crm.contact.*``/``crm.deal.*`` commands and packs them into ``batch`` calls of at most 50.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import httpx

from clinicsync.observability import logger
from clinicsync.ports import ContactWrite, CrmMatches, CrmWrite, DealMatch, DealWrite, WriteOutcome

BATCH_LIMIT = 50
PAGE_SIZE = 50

# Canonical deal/contact fields that have a native Bitrix24 field; the rest need a UF_CRM_* name.
DEFAULT_CUSTOM_FIELDS: Mapping[str, str] = {
    "status": "UF_CRM_CS_STATUS",
    "is_dms": "UF_CRM_CS_DMS",
    "doctor": "UF_CRM_CS_DOCTOR",
    "branch": "UF_CRM_CS_BRANCH",
    "opt_outs": "UF_CRM_CS_OPT_OUT",
}


class Bitrix24Error(Exception):
    """A permanent error: the request was understood and refused."""

    def __init__(self, code: str, description: str, status: int) -> None:
        super().__init__(f"{status} {code}: {description}")
        self.code = code
        self.description = description
        self.status = status


class Bitrix24Unavailable(Exception):
    """Retries are exhausted for a transient condition (limits, 5xx, timeouts)."""


class Bitrix24OutcomeUnknown(Exception):
    """A write was sent but its response was lost: it may or may not have been applied."""


# Errors that mean the portal refused the request before running it, so a resend is safe.
NOT_EXECUTED = frozenset({"QUERY_LIMIT_EXCEEDED", "OPERATION_TIME_LIMIT", "OVERLOAD_LIMIT"})


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


class Pacer:
    """Mirrors the portal's leaky bucket locally: each request adds 1, the level drains at ``rate``/s.

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

    def penalise(self) -> None:
        """The portal said 503: assume its bucket is full and let it drain before the next call."""
        with self._lock:
            self._level = float(self._burst)


class Bitrix24Client:
    """One httpx client per process, shared by every caller; retries limits, 5xx and timeouts."""

    def __init__(
        self,
        webhook_url: str,
        http: httpx.Client | None = None,
        pacer: Pacer | None = None,
        max_attempts: int = 6,
        backoff: float = 0.5,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._base = webhook_url.rstrip("/") + "/"
        self._http = http or httpx.Client(timeout=httpx.Timeout(30.0, connect=5.0))
        self._pacer = pacer or Pacer()
        self._max_attempts = max_attempts
        self._backoff = backoff
        self._sleep = sleep
        self.requests = 0
        self.throttled = 0

    def call(self, method: str, params: Mapping[str, Any] | None = None, *, writes: bool = False) -> dict[str, Any]:
        """POST one method. Requests that never ran (limits, refused connections) are retried with
        backoff. A write whose response is lost (timeout, 5xx, HTML) may have been applied, so it is
        never resent blindly: ``Bitrix24OutcomeUnknown`` sends the caller back to look up by MIS id."""
        for attempt in range(1, self._max_attempts + 1):
            self._pacer.wait()
            self.requests += 1
            try:
                response = self._http.post(self._base + method + ".json", json=dict(params or {}))
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                self._retry_later(method, type(exc).__name__, attempt)
                continue
            except (httpx.TimeoutException, httpx.TransportError) as exc:
                if writes:
                    raise Bitrix24OutcomeUnknown(method) from exc
                self._retry_later(method, type(exc).__name__, attempt)
                continue
            body = self._json(response)
            if response.status_code == 200 and body is not None and "error" not in body:
                return body
            code = str((body or {}).get("error", "")) or f"HTTP_{response.status_code}"
            if code in NOT_EXECUTED:
                self.throttled += 1
                if code == "QUERY_LIMIT_EXCEEDED":
                    self._pacer.penalise()
                self._retry_later(method, code, attempt)
                continue
            if response.status_code >= 500 or body is None:
                if writes:
                    raise Bitrix24OutcomeUnknown(method)
                self._retry_later(method, code, attempt)
                continue
            raise Bitrix24Error(code, str((body or {}).get("error_description", "")), response.status_code)
        raise Bitrix24Unavailable(f"{method}: retries exhausted")

    def _retry_later(self, method: str, reason: str, attempt: int) -> None:
        logger.warning("bitrix24 retry", extra={"method": method, "reason": reason, "attempt": attempt})
        self._sleep(self._backoff * 2 ** (attempt - 1))

    @staticmethod
    def _json(response: httpx.Response) -> dict[str, Any] | None:
        # Overloaded portals answer some errors with an HTML page; treat that as transient.
        try:
            body = response.json()
        except ValueError:
            return None
        return body if isinstance(body, dict) else None

    def batch(
        self, commands: Mapping[str, tuple[str, Mapping[str, Any]]], halt: bool = False, *, writes: bool = False
    ) -> BatchResult:
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


def _chunks(items: Sequence[str], size: int) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class _Command:
    key: str
    method: str
    params: dict[str, Any]
    patient_id: str
    write: CrmWrite


class Bitrix24Gateway:
    kind = "bitrix24"

    def __init__(
        self,
        client: Bitrix24Client,
        originator_id: str = "clinicsync",
        custom_fields: Mapping[str, str] | None = None,
    ) -> None:
        self._client = client
        self._originator = originator_id
        self._custom = {**DEFAULT_CUSTOM_FIELDS, **(custom_fields or {})}

    def requests_made(self) -> int:
        return self._client.requests

    # --- look-ups ----------------------------------------------------------------------------------

    def find_by_mis_ids(self, patient_ids: Sequence[str], appointment_ids: Sequence[str]) -> CrmMatches:
        commands: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for n, ids in enumerate(_chunks(list(dict.fromkeys(patient_ids)), PAGE_SIZE)):
            commands[f"c{n}"] = ("crm.contact.list", self._origin_filter(ids, ["ID", "ORIGIN_ID"]))
        for n, ids in enumerate(_chunks(list(dict.fromkeys(appointment_ids)), PAGE_SIZE)):
            select = ["ID", "ORIGIN_ID", "CATEGORY_ID", "STAGE_ID", "CLOSED"]
            commands[f"d{n}"] = ("crm.deal.list", self._origin_filter(ids, select))
        contacts: dict[str, str] = {}
        deals: dict[str, DealMatch] = {}
        keys = list(commands)
        for chunk in _chunks(keys, BATCH_LIMIT):
            result = self._client.batch({k: commands[k] for k in chunk})
            if result.errors:
                raise Bitrix24Error("LOOKUP_FAILED", ",".join(sorted(result.errors)), 400)
            for key, rows in result.result.items():
                for row in rows if isinstance(rows, list) else []:
                    origin = str(row.get("ORIGIN_ID", ""))
                    if key.startswith("c"):
                        # Oldest id wins, so a duplicate made by hand never replaces our mapping.
                        contacts.setdefault(origin, str(row["ID"]))
                    else:
                        deals.setdefault(
                            origin,
                            DealMatch(
                                deal_id=str(row["ID"]),
                                category_id=str(row.get("CATEGORY_ID", "0")),
                                stage=str(row.get("STAGE_ID", "")),
                                closed=row.get("CLOSED") == "Y",
                            ),
                        )
        return CrmMatches(contacts=contacts, deals=deals)

    def _origin_filter(self, ids: Sequence[str], select: list[str]) -> dict[str, Any]:
        return {
            "filter": {"ORIGINATOR_ID": self._originator, "@ORIGIN_ID": list(ids)},
            "select": select,
            "order": {"ID": "ASC"},
        }

    # --- writes ------------------------------------------------------------------------------------

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        outcome = WriteOutcome()
        groups: dict[str, list[CrmWrite]] = {}
        for write in writes:
            groups.setdefault(write.patient_id, []).append(write)
        pending = [self._commands(pid, group) for pid, group in groups.items()]
        # Pack whole patients into batches; commands run in order with halt=1, so a deal never
        # references a contact whose creation failed.
        queue: list[list[_Command]] = [g for g in pending if g]
        while queue:
            chunk: list[_Command] = []
            while queue and len(chunk) + len(queue[0]) <= BATCH_LIMIT:
                chunk.extend(queue.pop(0))
            if not chunk:  # one patient with more than 50 commands: send its head now
                head = queue[0][:BATCH_LIMIT]
                queue[0] = queue[0][BATCH_LIMIT:]
                chunk = head
            leftovers = self._run_chunk(chunk, outcome)
            if leftovers:
                queue.insert(0, leftovers)
        return outcome

    def _run_chunk(self, chunk: list[_Command], outcome: WriteOutcome) -> list[_Command]:
        # Resolve references to contacts created by earlier chunks.
        for command in chunk:
            if isinstance(command.write, DealWrite) and command.params["fields"].get("CONTACT_ID", "").startswith(
                "$result["
            ):
                known = outcome.contact_ids.get(command.patient_id)
                keys = {c.key for c in chunk}
                ref_key = command.params["fields"]["CONTACT_ID"][len("$result[") : -1]
                if ref_key not in keys and known:
                    command.params["fields"]["CONTACT_ID"] = known
        try:
            result = self._client.batch({c.key: (c.method, c.params) for c in chunk}, halt=True, writes=True)
        except Bitrix24OutcomeUnknown:
            # Some of these may exist now; the retry looks them up by MIS id before writing again.
            for command in chunk:
                outcome.failed.setdefault(command.patient_id, "outcome_unknown")
            return []
        failed_at: int | None = None
        for index, command in enumerate(chunk):
            if command.key in result.errors:
                error = result.errors[command.key]
                outcome.failed[command.patient_id] = str(error.get("error") or error.get("error_description", "error"))
                failed_at = index
                break
            if command.key not in result.result:
                failed_at = index
                break
            value = result.result[command.key]
            if command.method == "crm.contact.add":
                outcome.contact_ids[command.patient_id] = str(value)
            elif command.method == "crm.deal.add":
                outcome.deal_ids[command.write.appointment_id] = str(value)  # type: ignore[union-attr]
            elif command.method == "crm.contact.update" and isinstance(command.write, ContactWrite):
                outcome.contact_ids[command.patient_id] = str(command.write.contact_id)
            elif command.method == "crm.deal.update" and isinstance(command.write, DealWrite):
                outcome.deal_ids[command.write.appointment_id] = str(command.write.deal_id)
        if failed_at is None:
            return []
        # halt=1 skipped everything after the failure: resend what belongs to other patients.
        failed_patient = chunk[failed_at].patient_id
        return [c for c in chunk[failed_at:] if c.patient_id != failed_patient and c.patient_id not in outcome.failed]

    def _commands(self, patient_id: str, writes: Sequence[CrmWrite]) -> list[_Command]:
        commands: list[_Command] = []
        contact_ref: str | None = None
        for write in writes:
            if isinstance(write, ContactWrite):
                key = f"c_{patient_id}"
                params: dict[str, Any]
                if write.contact_id is None:
                    params = {
                        "fields": self._contact_fields(write, create=True),
                        "params": {"REGISTER_SONET_EVENT": "N"},
                    }
                    commands.append(_Command(key, "crm.contact.add", params, patient_id, write))
                    contact_ref = f"$result[{key}]"
                else:
                    params = {
                        "id": write.contact_id,
                        "fields": self._contact_fields(write, create=False),
                        "params": {"REGISTER_SONET_EVENT": "N"},
                    }
                    commands.append(_Command(key, "crm.contact.update", params, patient_id, write))
        for write in writes:
            if isinstance(write, DealWrite):
                key = f"d_{write.appointment_id}"
                fields = self._deal_fields(write)
                if write.deal_id is None:
                    contact = write.contact_id or contact_ref
                    if contact:
                        fields["CONTACT_ID"] = contact
                    fields["CATEGORY_ID"] = write.category_id
                    commands.append(_Command(key, "crm.deal.add", {"fields": fields}, patient_id, write))
                else:
                    commands.append(
                        _Command(key, "crm.deal.update", {"id": write.deal_id, "fields": fields}, patient_id, write)
                    )
        return commands

    def _contact_fields(self, write: ContactWrite, create: bool) -> dict[str, Any]:
        src = write.fields
        out: dict[str, Any] = {"ORIGINATOR_ID": self._originator, "ORIGIN_ID": write.patient_id}
        if "full_name" in src:
            name = src["full_name"]
            out.update(LAST_NAME=name["last"], NAME=name["first"], SECOND_NAME=name["middle"])
        if "birth_date" in src:
            out["BIRTHDATE"] = src["birth_date"] or ""
        if create:
            # On update a PHONE list would append duplicates (multifield semantics); phones and
            # e-mails are written on create and changed through edit-by-ID by the consent/contact flows.
            if src.get("phone"):
                out["PHONE"] = [{"VALUE": src["phone"], "VALUE_TYPE": "MOBILE"}]
            if src.get("email"):
                out["EMAIL"] = [{"VALUE": src["email"], "VALUE_TYPE": "HOME"}]
        for name in ("sex", "opt_outs"):
            if name in src and name in self._custom:
                value = src[name]
                out[self._custom[name]] = ",".join(value) if isinstance(value, list) else (value or "")
        return out

    def _deal_fields(self, write: DealWrite) -> dict[str, Any]:
        src = write.fields
        out: dict[str, Any] = {"ORIGINATOR_ID": self._originator, "ORIGIN_ID": write.appointment_id}
        if "title" in src:
            out["TITLE"] = src["title"]
        if "visit_at" in src:
            out["BEGINDATE"] = src["visit_at"]
        if src.get("price") is not None:
            out["OPPORTUNITY"] = src["price"]
        if write.stage is not None:
            out["STAGE_ID"] = write.stage
        for name in ("status", "is_dms", "doctor", "branch"):
            if name in src and name in self._custom:
                value = src[name]
                out[self._custom[name]] = ("Y" if value else "N") if isinstance(value, bool) else (value or "")
        return out
