"""Patient states, the CRM's reverse maps and create intents on the table (``PatientStates``,
``CrmIdMaps``, ``CreateIntents``); key formats in ``keys``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import TRANSACT_LIMIT, TableRepository, batch_writer, cancelled, failed_condition
from clinicsync.domain.state import AppointmentState, LatestDeal, PatientState, RunStart
from clinicsync.domain.store_ports import ClaimRelease

INTENT_SECONDS = 2 * 86400  # an intent outlives any retry of its message


def _opt_dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def _apply_item(state: PatientState, item: Mapping[str, Any]) -> None:
    sk = str(item["sk"])
    if sk == keys.STATE:
        state.contact_id = item.get("contact_id")
        state.version = int(item.get("version", -1))
        state.content_hash = item.get("content_hash")
        state.contact_epoch = int(item.get("contact_epoch", 0))
        state.write_epoch = int(item.get("write_epoch", 0))
        state.phone_key = item.get("phone_key")
        state.email_key = item.get("email_key")
        state.first_visit_at = _opt_dt(item.get("first_visit_at"))
        state.last_visit_at = _opt_dt(item.get("last_visit_at"))
        state.audience_hash = item.get("audience_hash")
        # Stored before the flag existed: a known contact meant no adoption by phone any more.
        state.has_deal = bool(item.get("has_deal", state.contact_id is not None))
        state.latest_deals = {
            str(cat): LatestDeal.model_validate(latest) for cat, latest in (item.get("latest_deals") or {}).items()
        }
        state.continued = {str(k): str(v) for k, v in (item.get("continued") or {}).items()}
        state.run_starts = {
            str(cat): RunStart.model_validate(start) for cat, start in (item.get("run_starts") or {}).items()
        }
    elif (aid := keys.appointment_of(sk)) is not None:
        state.appointments[aid] = AppointmentState(
            appointment_id=aid,
            deal_id=item.get("deal_id"),
            version=int(item.get("version", -1)),
            content_hash=item.get("content_hash"),
            epoch=int(item.get("epoch", 0)),
            status=item.get("status"),
            category_id=item.get("category_id"),
            stage=item.get("stage"),
            closed=bool(item.get("closed", False)),
            starts_at=_opt_dt(item.get("starts_at")),
            manual_stage=item.get("manual_stage"),
            manual_status=item.get("manual_status"),
            lead_source=item.get("lead_source"),
        )


def _items_for(state: PatientState, changed_appointments: Sequence[str], before: PatientState) -> list[dict[str, Any]]:
    pk = keys.patient_pk(state.patient_id)
    items: list[dict[str, Any]] = [
        {
            "pk": pk,
            "sk": keys.STATE,
            "contact_id": state.contact_id,
            "version": state.version,
            "content_hash": state.content_hash,
            "contact_epoch": state.contact_epoch,
            "write_epoch": state.write_epoch,
            "phone_key": state.phone_key,
            "email_key": state.email_key,
            "first_visit_at": state.first_visit_at.isoformat() if state.first_visit_at else None,
            "last_visit_at": state.last_visit_at.isoformat() if state.last_visit_at else None,
            "audience_hash": state.audience_hash,
            "has_deal": state.has_deal,
            "latest_deals": {
                cat: latest.model_dump(mode="json", exclude_none=True) for cat, latest in state.latest_deals.items()
            }
            or None,
            "continued": dict(state.continued) or None,
            "run_starts": {
                cat: start.model_dump(mode="json", exclude_none=True)
                for cat, start in state.run_starts_to_keep().items()
            }
            or None,
        }
    ]
    for aid in dict.fromkeys(changed_appointments):
        appt = state.appointments[aid]
        items.append(
            {
                "pk": pk,
                "sk": keys.appointment_sk(aid),
                "deal_id": appt.deal_id,
                "version": appt.version,
                "content_hash": appt.content_hash,
                "epoch": appt.epoch,
                "status": appt.status.value if appt.status else None,
                "category_id": appt.category_id,
                "stage": appt.stage,
                "closed": appt.closed,
                "starts_at": appt.starts_at.isoformat() if appt.starts_at else None,
                "manual_stage": appt.manual_stage,
                "manual_status": appt.manual_status.value if appt.manual_status else None,
                "lead_source": appt.lead_source,
            }
        )
        # The deal's map now names its new appointment (not again for a deal the loaded state held there).
        if appt.deal_id and aid not in state.continued and before.appointment(aid).deal_id != appt.deal_id:
            items.append({**keys.crm_map("deal", appt.deal_id), "patient_id": state.patient_id, "appointment_id": aid})
    if state.contact_id and state.contact_id != before.contact_id:
        items.append({**keys.crm_map("contact", state.contact_id), "patient_id": state.patient_id})
    return [{k: v for k, v in item.items() if v is not None} for item in items]


def state_keys(wanted: Mapping[str, Sequence[str]]) -> list[dict[str, str]]:
    """The keys ``load_patients`` reads: each patient's STATE and the named appointments."""
    wanted_keys = []
    for pid, appointment_ids in wanted.items():
        wanted_keys.append({"pk": keys.patient_pk(pid), "sk": keys.STATE})
        wanted_keys.extend(
            {"pk": keys.patient_pk(pid), "sk": keys.appointment_sk(aid)} for aid in dict.fromkeys(appointment_ids)
        )
    return wanted_keys


def states_from(wanted: Mapping[str, Sequence[str]], items: Iterable[Mapping[str, Any]]) -> dict[str, PatientState]:
    """The states of ``wanted`` from the items read at ``state_keys(wanted)``."""
    states = {pid: PatientState(patient_id=pid) for pid in wanted}
    for item in items:
        _apply_item(states[keys.patient_of(str(item["pk"]))], item)
    return states


def intents_from(items: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    return {keys.intent_of(str(i["pk"])): int(i["at"]) for i in items}


class DynamoPatientStates(TableRepository):
    def load_patients(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, PatientState]:
        """Each patient's STATE plus the named appointments, in BatchGetItem calls of 100 keys.

        ``wanted`` maps a patient id to the appointment ids the caller is about to touch.
        """
        return states_from(wanted, self._batch_get(state_keys(wanted)))

    def _load_patient(self, patient_id: str) -> PatientState:
        state = PatientState(patient_id=patient_id)
        for item in self._query(keys.patient_pk(patient_id)):
            _apply_item(state, item)
        return state

    def save_patients(
        self,
        saves: Sequence[tuple[PatientState, Sequence[str]]],
        loaded: Mapping[str, PatientState],
        release: ClaimRelease | None = None,
    ) -> None:
        """Persist after the CRM accepted the writes.

        Items that already existed when ``loaded`` was read are replaced with a condition on their
        version (never older over newer), up to 100 per TransactWriteItems request rather than one
        request each. New items go in BatchWriteItem calls: nobody else can be creating them, since a
        patient's shard is a FIFO group served by one invocation at a time. A reverse map is written
        only when its CRM id is new to the loaded state (an id a state holds was mapped before it was
        stored); with the versioned items, ahead of them in their transaction, else ahead of the new items.

        With ``release`` (the sync's claims and settled intents, deletes), when every item and delete
        fits in one transaction, all go in it, new items too: a steady-day message's save and release
        cost one request instead of two or three. Otherwise as above, and the caller releases after the
        save: batches are not atomic, and a settled intent must not go before the state it guards.
        """
        fresh: list[dict[str, Any]] = []
        maps: dict[tuple[str, str], dict[str, Any]] = {}
        versioned: dict[tuple[str, str], dict[str, Any]] = {}
        for state, changed in saves:
            before = loaded.get(state.patient_id, PatientState(patient_id=state.patient_id))
            for item in _items_for(state, changed, before):
                sk = str(item["sk"])
                aid = keys.appointment_of(sk)
                existed = (sk == keys.STATE and before.version >= 0) or (
                    aid is not None and before.appointment(aid).version >= 0
                )
                if "version" not in item:
                    maps[(str(item["pk"]), sk)] = item
                elif existed:
                    versioned[(str(item["pk"]), sk)] = item
                else:
                    fresh.append(item)
        riders = _release_keys(release) if release is not None else []
        new = {(str(i["pk"]), str(i["sk"])): i for i in fresh}  # a transaction names an item once
        if release is not None and riders and len(maps) + len(versioned) + len(new) + len(riders) <= TRANSACT_LIMIT:
            # All of it fits one transaction (new items too: their condition holds): one atomic request.
            release.done = self._put_if_not_older([*maps.values(), *versioned.values(), *new.values()], riders)
            return
        if versioned:
            items = [*maps.values(), *versioned.values()]
            for start in range(0, len(items), TRANSACT_LIMIT):
                self._put_if_not_older(items[start : start + TRANSACT_LIMIT])
        else:
            fresh = [*maps.values(), *fresh]
        if fresh:
            with batch_writer(self._table, ["pk", "sk"]) as batch:
                for item in fresh:
                    batch.put_item(Item=item)

    def _put_if_not_older(self, items: list[dict[str, Any]], deletes: Sequence[keys.Key] = ()) -> bool:
        """Conditional puts (reverse maps: plain puts) and ``deletes`` in one transaction; an item whose
        stored version is newer is dropped on purpose (the transaction is cancelled for it and sent again
        without it). Deletes a concurrent transaction conflicted with are left out too: returns whether
        the deletes went with the puts."""
        while items:
            transact = [
                {
                    "Put": {
                        "TableName": self._table.name,
                        "Item": item,
                        "ConditionExpression": "attribute_not_exists(pk) OR version <= :v",
                        "ExpressionAttributeValues": {":v": item["version"]},
                    }
                }
                if "version" in item
                else {"Put": {"TableName": self._table.name, "Item": item}}  # a reverse map: unconditional
                for item in items
            ] + [{"Delete": {"TableName": self._table.name, "Key": key}} for key in deletes]
            try:
                self._transact(transact)
                return bool(deletes)
            except ClientError as exc:
                if not cancelled(exc):
                    raise
                reasons = [r.get("Code", "None") for r in exc.response.get("CancellationReasons", [])]
                if len(reasons) != len(items) + len(deletes):
                    raise
                newer = [code == "ConditionalCheckFailed" for code in reasons[: len(items)]]
                raced = any(code != "None" for code in reasons[len(items) :])  # another transaction's claim
                if not any(newer) and not raced:
                    raise  # cancelled for another reason (a conflicting transaction): the message is retried
                # Both at once: one resend settles every reason this cancellation gave.
                items = [item for item, dropped in zip(items, newer, strict=True) if not dropped]
                deletes = () if raced else deletes  # the caller releases after
        return False

    def mark_unsure(self, patient_ids: Sequence[str]) -> None:
        """One conditional UpdateItem per stored patient (a failure's path only): ``write_epoch`` + 1."""
        for pid in dict.fromkeys(patient_ids):
            try:
                self._table.update_item(
                    Key={"pk": keys.patient_pk(pid), "sk": keys.STATE},
                    UpdateExpression="ADD write_epoch :one",
                    ConditionExpression="attribute_exists(pk)",
                    ExpressionAttributeValues={":one": 1},
                )
            except ClientError as exc:
                if not failed_condition(exc):
                    raise

    def delete_patient(self, patient_id: str) -> None:
        state = self._load_patient(patient_id)
        gone: list[dict[str, str]] = [{"pk": keys.patient_pk(patient_id), "sk": keys.STATE}]
        for aid, appt in state.appointments.items():
            gone.append({"pk": keys.patient_pk(patient_id), "sk": keys.appointment_sk(aid)})
            if appt.deal_id:
                gone.append(keys.crm_map("deal", appt.deal_id))
        if state.contact_id:
            gone.append(keys.crm_map("contact", state.contact_id))
        if state.phone_key:
            gone.append(keys.phone(state.phone_key, patient_id))
        with batch_writer(self._table) as batch:
            for key in gone:
                batch.delete_item(Key=key)


class DynamoCrmIdMaps(TableRepository):
    def patient_for_crm(self, entity: str, crm_id: str) -> dict[str, str] | None:
        item = self._table.get_item(Key=keys.crm_map(entity, crm_id)).get("Item")
        return {k: str(v) for k, v in item.items() if k not in ("pk", "sk")} if item else None


class DynamoCreateIntents(TableRepository):
    def write_intents(self, intent_keys: Sequence[str], at: int) -> None:
        """Recorded before a create is sent: if its response is lost, the retry knows to look it up."""
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for key in dict.fromkeys(intent_keys):
                batch.put_item(Item={**keys.intent(key), "at": at, "expires_at": at + INTENT_SECONDS})

    def load_intents(self, intent_keys: Sequence[str]) -> dict[str, int]:
        return intents_from(self._batch_get([keys.intent(k) for k in dict.fromkeys(intent_keys)]))

    def clear_intents(self, intent_keys: Sequence[str]) -> None:
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for key in dict.fromkeys(intent_keys):
                batch.delete_item(Key=keys.intent(key))


def _release_keys(release: ClaimRelease) -> list[keys.Key]:
    return [keys.claim(pid) for pid in dict.fromkeys(release.patients)] + [
        keys.intent(key) for key in dict.fromkeys(release.intents)
    ]
