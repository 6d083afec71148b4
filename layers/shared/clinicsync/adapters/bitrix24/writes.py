"""Bitrix24 writes: the domain's contact, deal and lead writes as ``batch`` commands, 50 a request.

It never decides anything; it says how Bitrix24 spells what the rules decided (UPPER_SNAKE fields,
multifields, ORIGINATOR_ID/ORIGIN_ID, stage ids) and how a batch that fails part-way is finished.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from clinicsync.adapters.bitrix24.client import (
    BATCH_LIMIT,
    Bitrix24Client,
    Bitrix24MethodBlocked,
    Bitrix24OutcomeUnknown,
    Command,
)
from clinicsync.domain.config import ClinicConfig
from clinicsync.domain.crm_ports import CHANGED_SINCE_READ, ContactWrite, CrmWrite, DealWrite, LeadWrite, WriteOutcome
from clinicsync.domain.fieldtypes import FieldValueError, crm_value, default_type

# Canonical fields with a native Bitrix24 field. Everything else goes to a UF_CRM_* field, named by
# the clinic's fields.crm_names or, by default, UF_CRM_CS_<NAME>. visit_at is one of those (a datetime
# field: reminders need the hour); BEGINDATE is date-only and gets the visit's date besides.
NATIVE_DEAL_FIELDS = {"title": "TITLE", "price": "OPPORTUNITY", "comment": "COMMENTS"}
NATIVE_CONTACT_FIELDS = {"birth_date": "BIRTHDATE"}
NOT_WRITTEN = {"full_name", "phone", "email", "mis_patient_id", "mis_appointment_id"}  # handled explicitly


def custom_field(config: ClinicConfig, name: str, entity: Literal["contact", "deal"] = "contact") -> str:
    """A canonical field's UF_CRM_* id: the clinic's fields.crm_names or, by default, UF_CRM_CS_<NAME>."""
    mapped = config.fields.crm_field(entity, name)
    return mapped.id if mapped else f"UF_CRM_CS_{name.upper()}"


@dataclass
class _Command:
    key: str
    method: str
    params: dict[str, Any]
    patient_id: str
    write: CrmWrite
    guard: str | None = None  # an update's guard: the key of the read whose first row's ID it writes to
    is_guard: bool = False  # a guard's read: its rows are not a write's result


class Bitrix24Writer:
    def __init__(self, client: Bitrix24Client, config: ClinicConfig) -> None:
        self._client = client
        self._config = config
        self._originator = config.crm.originator_id

    def _custom(self, name: str, entity: Literal["contact", "deal"] = "contact") -> str:
        return custom_field(self._config, name, entity)

    def _typed(self, entity: Literal["contact", "deal"], name: str, value: Any) -> Any:
        """A custom field's value in the shape its Bitrix24 type takes (``clinicsync.domain.fieldtypes``)."""
        if value is None or name in ("opt_outs", "opt_ins"):
            return _bitrix_value(value)  # the consent code reads the comma list back
        mapped = self._config.fields.crm_field(entity, name)
        field_type = (mapped.type if mapped else None) or default_type("bitrix24", name)
        return crm_value("bitrix24", name, field_type, value, self._config.tz, mapped.values if mapped else None)

    def apply(
        self,
        writes: Sequence[CrmWrite],
        rides: Mapping[str, Command] | None = None,
        then: Callable[[dict[str, Any]], Sequence[CrmWrite]] | None = None,
    ) -> WriteOutcome:
        """The writes in batches of 50. ``rides``: reads sent after the writes of the first batch (which
        leaves them room); ``then`` gets what they answered (a read halted or failed is absent) and returns
        more writes, queued behind the others so that the batches stay full across both."""
        outcome = WriteOutcome()
        queue = self._queue(writes, outcome)
        riding = dict(rides or {})
        commands = sum(len(group) for group in queue) + len(riding)
        with self._client.expecting(-(-commands // BATCH_LIMIT)):
            self._apply_queue(queue, riding, outcome, then)
        return outcome

    def _apply_queue(
        self,
        queue: list[list[_Command]],
        riding: dict[str, Command],
        outcome: WriteOutcome,
        then: Callable[[dict[str, Any]], Sequence[CrmWrite]] | None,
    ) -> None:
        while queue or riding:
            # Fill every batch to 50 commands, in order; commands run with halt=1. A patient that does not
            # fit whole is split: its tail goes first in the next batch, which runs only if the head did
            # and then references the contact by the id the head's reply gave (``_run_chunk``), so a deal
            # never references a contact whose creation failed or is unknown.
            chunk: list[_Command] = []
            while queue and len(chunk) < BATCH_LIMIT - len(riding):
                room = BATCH_LIMIT - len(riding) - len(chunk)
                if len(queue[0]) <= room:
                    chunk.extend(queue.pop(0))
                    continue
                cut = room - 1 if queue[0][room - 1].is_guard else room  # a guard stays with its update
                if cut == 0:
                    break
                chunk.extend(queue[0][:cut])
                queue[0] = queue[0][cut:]
            answered: dict[str, Any] = {}  # no write to ride with: ``then`` sends the reads as a look-up
            leftovers = self._run_chunk(chunk, outcome, riding, answered) if chunk else []
            if leftovers:
                queue.insert(0, leftovers)
            if riding:
                riding = {}
                if then is not None:
                    queue.extend(self._queue(then(answered), outcome))

    def _queue(self, writes: Sequence[CrmWrite], outcome: WriteOutcome) -> list[list[_Command]]:
        """Each patient's commands, in order; a patient whose values its fields cannot take fails alone."""
        groups: dict[str, list[CrmWrite]] = {}
        for write in writes:
            groups.setdefault(write.patient_id, []).append(write)
        queue: list[list[_Command]] = []
        for pid, group in groups.items():
            try:
                commands = self._commands(pid, group)
            except FieldValueError as exc:
                outcome.failed[pid] = f"invalid_field: {exc}"
                continue
            if commands:
                queue.append(commands)
        return queue

    def _run_chunk(
        self,
        chunk: list[_Command],
        outcome: WriteOutcome,
        rides: Mapping[str, Command] | None = None,
        answered: dict[str, Any] | None = None,
    ) -> list[_Command]:
        # A method paused by the operating-time limit holds back only the patients that need it.
        for command in chunk:
            if self._client.blocked_until(command.method) is not None:
                outcome.failed.setdefault(command.patient_id, "method_blocked")
        chunk = [c for c in chunk if c.patient_id not in outcome.failed]
        if not chunk:
            return []
        rides = rides or {}
        keys = {c.key for c in chunk}
        for command in chunk:  # a contact created by an earlier chunk is referenced by its id
            fields = command.params.get("fields", {})
            ref = fields.get("CONTACT_ID", "")
            if isinstance(ref, str) and ref.startswith("$result[") and ref[8:-1] not in keys:
                fields["CONTACT_ID"] = outcome.contact_ids.get(command.patient_id, "")
        try:
            commands = {c.key: (c.method, c.params) for c in chunk} | dict(rides)
            result = self._client.batch(commands, halt=True, writes=True)
        except Bitrix24OutcomeUnknown:
            # Some of these may exist now; the retry looks them up by MIS id before writing again.
            for command in chunk:
                outcome.failed.setdefault(command.patient_id, "outcome_unknown")
            return []
        except Bitrix24MethodBlocked:
            # Refused whole by the operating-time limit (429): nothing ran, the patients wait for the pause.
            for command in chunk:
                outcome.failed.setdefault(command.patient_id, "method_blocked")
            return []
        if answered is not None:  # the rides come last: a write that halted the batch leaves them out
            answered.update({k: result.result[k] for k in rides if k in result.result and k not in result.errors})
        for index, command in enumerate(chunk):
            if command.key in result.errors:
                error = result.errors[command.key]
                if command.guard is not None and result.result.get(command.guard) == []:
                    # The guard found the record changed since we wrote it, so the update had no ID to
                    # write to. Guarded updates come first: none of the patient's creates has run.
                    outcome.failed[command.patient_id] = CHANGED_SINCE_READ
                else:
                    outcome.failed[command.patient_id] = str(
                        error.get("error") or error.get("error_description") or "error"
                    )
                    self._client.note_blocked(command.method, error)
                return self._unrun(chunk, index, outcome)
            if command.key not in result.result:
                return self._unrun(chunk, index, outcome)
            if not command.is_guard:
                self._record(command, result.result[command.key], outcome)
        return []

    @staticmethod
    def _unrun(chunk: list[_Command], failed_at: int, outcome: WriteOutcome) -> list[_Command]:
        # halt=1 skipped everything after the failure: resend what belongs to other patients.
        failed_patient = chunk[failed_at].patient_id
        return [c for c in chunk[failed_at:] if c.patient_id != failed_patient and c.patient_id not in outcome.failed]

    @staticmethod
    def _record(command: _Command, value: Any, outcome: WriteOutcome) -> None:
        write = command.write
        if isinstance(write, ContactWrite):
            outcome.contact_ids[command.patient_id] = str(value) if write.contact_id is None else write.contact_id
        elif isinstance(write, DealWrite):
            outcome.deal_ids[write.appointment_id] = str(value) if write.deal_id is None else write.deal_id

    def _commands(self, patient_id: str, writes: Sequence[CrmWrite]) -> list[_Command]:
        guarded = self._guarded(patient_id, writes)  # first: when a guard fails, no create has run
        commands: list[_Command] = []
        contact_ref: str | None = None
        for write in writes:
            if isinstance(write, ContactWrite) and not _is_guarded(write):
                key = f"c_{patient_id}"
                params: dict[str, Any] = {
                    "fields": self._contact_fields(write),
                    "params": {"REGISTER_SONET_EVENT": "N"},
                }
                if write.contact_id is None:
                    commands.append(_Command(key, "crm.contact.add", params, patient_id, write))
                    contact_ref = f"$result[{key}]"
                else:
                    commands.append(
                        _Command(key, "crm.contact.update", {"id": write.contact_id, **params}, patient_id, write)
                    )
        for write in writes:
            if isinstance(write, DealWrite) and not _is_guarded(write):
                key = f"d_{write.appointment_id}"
                fields = self._deal_fields(write)
                contact = write.contact_id or contact_ref
                if write.deal_id is None:
                    if contact:
                        fields["CONTACT_ID"] = contact
                    fields["CATEGORY_ID"] = write.category_id
                    commands.append(_Command(key, "crm.deal.add", {"fields": fields}, patient_id, write))
                else:
                    if write.link_contact and contact:
                        fields["CONTACT_ID"] = contact  # an adopted deal becomes the patient's
                    commands.append(
                        _Command(key, "crm.deal.update", {"id": write.deal_id, "fields": fields}, patient_id, write)
                    )
        for write in writes:
            if isinstance(write, LeadWrite):
                fields = {"CONTACT_ID": write.contact_id or contact_ref or ""}
                if write.convert:
                    fields["STATUS_ID"] = self._config.matching.converted_lead_status
                commands.append(
                    _Command(
                        f"l_{write.lead_id}",
                        "crm.lead.update",
                        {"id": write.lead_id, "fields": fields},
                        patient_id,
                        write,
                    )
                )
        return guarded + commands

    def _guarded(self, patient_id: str, writes: Sequence[CrmWrite]) -> list[_Command]:
        """Updates that run only if their record is as we left it, in the same ``batch``: a read filtered
        by that condition, then the update with ``id`` = ``$result[<read>][0][ID]`` (b24restdocs,
        api-reference/how-to-call-rest-api/batch.md: a command may use earlier commands' results as
        ``$result[key][field]``, list results by row as ``[0][ID]``). When the read finds no row the
        reference has nothing to resolve to and the update fails for want of an ID ("ID is not defined
        or invalid."), whether the portal leaves the reference as text or empty; halt=1 stops the batch
        there, and the caller reads the record and plans again. No read request when nothing changed."""
        commands: list[_Command] = []
        for write in writes:
            if isinstance(write, ContactWrite) and _is_guarded(write):
                # Still last modified by us: a manager's edit since (an opt-out tick whose webhook is on
                # its way) is taken in before we write over it or become its last modifier.
                condition: dict[str, Any] = {"ID": write.contact_id, "MODIFY_BY_ID": self._client.user_id}
                method, key = "crm.contact", f"c_{patient_id}"
                params: dict[str, Any] = {
                    "fields": self._contact_fields(write),
                    "params": {"REGISTER_SONET_EVENT": "N"},
                }
            elif isinstance(write, DealWrite) and write.expect_stage is not None and _is_guarded(write):
                # Still open at the stage we last wrote (or already at the one we write): a deal a manager
                # moved or closed since is never moved back or reopened.
                stages = list(dict.fromkeys([write.expect_stage, *([write.stage] if write.stage else [])]))
                condition = {"ID": write.deal_id, "CLOSED": "N", "@STAGE_ID": stages}
                method, key = "crm.deal", f"d_{write.appointment_id}"
                params = {"fields": self._deal_fields(write)}
            else:
                continue
            guard = f"g{key}"
            read = {"filter": condition, "select": ["ID"]}
            commands.append(_Command(guard, f"{method}.list", read, patient_id, write, is_guard=True))
            params = {"id": f"$result[{guard}][0][ID]", **params}
            commands.append(_Command(key, f"{method}.update", params, patient_id, write, guard=guard))
        return commands

    def _contact_fields(self, write: ContactWrite) -> dict[str, Any]:
        src = write.fields
        out: dict[str, Any] = {"ORIGINATOR_ID": self._originator, "ORIGIN_ID": write.patient_id}
        if "full_name" in src:
            name = src["full_name"]
            out.update(LAST_NAME=name["last"], NAME=name["first"], SECOND_NAME=name["middle"])
        creating = write.contact_id is None
        for kind, field, value_type in (("phone", "PHONE", "MOBILE"), ("email", "EMAIL", "HOME")):
            value = src.get(kind)
            if not value or not (creating or kind in write.changed_multifields):
                continue
            # Multifields: an entry with ID edits it, one without is appended (never "set the list",
            # which would add a duplicate number on every sync).
            entry = {"VALUE": value, "VALUE_TYPE": value_type}
            existing = None if creating else write.multifield_ids.get(kind)
            out[field] = [{"ID": existing, **entry} if existing else entry]
        for name, value in src.items():
            if name in NATIVE_CONTACT_FIELDS:
                out[NATIVE_CONTACT_FIELDS[name]] = _bitrix_value(value)
            elif name not in NOT_WRITTEN:
                out[self._custom(name)] = self._typed("contact", name, value)
        return out

    def _deal_fields(self, write: DealWrite) -> dict[str, Any]:
        out: dict[str, Any] = {"ORIGINATOR_ID": self._originator, "ORIGIN_ID": write.appointment_id}
        if write.stage is not None:
            out["STAGE_ID"] = write.stage
        if write.lead_id is not None:
            out["LEAD_ID"] = write.lead_id
        if write.lead_source is not None and write.deal_id is None:
            # A deal we create takes the adopted lead's source; a manager's deal we adopt keeps its own.
            out["SOURCE_ID"] = write.lead_source
        for name, value in write.fields.items():
            if name in NATIVE_DEAL_FIELDS:
                out[NATIVE_DEAL_FIELDS[name]] = _bitrix_value(value)
            elif name not in NOT_WRITTEN:
                out[self._custom(name, "deal")] = self._typed("deal", name, value)
        if write.fields.get("visit_at"):
            out["BEGINDATE"] = str(write.fields["visit_at"])[:10]  # the local date: BEGINDATE has no time
        return out


def _is_guarded(write: CrmWrite) -> bool:
    """An update of a record we know that must find it as we left it (creates have nothing to guard)."""
    if isinstance(write, ContactWrite):
        return write.expect_ours and write.contact_id is not None
    return isinstance(write, DealWrite) and write.expect_stage is not None and write.deal_id is not None


def _bitrix_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "Y" if value else "N"
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return "" if value is None else value
