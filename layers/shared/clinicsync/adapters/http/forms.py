"""Form-encoded bodies with PHP bracket keys (``data[FIELDS][ID]=5``), as Bitrix24, amoCRM and
Mailchimp send their webhooks. Bounded on purpose: hostile input gets a clear error, never a crash."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl

MAX_BODY_BYTES = 64 * 1024
MAX_FIELDS = 500
MAX_DEPTH = 10  # amoCRM: leads[status][0][custom_fields][0][values][0][value] is 8 deep
_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


class FormError(ValueError):
    """The body is not a form we accept; the message is safe to return to the sender."""

    def __init__(self, reason: str, status: int = 400) -> None:
        super().__init__(reason)
        self.status = status


def parse_php_form(body: str | bytes) -> dict[str, Any]:
    raw = body.encode() if isinstance(body, str) else body
    if len(raw) > MAX_BODY_BYTES:
        raise FormError(f"body larger than {MAX_BODY_BYTES} bytes")
    try:
        text = raw.decode("utf-8")
        pairs = parse_qsl(text, keep_blank_values=True, strict_parsing=bool(text), max_num_fields=MAX_FIELDS)
    except UnicodeDecodeError as exc:
        raise FormError("body is not UTF-8") from exc
    except ValueError as exc:
        raise FormError("body is not form-encoded") from exc
    return _tree(pairs)


def _tree(pairs: list[tuple[str, str]]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for key, value in pairs:
        match = _KEY.match(key)
        if not match:
            raise FormError("malformed field name")
        path = [match.group(1), *re.findall(r"\[([^\[\]]*)\]", match.group(2))]
        if len(path) > MAX_DEPTH:
            raise FormError("fields nested too deeply")
        _insert(tree, path, value)
    return tree


def _insert(tree: dict[str, Any], path: list[str], value: str) -> None:
    node = tree
    for index, part in enumerate(path):
        last = index == len(path) - 1
        name = part if part != "" else str(len(node))  # key[] appends
        if last:
            if isinstance(node.get(name), dict):
                raise FormError("a field is both a value and a group")
            node[name] = value
            return
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            raise FormError("a field is both a value and a group")
        node = child


def http_body(event: Mapping[str, Any]) -> bytes:
    """An HTTP API event's body exactly as sent. Never Powertools' ``decoded_body``: it decodes a base64
    body as UTF-8 and raises on anything else (a 500 where a 400 is due)."""
    body = str(event.get("body") or "")
    try:
        return base64.b64decode(body, validate=True) if event.get("isBase64Encoded") else body.encode()
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise FormError("the body is not valid base64 or text") from None


URLENCODED = "application/x-www-form-urlencoded"
MULTIPART = "multipart/form-data"


def parse_form(event: Mapping[str, Any]) -> dict[str, Any]:
    """An HTTP API event's form, by its Content-Type: urlencoded (also when none is sent) or
    multipart/form-data (RFC 7578; RFC 8058 §8.3 posts one-click so). Anything else is a 415."""
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    content_type = headers.get("content-type", "").strip()
    media = content_type.partition(";")[0].strip().lower()
    body = http_body(event)
    if media in ("", URLENCODED):
        return parse_php_form(body)
    if media == MULTIPART:
        return _tree(_multipart_pairs(content_type, body))
    raise FormError(f"unsupported content type; send {URLENCODED} or {MULTIPART}", status=415)


def _multipart_pairs(content_type: str, body: bytes) -> list[tuple[str, str]]:
    """The stdlib MIME parser reads the parts; any defect it notes (no boundary, no closing boundary, a
    broken part) refuses the whole body, so a truncated form is never half-read."""
    if len(body) > MAX_BODY_BYTES:
        raise FormError(f"body larger than {MAX_BODY_BYTES} bytes")
    if not content_type.isascii() or any(c in content_type for c in "\r\n\0"):
        raise FormError("malformed content type")
    # Imported here: the CRMs' and Mailchimp's webhooks are urlencoded, only a one-click POST may be multipart.
    from email import policy
    from email.parser import BytesParser

    message = BytesParser(policy=policy.HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body)
    if message.defects or not message.is_multipart() or not message.get_boundary():
        raise FormError("malformed multipart body")
    parts = list(message.iter_parts())
    if not parts or len(parts) > MAX_FIELDS:
        raise FormError("a multipart form needs 1 to 500 parts")
    pairs = []
    for part in parts:
        name = part.get_param("name", header="content-disposition")
        if part.defects or part.get_content_disposition() != "form-data" or not isinstance(name, str) or not name:
            raise FormError("every part needs Content-Disposition: form-data with a name")
        if part.get_filename() is not None or part.is_multipart():
            raise FormError("files are not accepted")
        payload = part.get_payload(decode=True)
        if part.defects:  # decoding notes its own (e.g. broken base64)
            raise FormError("malformed multipart body")
        try:
            value = payload.decode(part.get_content_charset() or "utf-8") if isinstance(payload, bytes) else ""
        except (LookupError, UnicodeDecodeError):
            raise FormError("a part is not in its declared charset") from None
        pairs.append((name, value))
    return pairs
