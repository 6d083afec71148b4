"""Mailchimp Marketing API v3 emulator: audiences, members, batch operations and audience webhooks.

Modelled on Mailchimp's public behaviour (docs/consent.md lists the facts and how sure they are):

* ``/3.0`` under the data-centre host; HTTP Basic auth with any user name and the API key (or
  ``Authorization: apikey <key>``). A wrong key is ``401 API Key Invalid``. Errors are
  ``application/problem+json`` documents ``{type, title, status, detail, instance}``.
* At most 10 simultaneous connections per account: the 11th concurrent request gets ``429 Too Many
  Requests`` (``max_connections``; tests can lower it or hold requests open with ``hold_next``).
* Members live at ``/lists/{list_id}/members/{subscriber_hash}``, the hash being the MD5 of the
  lower-cased address (the address itself is accepted too). GET/PATCH need an existing member (404
  otherwise); PUT upserts and needs ``status_if_new`` for a new member. Setting an unsubscribed or
  cleaned member back to ``subscribed`` is refused (``400 Member In Compliance State``). Unknown merge
  tags are ``400 Invalid Resource``. A member's id is the hash of its *current* address: when the
  subscriber changes it (``upemail``) or a PUT/PATCH names another address, the member moves, the old
  hash answers 404 (a PUT there creates a new member), and an address already in the list is refused.
* ``POST /batches`` queues up to ``max_batch_operations`` operations and answers ``pending`` at once; a
  status read after ``batch_seconds`` runs them and reports ``finished`` with a ``response_body_url``
  that serves a gzipped tar of ``[{status_code, operation_id, response}]``.
* Webhooks: saving one first validates the URL with a GET. Events are form-encoded POSTs with ``type``,
  ``fired_at`` and ``data[...]`` keys (``unsubscribe``, ``cleaned``, ``upemail``, ``profile``,
  ``subscribe``); an event fires only if its source (``user``, ``admin``, ``api``) is enabled on the
  webhook, so with ``api`` off our own API writes never come back.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import tarfile
import threading
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import httpx
from werkzeug.wrappers import Request, Response

from sandbox.emulators.base import Clock, webhook_sender

Json = dict[str, Any]
STATUSES = ("subscribed", "unsubscribed", "cleaned", "pending", "transactional", "archived")
SOURCES = ("user", "admin", "api")
_MEMBER = re.compile(r"^/3\.0/lists/([^/]+)/members/([^/]+)$")


def md5_of(email: str) -> str:
    return hashlib.md5(email.strip().lower().encode(), usedforsecurity=False).hexdigest()


class _Problem(Exception):
    def __init__(self, status: int, title: str, detail: str, errors: list[Json] | None = None) -> None:
        super().__init__(detail)
        self.status, self.title, self.detail, self.errors = status, title, detail, errors


@dataclass
class Webhook:
    id: str
    url: str
    events: dict[str, bool]
    sources: dict[str, bool]


@dataclass
class Delivery:
    url: str
    type: str
    status: int


@dataclass
class _Batch:
    id: str
    operations: list[Json]
    submitted_at: float
    status: str = "pending"
    results: list[Json] = field(default_factory=list)
    completed_at: float | None = None


class MailchimpEmulator:
    def __init__(
        self,
        api_key: str = "0123456789abcdef0123456789abcdef-us21",
        list_id: str = "a1b2c3d4e5",
        merge_tags: Iterable[str] = ("FNAME", "LNAME"),
        clock: Clock | None = None,
        max_connections: int = 10,
        max_batch_operations: int = 1000,
        batch_seconds: float = 0.0,
    ) -> None:
        self.api_key = api_key
        self.list_id = list_id
        self.clock = clock or Clock()
        self.max_connections = max_connections
        self.max_batch_operations = max_batch_operations
        self.batch_seconds = batch_seconds
        self.base_url = ""  # set by whoever serves it; used in response_body_url
        self._lock = threading.RLock()
        self._in_flight = 0
        self._members: dict[str, Json] = {}
        self._merge_tags = ["EMAIL", *merge_tags]
        self._webhooks: list[Webhook] = []
        self._pending: list[tuple[str, Json]] = []  # (type, data) in firing order
        self._batches: dict[str, _Batch] = {}
        self._archives: dict[str, bytes] = {}
        self.deliveries: list[Delivery] = []
        self.requests = 0
        self.writes = 0
        self.throttled = 0
        self._held: list[threading.Event] = []  # the next requests are held open until their event is set
        self._web_ids = iter(range(1000, 10**9))

    # --- admin / test helpers ----------------------------------------------------------------------

    def add_merge_field(self, tag: str) -> None:
        with self._lock:
            if tag not in self._merge_tags:
                self._merge_tags.append(tag)

    def member(self, email: str) -> Json | None:
        with self._lock:
            row = self._members.get(md5_of(email))
            return json.loads(json.dumps(row)) if row else None

    def members(self) -> list[Json]:
        with self._lock:
            return [json.loads(json.dumps(m)) for m in self._members.values()]

    def add_webhook(self, url: str, events: Iterable[str], sources: Iterable[str] = ("user", "admin")) -> str:
        """Save a webhook as the UI does: Mailchimp first checks the URL answers a GET with 200."""
        check = httpx.get(url, timeout=10.0)
        if check.status_code != 200:
            raise ValueError(f"webhook URL failed validation: HTTP {check.status_code}")
        wanted = set(events)
        hook = Webhook(
            uuid.uuid4().hex[:10],
            url,
            {e: e in wanted for e in ("subscribe", "unsubscribe", "profile", "cleaned", "upemail", "campaign")},
            {s: s in set(sources) for s in SOURCES},
        )
        with self._lock:
            self._webhooks.append(hook)
        return hook.id

    def hold_next(self, n: int = 1) -> threading.Event:
        """Hold the next ``n`` requests open until the returned event is set (at most 30 s): a test of the
        connection limit that does not depend on how fast a loaded machine sends its next request."""
        release = threading.Event()
        with self._lock:
            self._held.extend([release] * n)
        return release

    def member_unsubscribes(self, email: str, campaign_id: str = "c0ffee1234") -> None:
        """The recipient clicks "unsubscribe" in a campaign (source ``user``)."""
        with self._lock:
            row = self._require(md5_of(email))
            row["status"] = "unsubscribed"
            self._fire("unsubscribe", self._event_data(row, action="unsub", reason="manual", campaign_id=campaign_id))

    def member_bounces(self, email: str) -> None:
        with self._lock:
            row = self._require(md5_of(email))
            row["status"] = "cleaned"
            self._fire(
                "cleaned",
                {"list_id": self.list_id, "campaign_id": "c0ffee1234", "reason": "hard", "email": row["email_address"]},
            )

    def member_changes_email(self, old: str, new: str) -> None:
        """The subscriber updates their address from the preferences page (source ``user``)."""
        with self._lock:
            row = self._require(md5_of(old))
            if md5_of(new) in self._members:
                raise ValueError("Mailchimp refuses an address already in the audience")
            self._move(row, new, "user")

    def member_updates_profile(self, email: str, **merges: str) -> None:
        with self._lock:
            row = self._require(md5_of(email))
            row["merge_fields"].update(merges)
            self._fire("profile", self._event_data(row))

    def pending_events(self) -> list[tuple[str, Json]]:
        with self._lock:
            return list(self._pending)

    def deliver_webhooks(self) -> list[Delivery]:
        """POST every queued event to every webhook that wants it, form-encoded like Mailchimp."""
        with self._lock:
            pending, self._pending = self._pending, []
            hooks = list(self._webhooks)
        out = []
        for kind, data in pending:
            source = data.pop("_source", "user")
            for hook in hooks:
                if not hook.events.get(kind) or not hook.sources.get(source):
                    continue
                fired = datetime.fromtimestamp(self.clock.now(), UTC).strftime("%Y-%m-%d %H:%M:%S")
                body = urlencode([("type", kind), ("fired_at", fired), *_flatten("data", data)])
                response = webhook_sender().post(
                    hook.url,
                    content=body,
                    headers={"content-type": "application/x-www-form-urlencoded", "user-agent": "MailChimp"},
                    timeout=10.0,
                )
                out.append(Delivery(hook.url, kind, response.status_code))
        with self._lock:
            self.deliveries.extend(out)
        return out

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {"requests": self.requests, "writes": self.writes, "throttled": self.throttled}

    # --- WSGI --------------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        with self._lock:
            self.requests += 1
            if self._in_flight >= self.max_connections:
                self.throttled += 1
                response = self._problem(
                    _Problem(429, "Too Many Requests", "You have exceeded the limit of 10 simultaneous connections.")
                )
                return response(environ, start_response)
            self._in_flight += 1
            held = self._held.pop(0) if self._held else None
        try:
            if held is not None:
                held.wait(30)
            response = self._dispatch(request)
        except _Problem as exc:
            response = self._problem(exc)
        finally:
            with self._lock:
                self._in_flight -= 1
        return response(environ, start_response)

    def _dispatch(self, request: Request) -> Response:
        path = request.path
        if path.startswith("/batch-results/") and request.method == "GET":
            return self._archive(path.removeprefix("/batch-results/"))  # like a pre-signed S3 URL: no auth
        self._authenticate(request)
        if path == "/3.0/ping" and request.method == "GET":
            return _json({"health_status": "Everything's Chimpy!"})
        if path == f"/3.0/lists/{self.list_id}" and request.method == "GET":
            with self._lock:
                return _json({"id": self.list_id, "name": "Patients", "stats": {"member_count": len(self._members)}})
        if path == "/3.0/batches" and request.method == "POST":
            return self._submit_batch(request)
        if path.startswith("/3.0/batches/") and request.method == "GET":
            return self._batch_status(path.removeprefix("/3.0/batches/"))
        match = _MEMBER.match(path)
        if match:
            if match.group(1) != self.list_id:
                raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")
            body = request.get_json(silent=True) if request.method in ("PUT", "PATCH") else None
            status, payload = self._member_op(request.method, match.group(2), body, source="api")
            return _json(payload, status)
        raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")

    def _authenticate(self, request: Request) -> None:
        header = request.headers.get("Authorization", "")
        key = ""
        if header.lower().startswith("basic "):
            try:
                key = base64.b64decode(header[6:]).decode().partition(":")[2]
            except ValueError:
                key = ""
        elif header.lower().startswith("apikey "):
            key = header[7:]
        if key != self.api_key:
            raise _Problem(
                401,
                "API Key Invalid",
                "Your API key may be invalid, or you've attempted to access the wrong datacenter.",
            )

    # --- members -----------------------------------------------------------------------------------

    def _member_op(self, method: str, ref: str, body: Any, source: str) -> tuple[int, Json]:
        key = md5_of(ref) if "@" in ref else ref.lower()
        with self._lock:
            row = self._members.get(key)
            if method == "GET":
                return 200, self._require(key)
            if method not in ("PUT", "PATCH"):
                raise _Problem(405, "Method Not Allowed", "The requested method and resource are not compatible.")
            if not isinstance(body, dict):
                raise _Problem(400, "Invalid Resource", "The resource submitted could not be validated.")
            self._check_merges(body.get("merge_fields"))
            if row is None:
                if method == "PATCH":
                    raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")
                row = self._create(key, body)
            else:
                self._change_address(row, body.get("email_address"), source)
                self._update(row, body, source)
            self.writes += 1
            return 200, json.loads(json.dumps(row))

    def _create(self, key: str, body: Json) -> Json:
        email = body.get("email_address")
        status = body.get("status_if_new") or body.get("status")
        if not isinstance(email, str) or md5_of(email) != key:
            raise _Problem(
                400,
                "Invalid Resource",
                "The email address does not match the subscriber hash.",
                [{"field": "email_address", "message": "does not match the hash"}],
            )
        if status not in STATUSES:
            raise _Problem(
                400,
                "Invalid Resource",
                "The resource submitted could not be validated.",
                [{"field": "status_if_new", "message": "Data presented is not one of the accepted values"}],
            )
        row = {
            "id": key,
            "email_address": email.strip(),
            "unique_email_id": uuid.uuid4().hex[:10],
            "web_id": next(self._web_ids),
            "status": status,
            "merge_fields": {"EMAIL": email.strip(), **dict(body.get("merge_fields") or {})},
            "list_id": self.list_id,
            "last_changed": self._now_iso(),
        }
        self._members[key] = row
        return row

    def _change_address(self, row: Json, email: Any, source: str) -> None:
        """A PUT/PATCH naming another address moves the member to it (its id, the hash, changes with it;
        the old hash then answers 404), as the subscriber's own change does. Taken: 400 Member Exists."""
        if not isinstance(email, str) or md5_of(email) == row["id"]:
            return
        if md5_of(email) in self._members:
            raise _Problem(400, "Member Exists", f"{email.strip()} is already a list member.")
        self._move(row, email.strip(), source)

    def _move(self, row: Json, new: str, source: str) -> None:
        old = row["email_address"]
        del self._members[row["id"]]
        row["email_address"] = new
        row["id"] = md5_of(new)
        row["merge_fields"]["EMAIL"] = new
        row["last_changed"] = self._now_iso()
        self._members[row["id"]] = row
        self._fire(
            "upemail",
            {"list_id": self.list_id, "new_id": row["unique_email_id"], "new_email": new, "old_email": old},
            source,
        )

    def _update(self, row: Json, body: Json, source: str) -> None:
        status = body.get("status")
        if status is not None:
            if status not in STATUSES:
                raise _Problem(400, "Invalid Resource", "The resource submitted could not be validated.")
            if status == "subscribed" and row["status"] in ("unsubscribed", "cleaned"):
                raise _Problem(
                    400,
                    "Member In Compliance State",
                    f"{row['email_address']} is in a compliance state due to unsubscribe, bounce, or compliance "
                    "review and cannot be subscribed.",
                )
            if status != row["status"]:
                row["status"] = status
                row["last_changed"] = self._now_iso()
                if status == "unsubscribed":
                    self._fire("unsubscribe", self._event_data(row, action="unsub", reason="manual"), source)
        if body.get("merge_fields"):
            row["merge_fields"].update(body["merge_fields"])
            self._fire("profile", self._event_data(row), source)

    def _check_merges(self, merges: Any) -> None:
        if merges is None:
            return
        unknown = [k for k in (merges if isinstance(merges, dict) else {"?": 1}) if k not in self._merge_tags]
        if unknown:
            raise _Problem(
                400,
                "Invalid Resource",
                "Your merge fields were invalid.",
                [{"field": k, "message": "Merge field not found"} for k in unknown],
            )

    def _require(self, key: str) -> Json:
        row = self._members.get(key)
        if row is None:
            raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")
        return row

    # --- batches -----------------------------------------------------------------------------------

    def _submit_batch(self, request: Request) -> Response:
        body = request.get_json(silent=True)
        operations = body.get("operations") if isinstance(body, dict) else None
        if not isinstance(operations, list) or not operations:
            raise _Problem(400, "Invalid Resource", "The resource submitted could not be validated.")
        if len(operations) > self.max_batch_operations:
            raise _Problem(400, "Invalid Resource", f"A batch may hold at most {self.max_batch_operations} operations.")
        batch = _Batch(uuid.uuid4().hex[:10], operations, self.clock.now())
        with self._lock:
            self._batches[batch.id] = batch
        return _json(self._batch_view(batch))

    def _batch_status(self, batch_id: str) -> Response:
        with self._lock:
            batch = self._batches.get(batch_id)
            if batch is None:
                raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")
            if batch.status != "finished" and self.clock.now() >= batch.submitted_at + self.batch_seconds:
                self._run_batch(batch)
            elif batch.status == "pending":
                batch.status = "started"
            return _json(self._batch_view(batch))

    def _run_batch(self, batch: _Batch) -> None:
        for op in batch.operations:
            match = _MEMBER.match("/3.0" + str(op.get("path", "")))
            try:
                if not match or match.group(1) != self.list_id:
                    raise _Problem(404, "Resource Not Found", "The requested resource could not be found.")
                body = json.loads(op["body"]) if op.get("body") else None
                status, payload = self._member_op(str(op.get("method", "")).upper(), match.group(2), body, "api")
            except _Problem as exc:
                status, payload = exc.status, {"title": exc.title, "status": exc.status, "detail": exc.detail}
            except (ValueError, KeyError):
                status, payload = 400, {"title": "Invalid Resource", "status": 400}
            batch.results.append(
                {"status_code": status, "operation_id": op.get("operation_id"), "response": json.dumps(payload)}
            )
        batch.status = "finished"
        batch.completed_at = self.clock.now()
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
            raw = json.dumps(batch.results).encode()
            info = tarfile.TarInfo(f"{batch.id}/{uuid.uuid4().hex}.json")
            info.size = len(raw)
            archive.addfile(info, io.BytesIO(raw))
        self._archives[batch.id] = buffer.getvalue()

    def _batch_view(self, batch: _Batch) -> Json:
        finished = batch.status == "finished"
        return {
            "id": batch.id,
            "status": batch.status,
            "total_operations": len(batch.operations),
            "finished_operations": len(batch.results),
            "errored_operations": sum(1 for r in batch.results if r["status_code"] >= 400),
            "submitted_at": datetime.fromtimestamp(batch.submitted_at, UTC).isoformat(),
            "completed_at": datetime.fromtimestamp(batch.completed_at, UTC).isoformat() if batch.completed_at else "",
            "response_body_url": f"{self.base_url}/batch-results/{batch.id}" if finished else "",
        }

    def _archive(self, batch_id: str) -> Response:
        with self._lock:
            data = self._archives.get(batch_id)
        if data is None:
            return Response(b"", 404)
        return Response(data, 200, mimetype="application/x-gzip")

    # --- events ------------------------------------------------------------------------------------

    def _event_data(self, row: Json, **extra: str) -> Json:
        return {
            **extra,
            "id": row["unique_email_id"],
            "email": row["email_address"],
            "email_type": "html",
            "list_id": self.list_id,
            "ip_opt": "203.0.113.7",
            "web_id": str(row["web_id"]),
            "merges": dict(row["merge_fields"]),
        }

    def _fire(self, kind: str, data: Json, source: str = "user") -> None:
        self._pending.append((kind, {**data, "_source": source}))

    def _now_iso(self) -> str:
        return datetime.fromtimestamp(self.clock.now(), UTC).isoformat()

    @staticmethod
    def _problem(exc: _Problem) -> Response:
        body: Json = {
            "type": "https://mailchimp.com/developer/marketing/docs/errors/",
            "title": exc.title,
            "status": exc.status,
            "detail": exc.detail,
            "instance": str(uuid.uuid4()),
        }
        if exc.errors:
            body["errors"] = exc.errors
        return Response(json.dumps(body), exc.status, mimetype="application/problem+json")


def _flatten(prefix: str, value: Any) -> list[tuple[str, str]]:
    if isinstance(value, dict):
        return [pair for k, v in value.items() for pair in _flatten(f"{prefix}[{k}]", v)]
    return [(prefix, "" if value is None else str(value))]


def _json(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body, ensure_ascii=False), status, mimetype="application/json")
