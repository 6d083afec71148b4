"""The peers clinicsync is measured against, written the way integrators write them (not sandbagged).

All read the same MIS changes (the MEDODS emulator's rows; MIS reads are not CRM requests) and write
the same contacts and deals. Each keeps the local mapping table (MIS id -> CRM id) integrators keep.

- :class:`BitrixLoopPeer`: the per-record loop: for each appointment, search the contact by phone in
  the formats a front desk types (``+7…``, ``8…``, ``7…``), add or update it, find the deal by its MIS
  id, add or update it. A 503 is waited out (1 s) and retried, as most such scripts do.
- :class:`FastBitrixPeer`: a sync on ``fast_bitrix24`` using the library's own batching: read the CRM's
  contacts once (``get_all``), match phones locally, then ``call()`` with lists of adds/updates (the
  library packs 50 per ``batch`` and paces to the portal's bucket itself).
- :class:`AmoApiPeer`: a per-entity sync on ``amocrm-api`` (``amocrm.v2``): search the contact by
  phone (``query``), create it, create each lead with the contact embedded, update leads by id; paced
  at amoCRM's documented 7 requests/s, 429s waited out.
"""

from __future__ import annotations

import asyncio
import selectors
import types
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import httpx
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.phones import normalise_phone
from clinicsync.domain.statuses import canonical_status
from sandbox.bench.simclock import LATENCY, ClockedApp, SimClock

Row = dict[str, Any]


@dataclass(frozen=True)
class Visit:
    """One appointment to push, with its patient (MEDODS rows, as the MIS API returns them)."""

    client: Row
    appointment: Row


def eligible(client: Row, appointment: Row) -> bool:
    """What any integrator skips: archived patients, refusals of data processing, anonymous visits."""
    return not (
        client.get("archived")
        or client.get("denyDataProcessing")
        or appointment.get("anonymous")
        or appointment.get("deletedAt")
    )


def _e164(client: Row, config: ClinicConfig) -> str | None:
    raw = client.get("phone")
    return normalise_phone(str(raw), config.matching.default_region) if raw else None


def _stage(appointment: Row, config: ClinicConfig, repeat: bool) -> tuple[str, str]:
    pipeline = config.pipeline(repeat=repeat)
    status = canonical_status("medods", str(appointment["status"]))
    return pipeline.category_id, pipeline.stages[status]


def _title(client: Row, appointment: Row) -> str:
    return f"{client.get('surname', '')} {client.get('name', '')}: приём {appointment['date']} {appointment['time']}"


class BitrixLoopPeer:
    """The per-record loop on plain HTTP (what most hand-written Bitrix24 integrations are)."""

    name = "per-record loop"

    def __init__(self, webhook_url: str, config: ClinicConfig, clock: SimClock) -> None:
        self._http = httpx.Client(base_url=webhook_url, timeout=60.0)
        self._config = config
        self._clock = clock
        self.refused = 0

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, params: Row) -> Any:
        while True:
            response = self._http.post(f"{method}.json", json=params)
            if response.status_code == 503:  # QUERY_LIMIT_EXCEEDED: wait a second and try again
                self.refused += 1
                self._clock.sleep(1.0)
                continue
            response.raise_for_status()
            return response.json()["result"]

    def sync(self, visits: Iterable[Visit]) -> None:
        for visit in visits:
            self._visit(visit)

    def _visit(self, visit: Visit) -> None:
        client, appt = visit.client, visit.appointment
        contact_id = None
        e164 = _e164(client, self._config)
        if e164:
            national = e164[-10:]
            for typed in (f"+7{national}", f"8{national}", f"7{national}"):
                rows = self._call("crm.contact.list", {"filter": {"PHONE": typed}, "select": ["ID"]})
                if rows:
                    contact_id = rows[0]["ID"]
                    break
        fields: Row = {
            "NAME": client.get("name"),
            "LAST_NAME": client.get("surname"),
            "SECOND_NAME": client.get("secondName") or "",
            "ORIGINATOR_ID": "loop",
            "ORIGIN_ID": str(client["id"]),
        }
        if contact_id is None:
            if e164:
                fields["PHONE"] = [{"VALUE": e164, "VALUE_TYPE": "MOBILE"}]
            contact_id = self._call("crm.contact.add", {"fields": fields})
        else:
            self._call("crm.contact.update", {"id": contact_id, "fields": fields})
        found = self._call(
            "crm.deal.list",
            {"filter": {"ORIGINATOR_ID": "loop", "ORIGIN_ID": str(appt["id"])}, "select": ["ID"]},
        )
        category, stage = _stage(appt, self._config, repeat=False)
        deal: Row = {
            "TITLE": _title(client, appt),
            "STAGE_ID": stage,
            "OPPORTUNITY": appt.get("price"),
            "BEGINDATE": appt["date"],
            "CONTACT_ID": contact_id,
            "ORIGINATOR_ID": "loop",
            "ORIGIN_ID": str(appt["id"]),
        }
        if found:
            self._call("crm.deal.update", {"id": found[0]["ID"], "fields": deal})
        else:
            self._call("crm.deal.add", {"fields": {**deal, "CATEGORY_ID": category}})


class _SimulatedSelector(selectors.DefaultSelector):
    """Where the event loop would block until its next timer, the simulated clock jumps to that timer."""

    def __init__(self, clock: SimClock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        ready = super().select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None:  # nothing scheduled and nothing to read: in real time this would hang
            raise RuntimeError("simulated event loop: every task waits and no timer is due")
        self._clock.advance(timeout)
        return []


class SimulatedLoop(asyncio.SelectorEventLoop):
    """An event loop on the simulated clock: ``loop.time()`` is the clock, and a loop with nothing ready
    moves the clock to its next timer instead of sleeping. Every asyncio wait (``asyncio.sleep``,
    timeouts, fast_bitrix24's pacing and back-off) then takes simulated time, the waits of concurrent
    coroutines overlap, and they wake in the order of their deadlines, as in real time."""

    def __init__(self, clock: SimClock) -> None:
        super().__init__(_SimulatedSelector(clock))
        self._sim_clock = clock
        # A timer is due when its deadline is under time() + resolution; at 2**30 s one float step is
        # 2.4e-7 s, so the 1e-9 s default rounds away and the loop would step towards a timer forever.
        self._clock_resolution = 1e-6

    def time(self) -> float:
        return self._sim_clock.monotonic()


def virtualise_fast_bitrix24(clock: SimClock) -> Callable[[], None]:
    """Run fast_bitrix24 on the simulated clock; returns the undo. Its sync API runs its coroutines on
    the thread's event loop: that loop is a :class:`SimulatedLoop`, and its throttler's
    ``time.monotonic`` is the same clock. The library's own pacing, concurrency and retries are
    untouched: only their clock is ours, the same for all of them."""
    import fast_bitrix24.throttle as throttle

    loop = SimulatedLoop(clock)
    saved = throttle.time
    throttle.time = types.SimpleNamespace(monotonic=clock.monotonic)  # type: ignore[assignment]
    asyncio.set_event_loop(loop)

    def undo() -> None:
        throttle.time = saved  # type: ignore[assignment]
        asyncio.set_event_loop(None)
        loop.close()

    return undo


class _InProcessResponse:
    def __init__(self, session: InProcessSession, url: str, body: Any) -> None:
        self._session, self._url, self._body = session, url, body
        self._payload: Any = None

    async def __aenter__(self) -> _InProcessResponse:
        from werkzeug.test import Client

        s = self._session
        # Every coroutine that is ready sends before the clock moves: concurrent requests arrive at
        # the same simulated instant and their latencies overlap, as over a real network.
        await asyncio.sleep(0)
        response = Client(s.wsgi).post(urlsplit(self._url).path, json=self._body)
        await asyncio.sleep(s.latency)  # on the SimulatedLoop: simulated time
        if response.status_code >= 400:  # the library opens its sessions with raise_for_status=True
            url = URL(self._url)
            info = aiohttp.RequestInfo(url, "POST", CIMultiDictProxy(CIMultiDict()), url)
            raise aiohttp.ClientResponseError(info, (), status=response.status_code, message=response.status)
        self._payload = response.get_json()
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def json(self, encoding: str | None = None) -> Any:
        return self._payload


with warnings.catch_warnings():  # aiohttp discourages subclassing; the library type-checks `client=`
    warnings.simplefilter("ignore", DeprecationWarning)

    class InProcessSession(aiohttp.ClientSession):
        """The ``aiohttp.ClientSession`` fast_bitrix24 is given (its ``client=`` parameter), serving each
        POST from the CRM emulator in this thread. Over real sockets the emulator's server threads took
        the library's 50 concurrent requests in whatever order the OS scheduled them, so 503s, retries
        and simulated seconds changed from run to run (once the library gave up: "All attempts to get
        data from server exhausted"). In one thread and one event loop the order is the library's own.
        Only ``post`` is used by the library; the base class is never initialised (no connector)."""

        def __init__(self, app: ClockedApp, clock: SimClock, latency: float = LATENCY) -> None:
            self.app, self.clock, self.latency = app, clock, latency

        def wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
            return self.app.handle(environ, start_response, 0.0)  # the latency is waited in the response

        def post(self, url: Any, *, json: Any = None, ssl: bool = True, **_: Any) -> Any:
            return _InProcessResponse(self, str(url), json)

        @property
        def closed(self) -> bool:
            return False

        async def close(self) -> None:
            return None

        def __del__(self, *_: Any) -> None:
            pass


class FastBitrixPeer:
    """A sync on fast_bitrix24: whole lists per call, the library batches and paces.

    Its writes go in the library's ``slow()`` mode, the one-line remedy its README gives when the server
    answers errors: at its default 50 concurrent requests, a second large ``call()`` into a portal bucket
    the first one filled gives up ("All attempts to get data from server exhausted", as in its issue
    #124): its waiting coroutines all wake on the same slot and the 503s of the many exhaust the retry
    count they share. Reads (``get_all``) keep the default."""

    name = "fast_bitrix24"
    note = "writes in the library's slow() mode (at its default concurrency it gives up on this import)"

    def __init__(self, webhook_url: str, config: ClinicConfig, client: Any = None) -> None:
        from fast_bitrix24 import Bitrix

        # Defaults as its users run it: its own pool, pacing, velocity policy and retries.
        self._b = Bitrix(webhook_url, verbose=False, client=client)
        self._config = config
        self.contacts: dict[str, str] = {}  # MIS patient id -> contact id
        self.deals: dict[str, str] = {}  # MIS appointment id -> deal id
        self._phones: dict[str, str] | None = None  # E.164 -> contact id (the CRM's contacts, read once)

    def close(self) -> None:
        pass

    def _read_phones(self) -> dict[str, str]:
        if self._phones is None:
            rows = self._b.get_all("crm.contact.list", {"select": ["ID", "PHONE"]})
            region = self._config.matching.default_region
            self._phones = {}
            for row in rows:
                for entry in row.get("PHONE") or []:
                    if number := normalise_phone(str(entry.get("VALUE", "")), region):
                        self._phones.setdefault(number, str(row["ID"]))
        return self._phones

    def sync(self, visits: Sequence[Visit]) -> None:
        if not visits:
            return
        phones = self._read_phones()
        new_contacts: dict[str, Row] = {}
        for visit in visits:
            pid = str(visit.client["id"])
            if pid in self.contacts or pid in new_contacts:
                continue
            e164 = _e164(visit.client, self._config)
            if e164 and e164 in phones:
                self.contacts[pid] = phones[e164]
                continue
            fields: Row = {
                "NAME": visit.client.get("name"),
                "LAST_NAME": visit.client.get("surname"),
                "SECOND_NAME": visit.client.get("secondName") or "",
                "ORIGINATOR_ID": "fb24",
                "ORIGIN_ID": pid,
            }
            if e164:
                fields["PHONE"] = [{"VALUE": e164, "VALUE_TYPE": "MOBILE"}]
            new_contacts[pid] = {"fields": fields}
        if new_contacts:
            with self._b.slow():
                self._b.call("crm.contact.add", list(new_contacts.values()))
            # call() returns ids in completion order, not input order: read back who got which id.
            rows = self._b.get_all(
                "crm.contact.list", {"filter": {"ORIGINATOR_ID": "fb24"}, "select": ["ID", "ORIGIN_ID", "PHONE"]}
            )
            for row in rows:
                self.contacts[str(row["ORIGIN_ID"])] = str(row["ID"])
        adds: list[Row] = []
        updates: list[Row] = []
        for visit in visits:
            appt = visit.appointment
            category, stage = _stage(appt, self._config, repeat=False)
            deal: Row = {
                "TITLE": _title(visit.client, appt),
                "STAGE_ID": stage,
                "OPPORTUNITY": appt.get("price"),
                "BEGINDATE": appt["date"],
                "CONTACT_ID": self.contacts.get(str(visit.client["id"]), ""),
                "ORIGINATOR_ID": "fb24",
                "ORIGIN_ID": str(appt["id"]),
            }
            known = self.deals.get(str(appt["id"]))
            if known:
                updates.append({"id": known, "fields": deal})
            else:
                adds.append({"fields": {**deal, "CATEGORY_ID": category}})
        if updates:
            with self._b.slow():
                self._b.call("crm.deal.update", updates)
        if adds:
            with self._b.slow():
                self._b.call("crm.deal.add", adds)
            rows = self._b.get_all(
                "crm.deal.list", {"filter": {"ORIGINATOR_ID": "fb24"}, "select": ["ID", "ORIGIN_ID"]}
            )
            self.deals.update({str(r["ORIGIN_ID"]): str(r["ID"]) for r in rows})


class AmoApiPeer:
    """A per-entity sync on the amocrm-api library, paced at 7 requests/s."""

    name = "amocrm-api"

    def __init__(self, config: ClinicConfig, clock: SimClock, fields: dict[str, int]) -> None:
        self._config = config
        self._clock = clock
        self._fields = fields
        self.contacts: dict[str, int] = {}
        self.deals: dict[str, int] = {}
        self.refused = 0

    def close(self) -> None:
        pass

    def _call(self, fn: Callable[[], Any]) -> Any:
        from amocrm.v2 import exceptions

        while True:
            try:
                result = fn()
            except exceptions.AmoApiException as exc:
                if "429" not in str(exc):
                    raise
                self.refused += 1
                self._clock.sleep(1.0)
                continue
            self._clock.sleep(1 / 7)  # amoCRM: at most 7 requests per second
            return result

    def sync(self, visits: Iterable[Visit]) -> None:
        from amocrm.v2 import Contact, Lead

        for visit in visits:
            client, appt = visit.client, visit.appointment
            pid = str(client["id"])
            contact_id = self.contacts.get(pid)
            e164 = _e164(client, self._config)
            if contact_id is None and e164:
                found = self._call(lambda e=e164: list(Contact.objects.filter(query=e[-10:])))
                if found:
                    contact_id = int(found[0].id)
            if contact_id is None:
                data: Row = {
                    "first_name": client.get("name"),
                    "last_name": client.get("surname"),
                    "custom_fields_values": [
                        {"field_id": self._fields["mis_patient_id"], "values": [{"value": pid}]},
                    ],
                }
                if e164:
                    data["custom_fields_values"].append(
                        {"field_code": "PHONE", "values": [{"value": e164, "enum_code": "MOB"}]}
                    )
                contact_id = int(self._call(lambda d=data: Contact.objects.create(data=d)).id)
            self.contacts[pid] = contact_id
            pipeline, status = _stage(appt, self._config, repeat=False)
            lead: Row = {
                "name": _title(client, appt),
                "price": int(float(appt.get("price") or 0)),
                "pipeline_id": int(pipeline),
                "status_id": int(status),
                "custom_fields_values": [
                    {"field_id": self._fields["mis_appointment_id"], "values": [{"value": str(appt["id"])}]}
                ],
            }
            known = self.deals.get(str(appt["id"]))
            if known:
                self._call(lambda k=known, d=lead: Lead.objects.update(k, data=d))
            else:
                lead["_embedded"] = {"contacts": [{"id": contact_id}]}
                created = self._call(lambda d=lead: Lead.objects.create(data=d))
                self.deals[str(appt["id"])] = int(created.id)
