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
