"""Hostile input to every parser: property-based (hypothesis), so the inputs are not only the ones we
thought of. Each parser either returns a valid result or raises its own documented error; anything
else (a KeyError, a TypeError, a crash half-way) is a defect. The example count comes from the
hypothesis profile in conftest.py (small in ``make test``, ``CLINICSYNC_HYPOTHESIS=large`` for more).
"""

from __future__ import annotations

import base64
import contextlib
import json
import socket
import threading
from typing import Any
from urllib.parse import quote
from xml.etree.ElementTree import Element

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError
from urllib3 import encode_multipart_formdata

from clinicsync.adapters.http.forms import MAX_BODY_BYTES, MAX_DEPTH, FormError, parse_form, parse_php_form
from clinicsync.adapters.ident.contract import ConnectorBatch, TicketQuery, TimeTable, parse_ident_datetime
from clinicsync.adapters.infoclinica.api import InfoClinicaApi, InfoClinicaError, UnsafeXml, parse_xml
from clinicsync.adapters.infoclinica.source import InfoClinicaSource
from clinicsync.adapters.medods.source import MedodsApi, MedodsError, MedodsSource
from clinicsync.domain.config import MisConnection
from clinicsync.domain.dates import parse_mis_date, parse_mis_datetime
from clinicsync.domain.models import PatientChanges
from clinicsync.domain.ports import ChangePage
from tests.helpers import MSK, demo_config

# Text that breaks naive parsers: brackets, separators, escapes, non-ASCII digits ("²" is isdigit()
# but not int()), control characters, surrogate-free unicode.
NASTY = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", " ", "[", "]", "[]", "][", "%", "%%", "%ZZ", "&", "=", "²", "٣", "１", "-1", "1e9", "NaN"]),
    st.sampled_from(["9" * 30, "0", "00", "\x00", "\u202e", "a" * 300, "<", "&amp;", "]]>", "\ud7ff"]),
)
SEGMENT = st.one_of(st.sampled_from(["", "0", "1", "id", "FIELDS", "ID", "status", "account"]), NASTY)


# --- form-encoded bodies with bracket keys (Bitrix24, amoCRM; Mailchimp uses the same parser) ---------


@st.composite
def bracket_forms(draw: st.DrawFn) -> bytes:
    pairs = []
    for _ in range(draw(st.integers(0, 12))):
        root = draw(st.one_of(st.sampled_from(["event", "data", "auth", "leads", "contacts", "account"]), NASTY))
        path = draw(st.lists(SEGMENT, max_size=MAX_DEPTH + 3))
        key = root + "".join(f"[{p}]" for p in path)
        encoded = quote(key, safe="[]") if draw(st.booleans()) else key
        pairs.append(f"{encoded}={quote(draw(NASTY))}")
    return "&".join(pairs).encode()


def _check_form(body: bytes) -> None:
    try:
        tree = parse_php_form(body)
    except FormError as exc:
        assert str(exc)  # a message we can return to the sender
        return
    assert isinstance(tree, dict)
    _assert_tree(tree, depth=1)


def _assert_tree(node: dict[str, Any], depth: int) -> None:
    assert depth <= MAX_DEPTH
    for key, value in node.items():
        assert isinstance(key, str)
        if isinstance(value, dict):
            _assert_tree(value, depth + 1)
        else:
            assert isinstance(value, str)


@given(bracket_forms())
def test_bracket_forms_parse_or_are_refused(body: bytes) -> None:
    _check_form(body)


@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_a_form_parse_or_are_refused(body: bytes) -> None:
    _check_form(body)


# --- multipart/form-data (RFC 7578), as RFC 8058 §8.3 posts a one-click unsubscribe ---------------------

_FIELD_NAMES = st.text(st.characters(codec="utf-8", exclude_characters='[]"\\\r\n\0'), min_size=1, max_size=12)
_FIELD_VALUES = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)


def _event(content_type: str, body: bytes) -> dict[str, Any]:
    return {"headers": {"content-type": content_type}, "body": body.decode(), "isBase64Encoded": False}


def _multipart(fields: dict[str, str], boundary: str = "---FormBoundaryjWmhtjORrn") -> tuple[str, bytes]:
    """Encoded by urllib3's multipart encoder: a real client's bytes, not ours."""
    body, content_type = encode_multipart_formdata(fields, boundary=boundary)
    return content_type, body


def _b64_event(content_type: str, body: bytes) -> dict[str, Any]:
    return {"headers": {"Content-Type": content_type}, "body": base64.b64encode(body).decode(), "isBase64Encoded": True}


def test_rfc_8058_multipart_example_reads_as_one_click() -> None:
    body = (
        b"-----FormBoundaryjWmhtjORrn\r\n"
        b'Content-Disposition: form-data; name="List-Unsubscribe"\r\n\r\n'
        b"One-Click\r\n"
        b"-----FormBoundaryjWmhtjORrn--\r\n"
    )
    form = parse_form(_b64_event("multipart/form-data; boundary=---FormBoundaryjWmhtjORrn", body))
    assert form == {"List-Unsubscribe": "One-Click"}


@given(fields=st.dictionaries(_FIELD_NAMES.filter(lambda n: "[" not in n), _FIELD_VALUES, min_size=1, max_size=5))
def test_any_multipart_form_reads_as_its_fields(fields: dict[str, str]) -> None:
    content_type, body = _multipart(fields)
    assert parse_form(_b64_event(content_type, body)) == fields


@given(fields=st.dictionaries(_FIELD_NAMES, _FIELD_VALUES, min_size=1, max_size=3), data=st.data())
def test_a_truncated_multipart_form_is_refused_whole(fields: dict[str, str], data: st.DataObject) -> None:
    """Never half-read: a body cut anywhere before its closing boundary is refused, not read in part."""
    content_type, body = _multipart(fields)
    cut = data.draw(st.integers(0, body.rindex(b"--\r\n") - 1))
    with pytest.raises(FormError) as refused:
        parse_form(_b64_event(content_type, body[:cut]))
    assert refused.value.status == 400


@given(st.binary(max_size=400))
def test_arbitrary_bytes_as_a_multipart_form_parse_or_are_refused(body: bytes) -> None:
    try:
        _assert_tree(parse_form(_b64_event("multipart/form-data; boundary=xyz", body)), 1)
    except FormError as exc:
        assert exc.status == 400


def test_a_multipart_part_that_does_not_decode_is_refused() -> None:
    body = (
        b'--xyz\r\nContent-Disposition: form-data; name="a"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
        b"!!!notb64=\r\n--xyz--\r\n"
    )
    with pytest.raises(FormError, match="malformed"):
        parse_form(_b64_event("multipart/form-data; boundary=xyz", body))


@pytest.mark.parametrize("content_type", ["application/json", "text/plain", "multipart/mixed; boundary=x"])
def test_other_content_types_are_refused_with_415(content_type: str) -> None:
    with pytest.raises(FormError) as refused:
        parse_form(_event(content_type, b"List-Unsubscribe=One-Click"))
    assert refused.value.status == 415
    assert parse_form(_event("Application/X-WWW-Form-Urlencoded; charset=utf-8", b"a=1")) == {"a": "1"}


def test_form_limits_are_refused_cleanly() -> None:
    with pytest.raises(FormError, match="larger"):
        parse_php_form(b"a=" + b"x" * MAX_BODY_BYTES)
    with pytest.raises(FormError, match="nested"):
        parse_php_form("a" + "[x]" * MAX_DEPTH + "=1")
    with pytest.raises(FormError, match="UTF-8"):
        parse_php_form(b"event=\xff\xfe")
    with pytest.raises(FormError):
        parse_php_form("&".join(f"k{i}=1" for i in range(600)))  # more fields than we accept
    with pytest.raises(FormError, match="both a value and a group"):
        parse_php_form("a[b]=1&a[b][c]=2")


# Hook for the consent issue: the Mailchimp webhook and the unsubscribe token get their own parsers
# there. Add them here as (parser, its documented error) and the property below covers them too.
def _verify_link(text: str) -> None:
    from clinicsync.domain.unsubscribe_links import UnsubscribeTokens

    UnsubscribeTokens(b"k" * 32).verify(text)


# The consent issue's parsers: unsubscribe tokens refuse with TokenError (a ValueError carrying the 4xx).
EXTRA_TEXT_PARSERS: list[tuple[Any, type[Exception]]] = [(_verify_link, ValueError)]


@pytest.mark.parametrize("parser_and_error", EXTRA_TEXT_PARSERS or [pytest.param(None, marks=pytest.mark.skip)])
@given(text=NASTY)
def test_further_text_parsers_refuse_cleanly(parser_and_error: Any, text: str) -> None:
    parser, error = parser_and_error
    with contextlib.suppress(error):
        parser(text)


# --- InfoClinica XML ------------------------------------------------------------------------------------


@given(st.binary(max_size=600))
def test_arbitrary_bytes_as_xml_parse_or_are_refused(raw: bytes) -> None:
    try:
        root = parse_xml(raw)
    except InfoClinicaError:  # UnsafeXml is one
        return
    assert isinstance(root, Element)


@given(st.one_of(st.binary(max_size=600), st.builds(lambda t: t.encode(), NASTY)), st.sampled_from([200, 400, 404]))
def test_any_infoclinica_answer_is_read_or_refused(raw: bytes, status: int) -> None:
    response = httpx.Response(status, content=raw)
    try:
        InfoClinicaApi._read("CLIENT_INFO", "m-1", response)
    except InfoClinicaError:
        return
    raise AssertionError("an answer that is not an acknowledged CLIENT_INFO_OUT was accepted")


class _RecordingServer:
    """A loopback listener that notes whether anyone connected (an external entity being fetched)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(4)
        self.sock.settimeout(0.2)
        self.connections = 0
        self.port = self.sock.getsockname()[1]
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


def test_xml_attacks_are_refused_and_nothing_is_fetched() -> None:
    server = _RecordingServer()
    url = f"http://127.0.0.1:{server.port}/evil"
    attacks = {
        "billion laughs": b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;'
        b'&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><ACK>&c;</ACK>',
        "quadratic blow-up": b'<!DOCTYPE r [<!ENTITY a "' + b"x" * 10_000 + b'">]><ACK>' + b"&a;" * 1000 + b"</ACK>",
        "XXE file": b'<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><ACK>&x;</ACK>',
        "XXE http": f'<!DOCTYPE r [<!ENTITY x SYSTEM "{url}">]><ACK>&x;</ACK>'.encode(),
        "parameter entity": f'<!DOCTYPE r [<!ENTITY % p SYSTEM "{url}"> %p;]><ACK/>'.encode(),
        "external DTD": f'<!DOCTYPE ACK SYSTEM "{url}"><ACK/>'.encode(),
        "public DTD": f'<!DOCTYPE ACK PUBLIC "-//x//y" "{url}"><ACK/>'.encode(),
        "utf-16 DTD": '<?xml version="1.0" encoding="UTF-16"?><!DOCTYPE r [<!ENTITY a "b">]><ACK>&a;</ACK>'.encode(
            "utf-16"
        ),
    }
    try:
        for name, payload in attacks.items():
            with pytest.raises(UnsafeXml):
                parse_xml(payload)
            assert server.connections == 0, name
    finally:
        server.close()


class _FakeInfoClinica:
    """``InfoClinicaApi.call`` answering with XML built around hostile field values."""

    def __init__(self, answers: dict[str, str]) -> None:
        self.answers = answers
        self.requests = 0

    def call(self, method: str, fields: Any = ()) -> Element:
        self.requests += 1
        return parse_xml(
            f'<{method}_OUT xmlns="http://sdsys.ru/">{self.answers.get(method, "")}</{method}_OUT>'.encode()
        )


def _xml_text(value: str) -> str:
    return "".join(c for c in value if c.isprintable()).replace("&", "&amp;").replace("<", "&lt;")


IC_FIELDS = ["CHANGEID", "SCHEDID", "PCODE", "BHOUR", "BMIN", "FHOUR", "FMIN", "WORKDATE", "MODIFYDATE", "PRICE"]
IC_FIELDS += ["SCHEDSTATUS", "CREATEDATE", "BDATE", "PPHONE", "PMAIL", "GENDER", "ARCHIVED", "LASTNAME", "PNAME"]


@st.composite
def ic_records(draw: st.DrawFn) -> str:
    fields = draw(st.dictionaries(st.sampled_from(IC_FIELDS), NASTY, max_size=len(IC_FIELDS)))
    plausible = {"CHANGEID": "7", "SCHEDID": "11", "PCODE": "5", "BHOUR": "10", "BMIN": "0", "WORKDATE": "20261120"}
    plausible |= {"MODIFYDATE": "20.11.2026 10:00:00", "SCHEDSTATUS": "1"}
    merged = {**plausible, **fields} if draw(st.booleans()) else fields
    return "".join(f"<{k}>{_xml_text(v)}</{k}>" for k, v in merged.items())


@given(ic_records(), ic_records(), st.sampled_from(["", "<RECORDSDATA><ITEMSNUMBER>²</ITEMSNUMBER></RECORDSDATA>"]))
def test_infoclinica_change_queue_with_hostile_records(change: str, record: str, total: str) -> None:
    api = _FakeInfoClinica(
        {
            "SCHEDULE_CHANGE_LIST": f"<CHANGE_INFO>{change}</CHANGE_INFO>{total}",
            "CLIENTS_CHANGE_LIST": f"<CLIENT_CHANGE_INFO>{change}</CLIENT_CHANGE_INFO>",
            "SCHEDULE_INFO": f"<SCHEDULEREC>{record}</SCHEDULEREC>",
            "CLIENT_INFO": f"<CLIENT_MAININFO>{record}</CLIENT_MAININFO>",
            "SCHEDULE_LIST": f"<SCHEDULEREC>{record}</SCHEDULEREC>{total}",
        }
    )
    mis = MisConnection(kind="infoclinica", base_url="https://ic.test/api/xml", secret_ref="x")
    source = InfoClinicaSource(api, demo_config().model_copy(update={"mis": mis}))  # type: ignore[arg-type]
    for cursor in (None, {"mode": "window", "bdate": "20261101", "fdate": "20261130", "row": 1}):
        try:
            page = source.fetch_changes(cursor)
        except InfoClinicaError:
            continue
        _assert_page(page)
        json.dumps(page.cursor)  # the cursor is stored as JSON


def _assert_page(page: ChangePage) -> None:
    assert page.rejected >= 0
    for item in page.changes:
        assert isinstance(item, PatientChanges)
        PatientChanges.model_validate(item.model_dump())  # still valid when re-read off the queue


# --- MEDODS JSON ----------------------------------------------------------------------------------------

JSONISH = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63), st.floats(allow_nan=False), NASTY),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(NASTY, inner, max_size=4)),
    max_leaves=12,
)
CLIENT_KEYS = ["id", "name", "surname", "phone", "email", "birthdate", "sex", "updatedAt", "archived", "denyCalls"]
APPT_KEYS = ["id", "clientId", "date", "time", "duration", "status", "price", "updatedAt", "deletedAt", "userId"]


@st.composite
def medods_rows(draw: st.DrawFn, keys: list[str], base: dict[str, Any]) -> Any:
    if draw(st.integers(0, 5)) == 0:
        return draw(JSONISH)
    row = dict(base) if draw(st.booleans()) else {}
    row |= draw(st.dictionaries(st.sampled_from(keys), st.one_of(JSONISH, NASTY), max_size=4))
    return row


CLIENT = {"id": 5, "name": "Мария", "surname": "Иванова", "phone": "+79161234567", "updatedAt": 1_700_000_000}
APPT = {
    "id": 11,
    "clientId": 5,
    "date": "2026-11-20",
    "time": "10:00",
    "status": "approved",
    "updatedAt": 1_700_000_000,
}


@st.composite
def medods_bodies(draw: st.DrawFn, keys: list[str], base: dict[str, Any]) -> bytes:
    choice = draw(st.integers(0, 6))
    if choice == 0:
        return draw(st.binary(max_size=200))
    if choice == 1:
        return json.dumps(draw(JSONISH)).encode()
    rows = draw(st.lists(medods_rows(keys, base), max_size=4))
    return json.dumps({"data": rows}).encode()


@given(medods_bodies(APPT_KEYS, APPT), medods_bodies(CLIENT_KEYS, CLIENT), medods_bodies(CLIENT_KEYS, CLIENT))
def test_medods_feed_with_hostile_json(appointments: bytes, clients: bytes, one_client: bytes) -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path.endswith("/appointments"):
            body = appointments if request.url.params.get("offset") == "0" else b'{"data": []}'
        elif path.endswith("/clients"):
            body = clients if request.url.params.get("offset") == "0" else b'{"data": []}'
        else:
            body = one_client
        return httpx.Response(200, content=body)

    http = httpx.Client(transport=httpx.MockTransport(answer))
    api = MedodsApi("https://medods.test/api/v2", "iss", "k" * 64, http=http, sleep=lambda _: None)
    config = demo_config().model_copy(update={"mis": demo_config().mis.model_copy(update={"page_size": 3})})
    try:
        page = MedodsSource(api, config).fetch_changes(None)
    except MedodsError:
        return
    _assert_page(page)
    json.dumps(page.cursor)


# --- IDENT and the shared MIS dates ----------------------------------------------------------------------


@given(
    st.one_of(NASTY, st.from_regex(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(:\d{2})?([.,]\d{1,9})?\s*(Z|[+\- ]\d{2}:?\d{2})"))
)
def test_ident_dates_parse_or_are_refused(raw: str) -> None:
    try:
        parsed = parse_ident_datetime(raw)
    except ValueError:
        return
    assert parsed.tzinfo is not None


@given(st.one_of(NASTY, st.from_regex(r"\d{1,2}\.\d{2}\.\d{4}( \d{1,2}:\d{2}(:\d{2})?)?|\d{8,14}", fullmatch=True)))
def test_mis_dates_parse_or_are_refused(raw: str) -> None:
    try:
        parsed = parse_mis_datetime(raw, MSK)
        parse_mis_date(raw)
    except ValueError:
        return
    assert parsed.tzinfo is not None


@given(st.dictionaries(st.sampled_from(["dateTimeFrom", "dateTimeTo", "limit", "offset", "x"]), NASTY))
def test_ticket_queries_validate_or_are_refused(query: dict[str, str]) -> None:
    with contextlib.suppress(ValidationError):
        TicketQuery.model_validate(query)


@given(st.one_of(st.binary(max_size=300), st.builds(lambda v: json.dumps(v).encode(), JSONISH)))
def test_timetables_and_connector_batches_validate_or_are_refused(raw: bytes) -> None:
    for model in (TimeTable, ConnectorBatch):
        with contextlib.suppress(ValidationError):
            model.model_validate_json(raw)


@given(
    st.fixed_dictionaries(
        {
            "batch_id": st.one_of(st.just("b-1"), NASTY),
            "connector_id": st.one_of(st.just("c-1"), NASTY),
            "produced_at": st.one_of(st.just("2026-11-20T10:00:00+03:00"), NASTY),
            "changes": st.lists(
                st.fixed_dictionaries(
                    {"patient": st.one_of(st.just({"mis_id": "5", "version": 1}), JSONISH)},
                    optional={"appointments": st.lists(JSONISH, max_size=2)},
                ),
                max_size=2,
            ),
        }
    )
)
def test_connector_batches_of_nearly_valid_shape(batch: dict[str, Any]) -> None:
    try:
        parsed = ConnectorBatch.model_validate_json(json.dumps(batch))
    except ValidationError:
        return
    for item in parsed.changes:
        assert isinstance(item, PatientChanges)
