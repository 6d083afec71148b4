"""Keyed hashing: how PII is indexed and compared without being stored in clear."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

from clinicsync.domain.emails import normalise_email


class KeyedHasher:
    """HMAC-SHA256 under the clinic's key (from its secret), domain-separated per purpose.

    A plain hash of a phone number is reversible by enumeration (there are only ~10^10 numbers);
    a keyed HMAC is not without the key, which never leaves Secrets Manager.
    """

    def __init__(self, key: bytes) -> None:
        if len(key) < 16:
            raise ValueError("hash key must be at least 16 bytes")
        self._key = key

    def _digest(self, purpose: str, value: str) -> str:
        mac = hmac.new(self._key, purpose.encode() + b"\x00" + value.encode(), hashlib.sha256)
        return mac.hexdigest()[:40]

    def phone_key(self, e164: str) -> str:
        return self._digest("phone", e164)

    def email_key(self, email: str) -> str:
        return self._digest("email", normalise_email(email) or "")

    def content_hash(self, payload: Any) -> str:
        """Hash of what we would write to the CRM: equal hash means the write would change nothing."""
        canonical = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
        return self._digest("content", canonical)


def constant_time_equals(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def credential_matches(given: str | None, configured: object) -> bool:
    """An inbound credential against the clinic's setting, failing closed: a setting that is missing or
    empty matches nothing (else an absent ``account_id`` would accept any request without one)."""
    expected = str(configured or "")
    return bool(expected) and constant_time_equals(given, expected)
