"""Adoption by phone on Bitrix24: the open leads, contacts and open deals that carry each number.

``crm.duplicate.findbycomm`` answers the ids for all of a command's numbers at once, so they are read back
to learn each one's numbers, owner and open deals. When a look-up fits in one ``batch``, the read-back rides
in it: each findbycomm command ``pN`` is followed by reads whose filter is exactly ``$result[pN][LEAD]`` or
``$result[pN][CONTACT]``, which the portal replaces by the whole list found (the rest module's
``CRestUtil::processBatchElement`` gives a parameter that is exactly one reference the referenced value,
whatever its type). A chained read counts only when it returned exactly the ids found, so a portal that
substituted otherwise costs the separate read-back, never a wrong adoption; a number whose command found
nothing ignores its chained reads, whatever they returned.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from clinicsync.adapters.bitrix24.client import PAGE_SIZE, Command, chunks, rows
from clinicsync.domain.config import Matching
from clinicsync.domain.crm_ports import PhoneCandidates
from clinicsync.domain.phones import normalise_phone

FINDBYCOMM_LIMIT = 20  # crm.duplicate.findbycomm takes at most 20 values
CHAINED = "x"  # key prefix of the reads chained to a findbycomm command in the same batch
COMMANDS_PER_FIND = 4  # a findbycomm command and its chained_reads (leads, contacts, their deals)

Row = dict[str, Any]


def _lead_read(ids: Any, matching: Matching, *, by_status: bool) -> Command:
    filter_: dict[str, Any] = {"@ID": ids}
    if by_status:
        filter_["@STATUS_ID"] = list(matching.adopt_lead_statuses)
    # SOURCE_ID: the source a deal adopting the lead keeps; STATUS_ID: filtered here when the read is chained
    return "crm.lead.list", {
        "filter": filter_,
        "select": ["ID", "PHONE", "SOURCE_ID", "STATUS_ID"],
        "order": {"ID": "ASC"},
    }


def _contact_read(ids: Any) -> Command:
    select = ["ID", "ORIGINATOR_ID", "ORIGIN_ID", "PHONE"]
    return "crm.contact.list", {"filter": {"@ID": ids}, "select": select, "order": {"ID": "ASC"}}


def _deal_read(contact_ids: Any, matching: Matching, select: list[str]) -> Command:
    deal_filter = {"@CONTACT_ID": contact_ids, "CLOSED": "N", "@STAGE_ID": list(matching.adopt_deal_stages)}
    return "crm.deal.list", {"filter": deal_filter, "select": select, "order": {"ID": "ASC"}}


def findbycomm_commands(phones: Sequence[str]) -> dict[str, Command]:
    return {
        f"p{n}": ("crm.duplicate.findbycomm", {"type": "PHONE", "values": list(values)})
        for n, values in enumerate(chunks(list(dict.fromkeys(phones)), FINDBYCOMM_LIMIT))
    }


def chained_reads(finds: Iterable[str], matching: Matching, deal_select: list[str]) -> dict[str, Command]:
    """For each findbycomm key, its read-back by reference, to send right after it in the same batch."""
    commands: dict[str, Command] = {}
    for key in finds:
        commands[f"{CHAINED}l{key}"] = _lead_read(f"$result[{key}][LEAD]", matching, by_status=False)
        commands[f"{CHAINED}k{key}"] = _contact_read(f"$result[{key}][CONTACT]")
        commands[f"{CHAINED}q{key}"] = _deal_read(f"$result[{key}][CONTACT]", matching, deal_select)
    return commands


def readback_commands(
    lead_ids: set[str], contact_ids: set[str], matching: Matching, deal_select: list[str]
) -> dict[str, Command]:
    """The separate read-back of the ids findbycomm answered, in pages of 50 ids."""
    commands: dict[str, Command] = {}
    for n, ids in enumerate(chunks(sorted(lead_ids, key=int), PAGE_SIZE)):
        commands[f"l{n}"] = _lead_read(list(ids), matching, by_status=True)
    for n, ids in enumerate(chunks(sorted(contact_ids, key=int), PAGE_SIZE)):
        commands[f"k{n}"] = _contact_read(list(ids))
        commands[f"q{n}"] = _deal_read(list(ids), matching, deal_select)
    return commands


def found_ids(results: Mapping[str, Any], finds: Iterable[str]) -> tuple[set[str], set[str]]:
    leads: set[str] = set()
    contacts: set[str] = set()
    for key in finds:
        value = results.get(key)
        if isinstance(value, dict):
            leads |= {str(i) for i in value.get("LEAD", [])}
            contacts |= {str(i) for i in value.get("CONTACT", [])}
    return leads, contacts


@dataclass
class FoundRows:
    """Rows read back, by kind; ``missing_*``: ids whose chained read did not prove itself."""

    leads: list[Row] = field(default_factory=list)
    contacts: list[Row] = field(default_factory=list)
    deals: list[Row] = field(default_factory=list)
    missing_leads: set[str] = field(default_factory=set)
    missing_contacts: set[str] = field(default_factory=set)

    def add_readback(self, results: Mapping[str, Any]) -> None:
        for key, value in results.items():
            {"l": self.leads, "k": self.contacts, "q": self.deals}[key[0]].extend(rows(value))


def chained_rows(results: Mapping[str, Any], finds: Iterable[str]) -> FoundRows:
    """The chained reads that returned exactly the ids their findbycomm found (absent: failed or paged)."""
    found = FoundRows()
    for key in finds:
        value = results.get(key)
        answer = value if isinstance(value, dict) else {}
        lead_ids = {str(i) for i in answer.get("LEAD", [])}
        contact_ids = {str(i) for i in answer.get("CONTACT", [])}
        leads = results.get(f"{CHAINED}l{key}")
        if lead_ids:
            if isinstance(leads, list) and {str(r.get("ID")) for r in rows(leads)} == lead_ids:
                found.leads += rows(leads)
            else:
                found.missing_leads |= lead_ids
        contacts, deals = results.get(f"{CHAINED}k{key}"), results.get(f"{CHAINED}q{key}")
        if contact_ids:
            proven = isinstance(contacts, list) and {str(r.get("ID")) for r in rows(contacts)} == contact_ids
            if proven and isinstance(deals, list):
                found.contacts += rows(contacts)
                found.deals += rows(deals)
            else:
                found.missing_contacts |= contact_ids
    return found


def candidates(phones: set[str], found: FoundRows, matching: Matching, originator: str) -> dict[str, PhoneCandidates]:
    """Each number's open leads (adoptable status), contacts (with their owner) and open unowned deals,
    oldest first; a record read twice (it carries two numbers looked up in different commands) counts once."""
    region = matching.default_region
    statuses = set(matching.adopt_lead_statuses)
    leads: dict[str, list[str]] = {}
    contacts: dict[str, list[tuple[str, str | None]]] = {}
    contact_phones: dict[str, set[str]] = {}
    deals: dict[str, list[tuple[str, str, str]]] = {}
    sources: dict[str, str] = {}

    def numbers(row: Row) -> set[str]:
        found = {num for p in row.get("PHONE") or [] if (num := normalise_phone(str(p.get("VALUE", "")), region))}
        return found & phones

    for row in _unique(found.leads):
        if str(row.get("STATUS_ID")) not in statuses:
            continue
        if row.get("SOURCE_ID"):
            sources[str(row["ID"])] = str(row["SOURCE_ID"])
        for number in numbers(row):
            leads.setdefault(number, []).append(str(row["ID"]))
    for row in _unique(found.contacts):
        owner = str(row["ORIGIN_ID"]) if row.get("ORIGINATOR_ID") == originator and row.get("ORIGIN_ID") else None
        contact_phones[str(row["ID"])] = numbers(row)
        for number in contact_phones[str(row["ID"])]:
            contacts.setdefault(number, []).append((str(row["ID"]), owner))
    for row in _unique(found.deals):
        if row.get("ORIGINATOR_ID") == originator and row.get("ORIGIN_ID"):
            continue  # already one of ours
        for number in contact_phones.get(str(row.get("CONTACT_ID")), set()):
            deals.setdefault(number, []).append(
                (str(row["ID"]), str(row.get("CATEGORY_ID", "0")), str(row.get("STAGE_ID")))
            )
    return {
        number: PhoneCandidates(
            leads=tuple(leads.get(number, [])),
            contacts=tuple(contacts.get(number, [])),
            deals=tuple(deals.get(number, [])),
            lead_sources={lid: sources[lid] for lid in leads.get(number, []) if lid in sources},
        )
        for number in set(leads) | set(contacts) | set(deals)
    }


def _unique(found: list[Row]) -> list[Row]:
    by_id = {str(row.get("ID")): row for row in found if row.get("ID") is not None}
    return [by_id[key] for key in sorted(by_id, key=lambda i: int(i) if i.isdigit() else 0)]
