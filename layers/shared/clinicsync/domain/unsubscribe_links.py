"""One-click unsubscribe links (RFC 8058): signed, canonical tokens that carry a patient id and a channel,
and the List-Unsubscribe headers a mailer puts on each message. Nothing needs storing to check a token."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from clinicsync.domain.models import Channel


class TokenError(ValueError):
    """A link we refuse; ``reason`` is plain text safe to show, ``status`` the HTTP answer."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class LinkClaim:
    patient_id: str
    channel: Channel
    expires_at: int  # 0: never


_LINK_FORMAT_VERSION = 1


_CHANNEL_CODES = {c: i for i, c in enumerate(Channel)}


_MAC_BYTES = 16


MAX_TOKEN_CHARS = 160


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    if not text or any(c not in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_" for c in text):
        raise ValueError("not base64url")
    raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    # Canonical only: base64 ignores a last character's unused low bits, so an edited token could
    # decode to the same bytes (and verify). Exactly one spelling per token is accepted.
    if _b64(raw) != text:
        raise ValueError("not canonical base64url")
    return raw


class UnsubscribeTokens:
    """``<payload>.<mac>``, both base64url. The payload is version, list (channel), expiry and the MIS
    patient id: no name, phone or e-mail. The MAC is HMAC-SHA256 under the clinic's link key, cut to
    128 bits, so a forged or edited token fails and nothing needs storing to check one."""

    def __init__(self, key: bytes, ttl_seconds: int | None = None, clock: Callable[[], float] = time.time) -> None:
        if len(key) < 16:
            raise ValueError("link key must be at least 16 bytes")
        self._key = key
        self._ttl = ttl_seconds
        self._clock = clock

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, b"unsubscribe-link\x00" + payload, hashlib.sha256).digest()[:_MAC_BYTES]

    def issue(self, patient_id: str, channel: Channel = Channel.EMAIL) -> str:
        expires = int(self._clock()) + self._ttl if self._ttl else 0
        pid = patient_id.encode()
        if not 0 < len(pid) <= 64:
            raise ValueError("patient id must be 1..64 bytes")
        payload = struct.pack(">BBI", _LINK_FORMAT_VERSION, _CHANNEL_CODES[channel], expires) + pid
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def verify(self, token: str) -> LinkClaim:
        if len(token) > MAX_TOKEN_CHARS or token.count(".") != 1:
            raise TokenError(400, "malformed link")
        head, tail = token.split(".")
        try:
            payload, mac = _unb64(head), _unb64(tail)
        except ValueError as exc:
            raise TokenError(400, "malformed link") from exc
        if len(payload) < 7 or len(mac) != _MAC_BYTES:
            raise TokenError(400, "malformed link")
        if not hmac.compare_digest(mac, self._mac(payload)):
            raise TokenError(403, "this link was not issued by us or has been altered")
        version, code, expires = struct.unpack(">BBI", payload[:6])
        channels = list(Channel)
        if version != _LINK_FORMAT_VERSION or code >= len(channels):
            raise TokenError(400, "unsupported link version")
        if expires and expires < self._clock():
            raise TokenError(410, "this link has expired")
        try:
            patient_id = payload[6:].decode()
        except UnicodeDecodeError as exc:
            raise TokenError(400, "malformed link") from exc
        return LinkClaim(patient_id, channels[code], expires)


def list_unsubscribe_headers(base_url: str, token: str, mailto: str | None = None) -> dict[str, str]:
    """The two RFC 8058 headers for one recipient. The URL must be HTTPS (loopback HTTP only for the
    local runtime); keep the header on one line: folding it broke DKIM checks for some senders."""
    parts = urlsplit(base_url)
    loopback = parts.hostname in ("127.0.0.1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ValueError("List-Unsubscribe needs an https URL")
    targets = [f"<{base_url.rstrip('/')}/unsubscribe/{token}>"]
    if mailto:
        targets.append(f"<mailto:{mailto}?subject=unsubscribe>")
    return {"List-Unsubscribe": ", ".join(targets), "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"}
