"""Mailchimp Marketing API v3: member unsubscribes and the audience sync. It only translates.

Facts relied on (looked up, see docs/consent.md): the API key ends in ``-<dc>`` which names the host
``https://<dc>.api.mailchimp.com/3.0``; HTTP Basic auth with any user name and the key; a member is
``/lists/{list_id}/members/{subscriber_hash}`` (MD5 of the trimmed, lower-cased e-mail), PATCH updates an
existing member, PUT upserts with ``status_if_new``; at most 10 simultaneous connections per account
(429 beyond); bulk writes go through ``POST /batches`` (asynchronous: pending → started → finished, the
per-operation results in a gzipped tar at ``response_body_url``). Errors are problem+json documents.
"""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import httpx

from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.domain.audience import AudienceMember, subscriber_hash
from clinicsync.observability import logger
from clinicsync.retrying import exponential, poll

BATCH_OPERATIONS = 500  # operations per POST /batches; we stay well under the documented ceiling


class MailchimpError(Exception):
    def __init__(self, status: int, title: str) -> None:
        super().__init__(f"Mailchimp HTTP {status}: {title}")
        self.status = status
        self.title = title


def api_root(api_key: str, base_url: str | None = None) -> str:
    if base_url:
        return base_url.rstrip("/")
    _, _, dc = api_key.rpartition("-")
    if not dc.isalnum():
        raise ValueError("Mailchimp API key has no data-centre suffix")
    return f"https://{dc}.api.mailchimp.com/3.0"


class MailchimpClient:
    """One request at a time per container (the account allows 10 at once across all callers)."""

    def __init__(
        self,
        api_key: str,
        http: httpx.Client,
        base_url: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
        attempts: int = 4,
    ) -> None:
        self._root = api_root(api_key, base_url)
        self._auth = httpx.BasicAuth("clinicsync", api_key)
        self._http = http
        self._sleep = sleep
        self._attempts = attempts
        self.requests = 0

    def call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> tuple[int, Any]:
        """(status, JSON body). 429 and 5xx are retried with backoff; 4xx come back to the caller."""

        def send() -> httpx.Response:
            self.requests += 1
            try:
                return self._http.request(method, self._root + path, json=body, auth=self._auth)
            except httpx.TransportError as exc:
                if method == "POST" and path == "/batches":
                    raise MailchimpError(0, "batch outcome unknown") from exc  # never submit a batch twice
                raise

        return send_with_retries(
            send,
            lambda response: (response.status_code, response.json() if response.content else None),
            vendor="mailchimp",
            attempts=self._attempts,
            wait=exponential(0.5, cap=8.0),
            sleep=self._sleep,
            exhausted=lambda _: MailchimpError(503, "retries exhausted"),
            wait_after_last=True,
        )

    def download(self, url: str) -> bytes:
        self.requests += 1
        response = self._http.get(url)
        response.raise_for_status()
        return response.content


class MailchimpAudience:
    def __init__(
        self,
        client: MailchimpClient,
        list_id: str,
        sleep: Callable[[float], None] = time.sleep,
        wait_seconds: float = 20.0,
    ) -> None:
        self._client = client
        self._list = list_id
        self._sleep = sleep
        self._wait = wait_seconds

    def _member_path(self, member: str) -> str:
        return f"/lists/{self._list}/members/{member}"

    def unsubscribe(self, email: str) -> bool:
        return self.unsubscribe_member(subscriber_hash(email))

    def unsubscribe_member(self, member: str) -> bool:
        status, body = self._client.call("PATCH", self._member_path(member), {"status": "unsubscribed"})
        if status == 404:
            return False  # not in the audience (or moved to another address): nothing to stop
        if status == 400:
            # A cleaned or archived member cannot be unsubscribed; it is not mailed either.
            logger.info("mailchimp member not unsubscribable", extra={"title": str((body or {}).get("title", ""))})
            return False
        if status >= 400:
            raise MailchimpError(status, str((body or {}).get("title", "")))
        return True

    def _operation(self, m: AudienceMember) -> dict[str, str]:
        member = m.member or subscriber_hash(m.email)
        if m.keep_address:  # Mailchimp moved this member to the address the person chose: merge fields only
            body: dict[str, Any] = {"merge_fields": dict(m.merge_fields)}
        elif m.new:  # the person's first member
            body = {
                "email_address": m.email.strip(),
                "status_if_new": "subscribed",
                "merge_fields": dict(m.merge_fields),
            }
        else:  # the person's member, maybe moved to the MIS's new address; a PATCH never creates one
            body = {"email_address": m.email.strip(), "merge_fields": dict(m.merge_fields)}
        return {
            "method": "PUT" if m.new else "PATCH",
            "path": self._member_path(member),
            "operation_id": m.patient_id,
            "body": json.dumps(body, ensure_ascii=False),
        }

    def upsert(self, members: Sequence[AudienceMember]) -> set[str]:
        """PUT a person's first member with ``status_if_new: subscribed``; PATCH a member the person has
        (its address and merge fields; never its status, so nobody unsubscribed is ever re-subscribed, and
        a member Mailchimp moved or deleted meanwhile answers 404 instead of being re-created), in batches
        of at most 500 operations. Returns the patient ids Mailchimp accepted; the rest are retried on
        their next sync."""
        accepted: set[str] = set()
        for start in range(0, len(members), BATCH_OPERATIONS):
            chunk = members[start : start + BATCH_OPERATIONS]
            operations = [self._operation(m) for m in chunk]
            status, body = self._client.call("POST", "/batches", {"operations": operations})
            if status >= 400 or not isinstance(body, dict):
                raise MailchimpError(status, str((body or {}).get("title", "")))
            accepted |= self._results(str(body["id"]))
        return accepted

    def _results(self, batch_id: str) -> set[str]:
        deadline = time.monotonic() + self._wait

        def batch() -> dict[str, Any]:
            status, body = self._client.call("GET", f"/batches/{batch_id}")
            if status >= 400 or not isinstance(body, dict):
                raise MailchimpError(status, "batch status unavailable")
            return body

        body = poll(
            batch,
            until=lambda answer: answer.get("status") == "finished",
            wait=exponential(0.2, cap=2.0),
            sleep=self._sleep,
            stop=lambda _: time.monotonic() > deadline,
        )
        if body.get("status") != "finished":
            logger.info("mailchimp batch still running; members are retried on their next sync")
            return set()
        url = body.get("response_body_url")
        if not url:
            return set()
        ok: set[str] = set()
        with tarfile.open(fileobj=io.BytesIO(self._client.download(str(url))), mode="r:gz") as archive:
            for entry in archive.getmembers():
                handle = archive.extractfile(entry) if entry.isfile() else None
                if handle is None:
                    continue
                for result in json.loads(handle.read() or b"[]"):
                    if int(result.get("status_code", 0)) < 300:
                        ok.add(str(result.get("operation_id")))
        return ok
