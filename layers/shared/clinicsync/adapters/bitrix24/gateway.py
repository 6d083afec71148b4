"""Bitrix24 gateway: translates the domain's look-ups and writes into ``batch`` calls of at most 50.

It never decides anything. The rules say which contacts, deals and leads to write; this module says
how Bitrix24 spells that (UPPER_SNAKE fields, multifields, ORIGINATOR_ID/ORIGIN_ID, stage ids).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

from clinicsync.adapters.bitrix24.client import (
    BATCH_LIMIT,
    PAGE_SIZE,
    Bitrix24Client,
    Bitrix24Error,
    Command,
)
from clinicsync.adapters.bitrix24.client import chunks as _chunks
from clinicsync.adapters.bitrix24.client import rows as _rows
from clinicsync.adapters.bitrix24.phones import (
    CHAINED,
    COMMANDS_PER_FIND,
    FoundRows,
    chained_reads,
    chained_rows,
    findbycomm_commands,
    found_ids,
    readback_commands,
)
from clinicsync.adapters.bitrix24.phones import candidates as phone_candidates
from clinicsync.adapters.bitrix24.pipelines import closed_stages, pipeline_reads
from clinicsync.adapters.bitrix24.tickets import open_lead, open_lead_pages
from clinicsync.adapters.bitrix24.writes import Bitrix24Writer, custom_field
from clinicsync.domain.config import ClinicConfig, Pipeline
from clinicsync.domain.crm_ports import (
    CrmMatches,
    CrmPaused,
    CrmUnavailable,
    CrmWrite,
    DealMatch,
    OpenLead,
    PhoneCandidates,
    WriteOutcome,
)
from clinicsync.domain.phones import normalise_phone

VERIFY = "v"  # key prefix of the pipeline reads a look-up carries (``verify_in_look_up``)

# MIS ids per look-up command: a first import finds nothing, so an invocation's ids cost one command per
# entity, not one per 50, and its look-up stays one ``batch``; rows found are paged on ``next``. 500
# values keep a command's parsed variables under PHP's default max_input_vars (1000).
ORIGIN_IDS_PER_COMMAND = 500


SELECT = {
    "deal": [
        "ID",
        "CATEGORY_ID",
        "STAGE_ID",
        "CLOSED",
        "ORIGINATOR_ID",
        "ORIGIN_ID",
        "MODIFY_BY_ID",
        "DATE_MODIFY",
        "CONTACT_ID",
        "LEAD_ID",
    ],
    "lead": ["ID", "STATUS_ID", "ORIGINATOR_ID", "ORIGIN_ID", "MODIFY_BY_ID", "DATE_MODIFY", "CONTACT_ID", "PHONE"],
    "contact": ["ID", "ORIGINATOR_ID", "ORIGIN_ID", "MODIFY_BY_ID", "DATE_MODIFY"],
}


class Bitrix24Gateway:
    kind = "bitrix24"
    # A look-up by MIS id costs a request when nothing else is looked up (a known patient's new visit):
    # only records with a create intent, or of a patient new to us, are looked up.
    lookups_need_intents = True

    def __init__(self, client: Bitrix24Client, config: ClinicConfig) -> None:
        self._client = client
        self._config = config
        self._originator = config.crm.originator_id
        self._writer = Bitrix24Writer(client, config)
        # A contact's guard compares its last modifier with our user: without one, read before writing.
        self.guards_writes = bool(client.user_id)
        self._verify: dict[str, Command] = {}  # reads for the next look-up to carry
        self._verified: dict[str, Any] = {}  # what they answered

    def requests_made(self) -> int:
        return self._client.requests

    def integration_user(self) -> str:
        return self._client.user_id

    def apply(self, writes: Sequence[CrmWrite]) -> WriteOutcome:
        """The writes in ``batch`` requests of 50 commands (``clinicsync.adapters.bitrix24.writes``)."""
        return self._writer.apply(writes)

    def verify_pipelines(self, pipelines: Mapping[Any, Pipeline]) -> frozenset[str]:
        """Every configured stage must exist in its category; stages are matched by id, never by name
        (portals rename stages and keep ids). Returns the CRM's won/lost stages."""
        return closed_stages(pipelines, self._client.batch(pipeline_reads(pipelines)).result)

    def verify_in_look_up(self, pipelines: Mapping[Any, Pipeline]) -> Callable[[], frozenset[str]]:
        """``verify_pipelines`` with its reads sent in this gateway's next look-up, which has room for them
        (a container's first sync then pays no request for them); the returned function gives the won/lost
        stages, verifying on its own if no look-up answered them (none was sent, or a read was cut)."""
        self._verify = {f"{VERIFY}{key}": command for key, command in pipeline_reads(pipelines).items()}
        keys = list(self._verify)

        def closed() -> frozenset[str]:
            self._verify = {}
            if all(key in self._verified for key in keys):
                answered = {key.removeprefix(VERIFY): self._verified[key] for key in keys}
                return closed_stages(pipelines, answered)
            return self.verify_pipelines(pipelines)

        return closed

    # --- look-ups ----------------------------------------------------------------------------------

    def find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str] = (),
        multifield_contacts: Sequence[str] = (),
        intended_since: int | None = None,  # noqa: ARG002 - a MIS id filter, not a scan: no start time
    ) -> CrmMatches:
        return self._find(patient_ids, appointment_ids, phones, multifield_contacts, defer=False)

    def find_deferring_phones(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str],
        multifield_contacts: Sequence[str],
        intended_since: int | None,  # noqa: ARG002 - as in find
    ) -> CrmMatches:
        return self._find(patient_ids, appointment_ids, phones, multifield_contacts, defer=True)

    def apply_then(
        self,
        writes: Sequence[CrmWrite],
        matches: CrmMatches,
        more: Callable[[CrmMatches | None], Sequence[CrmWrite]],
    ) -> WriteOutcome:
        """The deferred numbers' findbycomm commands ride in the first write batch (after its writes, in
        the room left for them); what they found is read back, then ``more`` plans the patients held back."""
        finds = findbycomm_commands(sorted(matches.deferred_phones))
        if not finds:
            return self._writer.apply([*writes, *more(matches)])

        def resume(answered: dict[str, Any]) -> Sequence[CrmWrite]:
            try:  # a find that did not answer in the write batch (halted, refused) is sent on its own
                missing = {key: command for key, command in finds.items() if key not in answered}
                results = {**answered, **(self._run_reads(missing) if missing else {})}
                found = self._phone_candidates(set(matches.deferred_phones), results, list(finds), chained=False)
            except (Bitrix24Error, CrmUnavailable, CrmPaused):
                return more(None)
            return more(replace(matches, phones={**matches.phones, **found}, deferred_phones=frozenset()))

        return self._writer.apply(writes, finds, resume)

    def _find(
        self,
        patient_ids: Sequence[str],
        appointment_ids: Sequence[str],
        phones: Sequence[str],
        multifield_contacts: Sequence[str],
        *,
        defer: bool,
    ) -> CrmMatches:
        commands: dict[str, Command] = dict(self._verify)
        for n, ids in enumerate(_chunks(list(dict.fromkeys(patient_ids)), ORIGIN_IDS_PER_COMMAND)):
            commands[f"c{n}"] = ("crm.contact.list", self._origin_filter(ids, ["ID", "ORIGIN_ID"]))
        for n, ids in enumerate(_chunks(list(dict.fromkeys(appointment_ids)), ORIGIN_IDS_PER_COMMAND)):
            commands[f"d{n}"] = ("crm.deal.list", self._origin_filter(ids, SELECT["deal"]))
        for n, ids in enumerate(_chunks(list(dict.fromkeys(multifield_contacts)), PAGE_SIZE)):
            params = {"filter": {"@ID": list(ids)}, "select": ["ID", "PHONE", "EMAIL"]}
            commands[f"m{n}"] = ("crm.contact.list", params)
        finds = findbycomm_commands(phones)
        # A look-up past one batch would end in a part-filled one: when the caller can, its findbycomm
        # commands go in the first write batch instead (``apply_then``); the MIS ids are all looked up here.
        tail = (len(commands) + len(finds)) % BATCH_LIMIT
        deferred: set[str] = set()
        if defer and len(commands) + len(finds) > BATCH_LIMIT and 0 < tail <= len(finds):
            for key in list(finds)[-tail:]:
                deferred.update(finds.pop(key)[1]["values"])
        # The read-back rides in the look-up's own batch, for as many numbers' commands as its room takes
        # (a poll's few new patients: all; a backfill page's last invocation: most), when the look-up is one
        # batch; a number of the others is read back after it only if it found something.
        room = BATCH_LIMIT - len(commands) - len(finds)
        chained = set(list(finds)[: max(0, room) // (COMMANDS_PER_FIND - 1)])
        for key, command in finds.items():
            commands[key] = command
            if key in chained:
                commands |= chained_reads([key], self._config.matching, SELECT["deal"])
        results = self._run_reads(commands, paged=("c", "d"), chained=(CHAINED, VERIFY))
        self._verified |= {key: value for key, value in results.items() if key.startswith(VERIFY)}
        self._verify = {}

        contacts: dict[str, str] = {}
        deals: dict[str, DealMatch] = {}
        multifields: dict[str, dict[str, str]] = {}
        for key, value in results.items():
            if key.startswith("c"):
                for row in _rows(value):
                    # Oldest id wins, so a duplicate made by hand never replaces our mapping.
                    contacts.setdefault(str(row["ORIGIN_ID"]), str(row["ID"]))
            elif key.startswith("d"):
                for row in _rows(value):
                    deals.setdefault(str(row["ORIGIN_ID"]), _deal_match(row))
            elif key.startswith("m"):
                for row in _rows(value):
                    multifields[str(row["ID"])] = {
                        kind.lower(): str(row[kind][0]["ID"]) for kind in ("PHONE", "EMAIL") if row.get(kind)
                    }
        looked_up = set(phones) - deferred
        candidates = self._phone_candidates(looked_up, results, list(finds), chained=bool(chained)) if looked_up else {}
        return CrmMatches(
            contacts=contacts,
            deals=deals,
            phones=candidates,
            multifields=multifields,
            deferred_phones=frozenset(deferred),
        )

    def _phone_candidates(
        self, phones: set[str], results: Mapping[str, Any], finds: list[str], *, chained: bool
    ) -> dict[str, PhoneCandidates]:
        """findbycomm answers ids for all values at once; read them back (unless the chained reads proved
        themselves) to learn which phone each has."""
        found = chained_rows(results, finds) if chained else FoundRows()
        lead_ids, contact_ids = (found.missing_leads, found.missing_contacts) if chained else found_ids(results, finds)
        if lead_ids or contact_ids:
            commands = readback_commands(lead_ids, contact_ids, self._config.matching, SELECT["deal"])
            found.add_readback(self._run_reads(commands))
        return phone_candidates(phones, found, self._config.matching, self._originator)

    def _run_reads(
        self,
        commands: Mapping[str, Command],
        paged: tuple[str, ...] = (),
        chained: tuple[str, ...] = (),
    ) -> dict[str, Any]:
        """The reads in ``batch`` requests of 50. A list read whose key starts with one of ``paged`` is
        read to its last page (``start`` = the ``next`` it answered); its rows come back in page order.
        A read whose key starts with ``chained`` may fail or be cut by paging: it is then left out."""
        results: dict[str, Any] = {}
        pending = {key: (key, command) for key, command in commands.items()}  # key -> (first page's key, command)
        while pending:
            follow: dict[str, tuple[str, Command]] = {}
            chunks = _chunks(list(pending), BATCH_LIMIT)
            with self._client.expecting(len(chunks)):  # one round's batches go back to back
                for chunk in chunks:
                    self._read_chunk({k: pending[k] for k in chunk}, results, follow, paged, chained)
            pending = follow
        return results

    def _read_chunk(
        self,
        pending: Mapping[str, tuple[str, Command]],
        results: dict[str, Any],
        follow: dict[str, tuple[str, Command]],
        paged: tuple[str, ...],
        chained: tuple[str, ...],
    ) -> None:
        """One ``batch`` of :meth:`_run_reads`: its rows into ``results``, its next pages into ``follow``."""
        result = self._client.batch({k: command for k, (_, command) in pending.items()})
        failed = sorted(k for k in result.errors if not k.startswith(chained))
        if failed:
            raise Bitrix24Error("LOOKUP_FAILED", ",".join(failed), 400)
        for key, value in result.result.items():
            first, (method, params) = pending[key]
            if chained and key.startswith(chained):
                if key not in result.next and key not in result.errors:
                    results[key] = value
                continue
            results[first] = [*_rows(results[first]), *_rows(value)] if first != key else value
            if first.startswith(paged) and key in result.next:
                start = result.next[key]
                follow[f"{first}s{start}"] = (first, (method, {**params, "start": start}))

    def _origin_filter(self, ids: Sequence[str], select: list[str]) -> dict[str, Any]:
        return {
            "filter": {"ORIGINATOR_ID": self._originator, "@ORIGIN_ID": list(ids)},
            "select": select,
            "order": {"ID": "ASC"},
        }

    # --- reading back what managers changed --------------------------------------------------------

    def fetch(self, entity: str, crm_ids: Sequence[str]) -> dict[str, dict[str, str]]:
        commands = {
            f"f{n}": (f"crm.{entity}.list", {"filter": {"@ID": list(ids)}, "select": self._select(entity)})
            for n, ids in enumerate(_chunks(list(dict.fromkeys(crm_ids)), PAGE_SIZE))
        }
        rows = [row for value in self._run_reads(commands).values() for row in _rows(value)]
        return {str(row["ID"]): self._canonical(entity, row) for row in rows}

    def contact_emails(self, contact_ids: Sequence[str]) -> dict[str, list[str]]:
        commands = {
            f"e{n}": ("crm.contact.list", {"filter": {"@ID": list(ids)}, "select": ["ID", "EMAIL"]})
            for n, ids in enumerate(_chunks(list(dict.fromkeys(contact_ids)), PAGE_SIZE))
        }
        rows = [row for value in self._run_reads(commands).values() for row in _rows(value)]
        return {
            str(row["ID"]): [
                str(e.get("VALUE")) for e in row.get("EMAIL") or [] if isinstance(e, dict) and e.get("VALUE")
            ]
            for row in rows
        }

    def changed_since(self, entity: str, since: str, limit: int) -> list[dict[str, str]]:
        """Records changed after ``since`` (ISO time) by anyone but our integration user, oldest first."""
        out: list[dict[str, str]] = []
        start = 0
        while len(out) < limit:
            params = {
                "filter": {">DATE_MODIFY": since, "!MODIFY_BY_ID": self.integration_user()},
                "select": self._select(entity),
                "order": {"DATE_MODIFY": "ASC", "ID": "ASC"},
                "start": start,
            }
            body = self._client.call(f"crm.{entity}.list", params)
            out.extend(self._canonical(entity, row) for row in _rows(body.get("result")))
            if "next" not in body:
                break
            start = int(body["next"])
        return out[:limit]

    def _select(self, entity: str) -> list[str]:
        return SELECT[entity] + (
            [custom_field(self._config, "opt_outs"), custom_field(self._config, "opt_ins")]
            if entity == "contact"
            else []
        )

    def _canonical(self, entity: str, row: Mapping[str, Any]) -> dict[str, str]:
        """Ids, stages and flags only; a lead's phone is normalised for the phone index, never stored."""
        ours = row.get("ORIGINATOR_ID") == self._originator and bool(row.get("ORIGIN_ID"))
        out = {
            "entity": entity,
            "id": str(row["ID"]),
            "owner": str(row["ORIGIN_ID"]) if ours else "",
            "modified_by": str(row.get("MODIFY_BY_ID") or ""),
            "modified_at": str(row.get("DATE_MODIFY") or ""),
        }
        if entity == "deal":
            out |= {
                "stage": str(row.get("STAGE_ID") or ""),
                "category": str(row.get("CATEGORY_ID") or "0"),
                "closed": "Y" if row.get("CLOSED") == "Y" else "N",
            }
        elif entity == "lead":
            numbers = [
                normalise_phone(str(p.get("VALUE", "")), self._config.matching.default_region)
                for p in row.get("PHONE") or []
            ]
            out |= {
                "status": str(row.get("STATUS_ID") or ""),
                "contact_id": str(row.get("CONTACT_ID") or ""),
                "phone": next((n for n in numbers if n), ""),
            }
        else:
            for name in ("opt_outs", "opt_ins"):
                value = row.get(custom_field(self._config, name)) or ""
                out[name] = ",".join(value) if isinstance(value, list) else str(value)
        return out

    # --- IDENT tickets -----------------------------------------------------------------------------

    def open_leads(self, created_from: datetime, created_to: datetime, limit: int, offset: int) -> list[OpenLead]:
        """One ``batch`` request (up to 11 pages of 50): the window's leads from ``offset``, ``limit`` of them."""
        statuses = self._config.matching.adopt_lead_statuses
        commands, skip = open_lead_pages(statuses, created_from, created_to, limit, offset)
        results = self._run_reads(commands)
        rows = [row for key in commands for row in _rows(results.get(key))][skip:]
        return [open_lead(row, self._config.matching.default_region) for row in rows[:limit]]


def _deal_match(row: Mapping[str, Any]) -> DealMatch:
    return DealMatch(
        deal_id=str(row["ID"]),
        category_id=str(row.get("CATEGORY_ID", "0")),
        stage=str(row.get("STAGE_ID", "")),
        closed=row.get("CLOSED") == "Y",
    )
