"""Signed requests between a clinic's on-premises connector and its stack.

The connector signs ``timestamp \\n method \\n path \\n body`` with HMAC-SHA256 under a key that lives in
the clinic's MIS secret and in the connector's config file, nowhere else. Method and path are signed so
a captured batch cannot be replayed against another route; the timestamp bounds replays to a few
minutes, and replaying a batch inside that window changes nothing (every sync write is idempotent).
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass

TIMESTAMP_HEADER = "X-Clinicsync-Timestamp"
SIGNATURE_HEADER = "X-Clinicsync-Signature"
SCHEME = "v1="
MAX_SKEW_SECONDS = 300


def _mac(key: bytes, timestamp: str, method: str, path: str, body: bytes) -> str:
    message = b"\n".join((timestamp.encode(), method.upper().encode(), path.encode(), body))
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign_request(key: bytes, timestamp: int, method: str, path: str, body: bytes) -> dict[str, str]:
    """The two headers a signed request carries."""
    stamp = str(int(timestamp))
    return {TIMESTAMP_HEADER: stamp, SIGNATURE_HEADER: SCHEME + _mac(key, stamp, method, path, body)}


@dataclass(frozen=True)
class Refusal:
    status: int
    reason: str


def verify_request(
    key: bytes, headers: dict[str, str], method: str, path: str, body: bytes, now: float
) -> Refusal | None:
    """None when the request is authentic and fresh; otherwise why not (for a plain-text 401)."""
    lowered = {k.lower(): v for k, v in headers.items()}
    stamp = lowered.get(TIMESTAMP_HEADER.lower(), "")
    given = lowered.get(SIGNATURE_HEADER.lower(), "")
    if not stamp or not given:
        return Refusal(401, "missing signature headers")
    if not (stamp.isascii() and stamp.isdigit()) or len(stamp) > 12:  # "²".isdigit() is True
        return Refusal(401, "malformed timestamp")
    if abs(now - int(stamp)) > MAX_SKEW_SECONDS:
        return Refusal(401, "timestamp outside the allowed window; check the connector's clock")
    expected = SCHEME + _mac(key, stamp, method, path, body)
    if not hmac.compare_digest(given.encode(), expected.encode()):
        return Refusal(401, "bad signature")
    return None
