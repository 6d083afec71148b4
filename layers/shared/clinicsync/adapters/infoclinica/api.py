"""InfoClinica (SDS) XML transport: the envelope, defused parsing, mutual TLS and retries.

Transport: XML POSTed to the API URL (``…/api/xml``) over HTTPS with the clinic's client certificate,
one call per ``InfoClinicaApi.call``; ``source.py`` turns the answers into a ``MisSource``. Every
response is parsed with defusedxml with DTDs forbidden, so entity expansion (billion laughs) and external
entities (XXE) are refused with :class:`UnsafeXml` before anything is expanded or fetched. ``ssl`` loads
certificates only from files, so the PEMs are written to a private temporary directory (mode 0700, files
0600), loaded into an ``ssl.SSLContext`` and deleted at once; httpx gets the context.
"""

from __future__ import annotations

import html
import os
import re
import ssl
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from defusedxml import DefusedXmlException
from defusedxml.ElementTree import ParseError
from defusedxml.ElementTree import fromstring as _defused_fromstring

from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.retrying import exponential

if TYPE_CHECKING:
    from xml.etree.ElementTree import Element


NS = "http://sdsys.ru/"


DEFAULT_SYSTEM_ID = "clinicsync"


MAX_RESPONSE_BYTES = 20 * 1024 * 1024


type XmlValue = str | int | Sequence[tuple[str, XmlValue]]


type XmlFields = Sequence[tuple[str, XmlValue]]


Record = dict[str, str]


_METHOD = re.compile(r"[A-Z][A-Z0-9_]{1,63}")


_TAG = re.compile(r"[A-Z][A-Z0-9_.]{0,63}")


class InfoClinicaError(Exception):
    """A call failed: transport, HTTP status, envelope, malformed or unsafe XML. Never holds PII."""


class UnsafeXml(InfoClinicaError):
    """The response carried a DTD (entity expansion, external entities): refused before parsing it."""


class InfoClinicaRefused(InfoClinicaError):
    """The MIS answered but refused (``SPRESULT`` 0 or negative). ``comment`` is kept out of ``str()``:
    it is free text for humans and may name a patient."""

    def __init__(self, method: str, spresult: int, comment: str) -> None:
        super().__init__(f"{method} refused: SPRESULT={spresult}")
        self.method = method
        self.spresult = spresult
        self.comment = comment


def parse_xml(raw: bytes) -> Element:
    """Parse untrusted XML; any DTD (so any entity declaration) is refused."""
    try:
        root: Element = _defused_fromstring(raw, forbid_dtd=True, forbid_entities=True, forbid_external=True)
    except DefusedXmlException as exc:
        raise UnsafeXml(f"unsafe XML refused ({type(exc).__name__})") from None
    except ParseError:
        raise InfoClinicaError("malformed XML") from None
    return root


def local_name(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def children(parent: Element | None, name: str) -> Iterator[Element]:
    if parent is not None:
        yield from (el for el in parent if local_name(el.tag) == name)


def child(parent: Element | None, name: str) -> Element | None:
    return next(children(parent, name), None)


def text_at(parent: Element | None, *path: str) -> str | None:
    node = parent
    for name in path:
        node = child(node, name)
    return None if node is None else (node.text or "").strip()


def record(element: Element) -> Record:
    """A flat record (``SCHEDULEREC``, ``CLIENT_MAININFO``, ``CHANGE_INFO``) as tag -> stripped text."""
    return {local_name(el.tag): (el.text or "").strip() for el in element if len(el) == 0}


def _fields_xml(fields: XmlFields) -> str:
    parts: list[str] = []
    for tag, value in fields:
        if not _TAG.fullmatch(tag):
            raise ValueError(f"bad XML tag {tag!r}")
        inner = html.escape(str(value), quote=False) if isinstance(value, str | int) else _fields_xml(value)
        parts.append(f"<{tag}>{inner}</{tag}>")
    return "".join(parts)


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)


def tls_context(
    client_cert: str, client_key: str, *, key_password: str | None = None, ca_cert: str | None = None
) -> ssl.SSLContext:
    """A client context presenting the clinic's certificate; trusts ``ca_cert`` or the system store."""
    try:
        context = ssl.create_default_context(cadata=ca_cert) if ca_cert else ssl.create_default_context()
        with tempfile.TemporaryDirectory(prefix="clinicsync-mis-") as tmp:  # created 0700
            cert_path, key_path = Path(tmp) / "client.pem", Path(tmp) / "client.key"
            _write_private(cert_path, client_cert)
            _write_private(key_path, client_key)
            context.load_cert_chain(cert_path, key_path, password=key_password)
    except (ssl.SSLError, ValueError) as exc:
        raise InfoClinicaError(
            f"the client certificate, key or CA in the MIS secret is unusable ({exc!s:.80})"
        ) from None
    return context


def _secret_text(secret: Mapping[str, Any], key: str) -> str:
    value = secret.get(key)
    if not isinstance(value, str) or not value.strip():
        raise InfoClinicaError(f"the MIS secret has no {key!r}")
    return value


def _optional_text(secret: Mapping[str, Any], key: str) -> str | None:
    value = secret.get(key)
    return str(value) if value not in (None, "") else None


class InfoClinicaApi:
    """One XML call per ``call``: envelope out, ``ACK`` checked (``MSA``, ``SPRESULT``), ``{METHOD}_OUT`` back.

    Retries transport errors, 429 and 5xx with backoff (every method we use is a read or an idempotent
    acknowledgement); an envelope rejection, an unsafe or malformed answer or a refusal is raised at once.
    """

    def __init__(
        self,
        base_url: str,
        http: httpx.Client,
        *,
        clinic_host: str | None = None,
        filial: int | None = None,
        system_id: str = DEFAULT_SYSTEM_ID,
        tz: tzinfo = UTC,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> None:
        self._url = base_url
        self._http = http
        self._clinic_host = clinic_host
        self._filial = filial
        self._system_id = system_id
        self._tz = tz
        self._clock = clock
        self._sleep = sleep
        self._max_attempts = max_attempts
        self.requests = 0

    @classmethod
    def from_secret(
        cls,
        base_url: str,
        secret: Mapping[str, Any],
        *,
        tz: tzinfo = UTC,
        timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_attempts: int = 4,
    ) -> InfoClinicaApi:
        """Build the mutual-TLS client from the clinic's MIS secret (keys in the module docstring)."""
        context = tls_context(
            _secret_text(secret, "client_cert"),
            _secret_text(secret, "client_key"),
            key_password=_optional_text(secret, "key_password"),
            ca_cert=_optional_text(secret, "ca_cert"),
        )
        filial = _optional_text(secret, "filial")
        if filial is not None and not filial.isdigit():
            raise InfoClinicaError("the MIS secret's 'filial' must be a branch number")
        http = httpx.Client(verify=context, timeout=httpx.Timeout(timeout, connect=5.0))
        return cls(
            base_url,
            http,
            clinic_host=_optional_text(secret, "clinic_host"),
            filial=int(filial) if filial is not None else None,
            system_id=_optional_text(secret, "system_id") or DEFAULT_SYSTEM_ID,
            tz=tz,
            clock=clock,
            sleep=sleep,
            max_attempts=max_attempts,
        )

    def close(self) -> None:
        self._http.close()

    def envelope(self, method: str, message_id: str, fields: XmlFields = ()) -> str:
        if not _METHOD.fullmatch(method):
            raise ValueError(f"bad method name {method!r}")
        stamp = datetime.fromtimestamp(self._clock(), self._tz).strftime("%Y%m%d%H%M%S")
        filial = f"<MSH.99>{self._filial}</MSH.99>" if self._filial is not None else ""
        return (
            f'<?xml version="1.0" encoding="UTF-8"?>\n<WEB_{method} xmlns="{NS}">'
            f"<MSH><MSH.3>{html.escape(self._system_id, quote=False)}</MSH.3><MSH.7><TS.1>{stamp}</TS.1></MSH.7>"
            f"<MSH.9><MSG.1>WEB</MSG.1><MSG.2>{method}</MSG.2></MSH.9><MSH.10>{message_id}</MSH.10>"
            f"<MSH.18>UTF-8</MSH.18>{filial}</MSH>"
            f"<{method}_IN>{_fields_xml(fields)}</{method}_IN></WEB_{method}>"
        )

    def call(self, method: str, fields: XmlFields = ()) -> Element:
        """Send ``WEB_{method}``; return its ``{method}_OUT`` after checking the acknowledgement."""
        message_id = uuid.uuid4().hex[:24]
        payload = self.envelope(method, message_id, fields).encode("utf-8")
        headers = {"Content-Type": "text/xml; charset=utf-8", "Accept": "text/xml"}
        if self._clinic_host:
            headers["X-Forwarded-Host"] = self._clinic_host

        def send() -> httpx.Response:
            self.requests += 1
            return self._http.post(self._url, content=payload, headers=headers)

        return send_with_retries(
            send,
            lambda response: self._read(method, message_id, response),
            vendor="infoclinica",
            context={"method": method},
            attempts=self._max_attempts,
            wait=exponential(0.5, cap=8.0),
            sleep=self._sleep,
            exhausted=lambda failure: InfoClinicaError(f"{method}: retries exhausted ({failure})"),
        )

    @staticmethod
    def _read(method: str, message_id: str, response: httpx.Response) -> Element:
        if response.status_code not in (200, 400):
            raise InfoClinicaError(f"{method}: HTTP {response.status_code}")
        raw = response.content
        if len(raw) > MAX_RESPONSE_BYTES:
            raise InfoClinicaError(f"{method}: response larger than {MAX_RESPONSE_BYTES} bytes")
        try:
            root = parse_xml(raw)
        except UnsafeXml as exc:
            raise UnsafeXml(f"{method}: {exc}") from None
        except InfoClinicaError as exc:
            raise InfoClinicaError(f"{method}: HTTP {response.status_code}, {exc}") from None
        if local_name(root.tag) != "ACK":
            raise InfoClinicaError(f"{method}: answer is not an ACK")
        code = text_at(root, "MSA", "MSA.1")
        if code != "AA":
            raise InfoClinicaError(f"{method}: envelope rejected ({code}): {text_at(root, 'MSA', 'MSA.3') or ''}")
        if text_at(root, "MSA", "MSA.2") != message_id:
            raise InfoClinicaError(f"{method}: the answer acknowledges another message")
        out = child(root, f"{method}_OUT")
        if out is None:
            raise InfoClinicaError(f"{method}: {method}_OUT is missing")
        result_text = text_at(out, "SPRESULT") or ""
        if not re.fullmatch(r"-?\d{1,9}", result_text):
            raise InfoClinicaError(f"{method}: SPRESULT is missing or not a number")
        if int(result_text) < 1:
            raise InfoClinicaRefused(method, int(result_text), text_at(out, "SPCOMMENT") or "")
        return out
