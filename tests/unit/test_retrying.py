"""Retry mechanics: one tenacity-based helper, the project's classification of failures kept.

A lost write response is "outcome unknown" and never resent; requests that never ran, and reads, are
retried with each client's own attempt count and backoff (the waits below are the clients' contract)."""

from __future__ import annotations

import ast
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from clinicsync.adapters.amocrm.client import AmoCrmClient, AmoCrmOutcomeUnknown, AmoCrmUnavailable
from clinicsync.adapters.aws.table import batch_get_wire
from clinicsync.adapters.bitrix24.client import Bitrix24Client, Bitrix24OutcomeUnknown, Bitrix24Unavailable
from clinicsync.adapters.http.pacing import Pacer
from clinicsync.adapters.http.retrying import send_with_retries
from clinicsync.adapters.infoclinica.api import InfoClinicaApi, InfoClinicaError
from clinicsync.adapters.lis.source import LisApi, LisError
from clinicsync.adapters.mailchimp.client import MailchimpClient, MailchimpError
from clinicsync.adapters.medods.source import MedodsApi, MedodsError
from clinicsync.adapters.renovatio.source import RenovatioApi, RenovatioError
from clinicsync.adapters.vtiger.client import VtigerClient, VtigerError
from clinicsync.retrying import Replay, Transient, call_with_retries, exponential, poll

ROOT = Path(__file__).resolve().parents[2]


class OutcomeUnknown(Exception):
    """Stands for every client's lost-write error: not Transient, so never retried."""


# --- the helper, over every sequence of attempt outcomes ---------------------------------------------

_outcomes = st.lists(st.sampled_from(["transient", "replay", "unknown", "ok"]), min_size=1, max_size=8)


@given(_outcomes, st.integers(min_value=1, max_value=6), st.booleans())
def test_only_transient_and_replayed_attempts_are_repeated_and_only_transient_ones_wait(
    script: list[str], attempts: int, wait_after_last: bool
) -> None:
    calls: list[int] = []
    sleeps: list[float] = []

    def attempt(number: int) -> str:
        calls.append(number)
        outcome = script[min(number, len(script)) - 1]
        if outcome == "transient":
            raise Transient(f"t{number}")
        if outcome == "replay":
            raise Replay
        if outcome == "unknown":
            raise OutcomeUnknown(str(number))
        return f"ok{number}"

    wait = exponential(0.5, cap=4.0)
    # The model: run the script until a terminal outcome or the last attempt.
    ran = [script[min(n, len(script)) - 1] for n in range(1, attempts + 1)]
    end = next((i for i, o in enumerate(ran) if o in ("unknown", "ok")), attempts - 1)
    expected_sleeps = [wait(n) for n, o in enumerate(ran[:end], start=1) if o == "transient"]
    last = ran[end]
    if last == "transient" and wait_after_last:
        expected_sleeps.append(wait(end + 1))

    def run() -> str:
        return call_with_retries(
            attempt,
            attempts=attempts,
            wait=wait,
            sleep=sleeps.append,
            exhausted=lambda reason: RuntimeError(f"exhausted: {reason}"),
            wait_after_last=wait_after_last,
        )

    if last == "ok":
        assert run() == f"ok{end + 1}"
    elif last == "unknown":
        with pytest.raises(OutcomeUnknown):  # the caller's own error, unwrapped, at once
            run()
    else:
        with pytest.raises(RuntimeError, match="exhausted"):
            run()
    assert calls == list(range(1, end + 2))
    assert sleeps == expected_sleeps


class VendorRefused(Exception):
    """Stands for a vendor's own error, raised by its reader for an answer it refuses."""


_answers = st.lists(
    st.one_of(st.just("transport"), st.sampled_from([200, 204, 301, 400, 401, 404, 409, 422, 429, 500, 501, 503, 520])),
    min_size=1,
    max_size=6,
)


@given(_answers, st.integers(min_value=1, max_value=5))
def test_a_request_safe_to_repeat_is_sent_again_only_after_a_transport_error_a_429_or_a_5xx(
    script: list[str | int], attempts: int
) -> None:
    """The classification every MIS, LIS, Mailchimp and vTiger client shares: a transport error, 429 or a
    5xx is retried with the backoff, then the vendor's error names the last failure; any other answer
    goes to the reader once (which may refuse it: not retried)."""
    sent: list[int] = []
    read: list[int] = []
    sleeps: list[float] = []
    request = httpx.Request("GET", "https://mis.test/x")

    def send() -> httpx.Response:
        sent.append(len(sent) + 1)
        answer = script[min(len(sent), len(script)) - 1]
        if answer == "transport":
            raise httpx.ConnectError("refused", request=request)
        return httpx.Response(int(answer), request=request)

    def reader(response: httpx.Response) -> int:
        read.append(response.status_code)
        if response.status_code >= 400:
            raise VendorRefused(response.status_code)
        return response.status_code

    def run() -> int:
        return send_with_retries(
            send,
            reader,
            vendor="mis",
            attempts=attempts,
            wait=exponential(0.5),
            sleep=sleeps.append,
            exhausted=lambda reason: RuntimeError(f"exhausted: {reason}"),
        )

    ran = [script[min(n, len(script)) - 1] for n in range(1, attempts + 1)]
    retried = [answer == "transport" or int(answer) == 429 or int(answer) >= 500 for answer in ran]
    end = retried.index(False) if False in retried else attempts - 1
    last = ran[end]
    if retried[end]:
        reason = "ConnectError" if last == "transport" else f"HTTP {last}"
        with pytest.raises(RuntimeError, match=f"^exhausted: {reason}$"):
            run()
        assert read == []
    elif int(last) >= 400:
        with pytest.raises(VendorRefused):
            run()
        assert read == [last]
    else:
        assert run() == last
        assert read == [last]
    assert len(sent) == end + 1
    assert sleeps == [0.5 * 2 ** (n - 1) for n in range(1, end + 1)]


@given(st.integers(min_value=1, max_value=12), st.floats(min_value=0.0, max_value=8.0))
def test_a_poll_asks_until_the_answer_is_final_or_the_wait_budget_is_spent(ready_at: int, budget: float) -> None:
    """As the claim wait does: 0.1 s doubling to 1 s between probes, given up once ``budget`` s were slept."""
    probes: list[int] = []
    sleeps: list[float] = []

    def probe() -> int:
        probes.append(len(probes) + 1)
        return len(probes)

    wait = exponential(0.1, cap=1.0)
    answer = poll(probe, until=lambda n: n >= ready_at, wait=wait, sleep=sleeps.append, stop=lambda w: w >= budget)
    waited, expected = 0.0, 1
    while expected < ready_at and waited < budget:  # the model, written out
        waited += wait(expected)
        expected += 1
    assert answer == expected == len(probes)
    assert sleeps == [wait(n) for n in range(1, expected)]


def _sleeps(node: ast.AST) -> bool:
    return any(
        isinstance(call, ast.Call)
        and (
            (isinstance(call.func, ast.Attribute) and call.func.attr in ("sleep", "_sleep"))
            or (isinstance(call.func, ast.Name) and call.func.id == "sleep")
        )
        for call in ast.walk(node)
    )


def test_no_deployed_module_retries_or_polls_in_a_loop_of_its_own() -> None:
    """Retries are ``call_with_retries`` and polls are ``poll`` (tenacity): a loop over attempts, or a
    loop that sleeps, is a new hand-made one."""
    loops = []
    for root in (ROOT / "layers" / "shared", ROOT / "functions"):
        for path in sorted(root.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                over_attempts = (
                    isinstance(node, ast.For) and isinstance(node.target, ast.Name) and "attempt" in node.target.id
                )
                if over_attempts or (isinstance(node, ast.For | ast.While) and _sleeps(node)):
                    loops.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert loops == []


# --- each client: attempt counts, waits and the error at exhaustion ----------------------------------


def _http(handler: Callable[[httpx.Request], httpx.Response]) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


def _busy(request: httpx.Request) -> httpx.Response:
    return httpx.Response(503, text="busy")


def _lost(request: httpx.Request) -> httpx.Response:
    raise httpx.ReadTimeout("response lost", request=request)


class _Auth:
    def __init__(self) -> None:
        self.refreshes = 0

    def access_token(self) -> str:
        return f"token{self.refreshes}"

    def refresh(self, stale: str) -> str:
        self.refreshes += 1
        return self.access_token()

    def base_url(self) -> str:
        return "https://clinic.amocrm.test"


Call = Callable[[httpx.Client, Callable[[float], None]], Any]
READS: dict[str, tuple[Call, type[Exception], str, int, list[float]]] = {
    "bitrix24": (
        lambda http, sleep: Bitrix24Client(
            "https://x.bitrix24.test/rest/1/s/", http=http, pacer=Pacer(1e6, 1000), sleep=sleep
        ).call("crm.contact.list"),
        Bitrix24Unavailable,
        "crm.contact.list: retries exhausted",
        6,
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0],
    ),
    "medods": (
        lambda http, sleep: MedodsApi("https://m.test", "iss", "k" * 64, http=http, sleep=sleep).get("/x"),
        MedodsError,
        "GET /x: retries exhausted",
        4,
        [0.5, 1.0, 2.0, 4.0],
    ),
    "lis": (
        lambda http, sleep: LisApi("https://lis.test", "key", http, sleep=sleep).call("GET", "/x"),
        LisError,
        "retries_exhausted",
        3,
        [0.5, 1.0, 2.0],
    ),
    "mailchimp": (
        lambda http, sleep: MailchimpClient("key-us1", http, sleep=sleep).call("GET", "/lists"),
        MailchimpError,
        "retries exhausted",
        4,
        [0.5, 1.0, 2.0, 4.0],
    ),
    "infoclinica": (
        lambda http, sleep: InfoClinicaApi("https://ic.test/api", http, sleep=sleep).call("GET_FILIALS"),
        InfoClinicaError,
        r"GET_FILIALS: retries exhausted \(HTTP 503\)",
        4,
        [0.5, 1.0, 2.0],
    ),
    "renovatio": (
        lambda http, sleep: RenovatioApi("https://r.test", "key", http=http, sleep=sleep).call("getClinics"),
        RenovatioError,
        r"getClinics: retries exhausted \(HTTP 503\)",
        4,
        [0.5, 1.0, 2.0],
    ),
    "vtiger": (
        lambda http, sleep: VtigerClient("https://v.test", "u", "k", http, sleep=sleep).login(),
        VtigerError,
        "503",
        3,
        [0.5, 1.0],
    ),
}


@pytest.mark.parametrize("client", sorted(READS))
def test_a_busy_service_is_asked_again_with_the_clients_own_backoff_then_given_up(client: str) -> None:
    call, error, message, attempts, waits = READS[client]
    sent: list[httpx.Request] = []
    sleeps: list[float] = []

    def busy(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return _busy(request)

    with pytest.raises(error, match=message):
        call(_http(busy), sleeps.append)
    assert len(sent) == attempts
    assert sleeps == waits


def test_amocrm_backs_off_with_jitter_and_a_refresh_is_an_attempt_without_a_wait() -> None:
    sent: list[str] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["Authorization"])
        return httpx.Response(401 if len(sent) == 1 else 503)

    client = AmoCrmClient(_Auth(), _http(handler), Pacer(1e6, 1000), sleep=sleeps.append)
    with pytest.raises(AmoCrmUnavailable, match="GET /api/v4/leads: retries exhausted"):
        client.request("GET", "/api/v4/leads")
    assert sent == ["Bearer token0"] + ["Bearer token1"] * 5  # six attempts, the first one refreshed
    assert len(sleeps) == 5
    # The wait after attempt n is 2**(n-1) s times a jitter in [0.5, 1] (backoff 1 s).
    assert all(2 ** (n - 1) / 2 <= s <= 2 ** (n - 1) for n, s in enumerate(sleeps, start=2))


LOST_WRITES: dict[str, tuple[Call, type[Exception]]] = {
    "bitrix24": (
        lambda http, sleep: Bitrix24Client(
            "https://x.bitrix24.test/rest/1/s/", http=http, pacer=Pacer(1e6, 1000), sleep=sleep
        ).call("crm.contact.add", {"fields": {}}, writes=True),
        Bitrix24OutcomeUnknown,
    ),
    "amocrm": (
        lambda http, sleep: AmoCrmClient(_Auth(), http, Pacer(1e6, 1000), sleep=sleep).request(
            "POST", "/api/v4/contacts", json=[{}]
        ),
        AmoCrmOutcomeUnknown,
    ),
    "mailchimp": (
        lambda http, sleep: MailchimpClient("key-us1", http, sleep=sleep).call("POST", "/batches", {}),
        MailchimpError,
    ),
}


@pytest.mark.parametrize("client", sorted(LOST_WRITES))
@pytest.mark.parametrize("failure", ["timeout", "5xx"])
def test_a_write_whose_response_is_lost_is_never_resent(client: str, failure: str) -> None:
    if client == "mailchimp" and failure == "5xx":
        pytest.skip("Mailchimp answers a refused batch with 5xx before running it; only a lost answer is unknown")
    call, error = LOST_WRITES[client]
    sent: list[httpx.Request] = []
    sleeps: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request)
        return _lost(request) if failure == "timeout" else httpx.Response(504)

    with pytest.raises(error):
        call(_http(handler), sleeps.append)
    assert len(sent) == 1
    assert sleeps == []


class _Throttled:
    """A DynamoDB client whose ``BatchGetItem`` leaves every key but the first unprocessed ``stubborn`` times."""

    def __init__(self, stubborn: int) -> None:
        self.stubborn = stubborn
        self.requests = 0

    def batch_get_item(self, RequestItems: dict[str, Any]) -> dict[str, Any]:
        self.requests += 1
        keys = RequestItems["t"]["Keys"]
        first, rest = keys[:1], keys[1:]
        if self.requests > self.stubborn:
            first, rest = keys, []
        return {"Responses": {"t": [dict(k) for k in first]}, "UnprocessedKeys": {"t": {"Keys": rest}} if rest else {}}


@given(st.integers(min_value=0, max_value=12))
def test_unprocessed_keys_are_asked_again_with_backoff_eight_times_at_most(stubborn: int) -> None:
    keys = [{"pk": f"K#{i}", "sk": "S"} for i in range(20)]
    table = _Throttled(stubborn)
    sleeps: list[float] = []
    if stubborn < 8:
        found = batch_get_wire(table, "t", keys, sleeps.append)  # type: ignore[arg-type]
        assert sorted(i["pk"] for i in found) == sorted(k["pk"] for k in keys)
        assert table.requests == stubborn + 1
        assert sleeps == [0.05 * 2**n for n in range(stubborn)]
    else:
        with pytest.raises(RuntimeError, match="DynamoDB kept keys unprocessed"):
            batch_get_wire(table, "t", keys, sleeps.append)  # type: ignore[arg-type]
        assert table.requests == 8
        assert sleeps == [0.05 * 2**n for n in range(8)]
