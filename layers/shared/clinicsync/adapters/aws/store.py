"""The single DynamoDB table: id mappings, cursors, the phone index and the consent ledger.

Key design (documented in docs/storage.md):

    pk                      sk                    what
    PAT#<patient id>        STATE                 contact id, version, content hash, phone HMAC, first visit
    PAT#<patient id>        APPT#<appt id>        deal id, version, content hash, status, stage, closed, manual move
    CRM#contact#<id>        MAP                   reverse map for webhooks: patient id
    CRM#deal#<id>           MAP                   reverse map: patient id, appointment id
    CURSOR                  <source>              the poller's opaque cursor for a MIS feed
    LEASE                   <name>                single-runner lease (overlapping scheduled polls)
    CLAIM#<patient id>      C                     the syncer invocation writing this patient right now
    INTENT#<P|A>#<id>       I                     a create about to be sent (lost-response recovery)
    PHONE#<hmac>            PAT#<patient id>      phone index (keyed HMAC, never the number)
    CRMPHONES               E#<contact>#<hmac>    the CRM account's contacts by phone key (amoCRM look-up)
    CRMPHONES               CURSOR                how far that index has read the CRM (``updated_at``)
    CONSENT#<subject>       CH#<channel>          current state per channel: opted_out, source, at (sticky)
    CONSENT#<subject>       AUDIT#<ts>#<ch>#<ev>  audit trail (event, source, detail), expires via TTL
    CONSENT#<subject>       ID                    keyed hashes and system ids the subject is known by
    CONSENT#<subject>       OUT                   per output (crm, mis, mailchimp): the ledger digest it reached
    CONSENT#<subject>       SEEN#crm_opt_ins      the CRM opt-in field as last seen or written: contact id, channels, at
    EMAIL#<hmac>            SUBJ#<subject>        e-mail index: a Mailchimp event's address -> the subject
    MEMBERS#<subject>       M                     Mailchimp members the person has had: m_<subscriber hash> = "-"
                                                  or the hash it moved to (upemail); current = their member now

One query on ``PAT#<id>`` returns everything about a patient. Nothing here holds a name, a phone
or an e-mail: subjects and phone keys are HMACs under the clinic's key.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import TYPE_CHECKING, Any

from boto3.dynamodb.conditions import Key
from botocore.exceptions import ClientError

from clinicsync.adapters.http.retrying import Transient, call_with_retries, exponential
from clinicsync.domain.audience import MemberBook
from clinicsync.domain.ports import ConsentSource, Cursor
from clinicsync.domain.state import AppointmentState, LatestDeal, PatientState

if TYPE_CHECKING:
    from mypy_boto3_dynamodb.service_resource import Table

AUDIT_TTL_SECONDS = 400 * 24 * 3600  # keep the opt-out audit trail for 400 days
TRANSACT_LIMIT = 100  # items per TransactWriteItems request
_MEMBER_PREFIX = "m_"


def _patient_pk(patient_id: str) -> str:
    return f"PAT#{patient_id}"


_CRM_PHONES = "CRMPHONES"


def _crm_phone_sk(contact_id: str, phone_key: str) -> str:
    """The one place the CRM phone index's entry key is spelt (read back by ``_crm_phone_entry``)."""
    return f"E#{contact_id}#{phone_key}"


def _crm_phone_entry(sk: str) -> tuple[str, str] | None:
    kind, _, rest = sk.partition("#")
    contact_id, _, phone_key = rest.partition("#")
    return (contact_id, phone_key) if kind == "E" and contact_id and phone_key else None


def _opt_dt(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) and value else None


def _apply_item(state: PatientState, item: Mapping[str, Any]) -> None:
    sk = str(item["sk"])
    if sk == "STATE":
        state.contact_id = item.get("contact_id")
        state.version = int(item.get("version", -1))
        state.content_hash = item.get("content_hash")
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
    elif sk.startswith("APPT#"):
        aid = sk.removeprefix("APPT#")
        state.appointments[aid] = AppointmentState(
            appointment_id=aid,
            deal_id=item.get("deal_id"),
            version=int(item.get("version", -1)),
            content_hash=item.get("content_hash"),
            status=item.get("status"),
            category_id=item.get("category_id"),
            stage=item.get("stage"),
            closed=bool(item.get("closed", False)),
            starts_at=_opt_dt(item.get("starts_at")),
            manual_stage=item.get("manual_stage"),
            manual_status=item.get("manual_status"),
            lead_source=item.get("lead_source"),
        )


def _items_for(state: PatientState, changed_appointments: Sequence[str]) -> list[dict[str, Any]]:
    pk = _patient_pk(state.patient_id)
    items: list[dict[str, Any]] = [
        {
            "pk": pk,
            "sk": "STATE",
            "contact_id": state.contact_id,
            "version": state.version,
            "content_hash": state.content_hash,
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
        }
    ]
    for aid in dict.fromkeys(changed_appointments):
        appt = state.appointments[aid]
        items.append(
            {
                "pk": pk,
                "sk": f"APPT#{aid}",
                "deal_id": appt.deal_id,
                "version": appt.version,
                "content_hash": appt.content_hash,
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
        if appt.deal_id and aid not in state.continued:  # the deal's map now names its new appointment
            items.append(
                {"pk": f"CRM#deal#{appt.deal_id}", "sk": "MAP", "patient_id": state.patient_id, "appointment_id": aid}
            )
    if state.contact_id:
        items.append({"pk": f"CRM#contact#{state.contact_id}", "sk": "MAP", "patient_id": state.patient_id})
    return [{k: v for k, v in item.items() if v is not None} for item in items]


def batch_get(
    table: Table, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None] = time.sleep
) -> list[dict[str, Any]]:
    """The items of ``keys``, 100 per ``BatchGetItem``. Throttled keys come back unprocessed: they are
    asked again after a backoff (0.05 s doubling), 8 requests per 100 keys at most."""
    items: list[dict[str, Any]] = []
    for start in range(0, len(keys), 100):
        items.extend(_batch_get_chunk(table, keys[start : start + 100], sleep))
    return items


def _batch_get_chunk(
    table: Table, keys: Sequence[Mapping[str, str]], sleep: Callable[[float], None]
) -> list[dict[str, Any]]:
    client = table.meta.client
    items: list[dict[str, Any]] = []
    request: dict[str, Any] = {table.name: {"Keys": list(keys)}}

    def attempt(_: int) -> list[dict[str, Any]]:
        nonlocal request
        response = client.batch_get_item(RequestItems=request)
        # The resource's client (de)serialises DynamoDB types itself: items come back plain.
        items.extend(response.get("Responses", {}).get(table.name, []))
        request = dict(response.get("UnprocessedKeys") or {})
        if request:
            raise Transient("unprocessed keys")
        return items

    return call_with_retries(
        attempt,
        attempts=8,
        wait=exponential(0.05),
        sleep=sleep,
        exhausted=lambda _: RuntimeError("DynamoDB kept keys unprocessed"),
        wait_after_last=True,
    )


class DynamoStore:
    def __init__(self, table: Table) -> None:
        self._table = table

    # --- patients ----------------------------------------------------------------------------------

    def load_patients(self, wanted: Mapping[str, Sequence[str]]) -> dict[str, PatientState]:
        """Each patient's STATE plus the named appointments, in BatchGetItem calls of 100 keys.

        ``wanted`` maps a patient id to the appointment ids the caller is about to touch.
        """
        keys = []
        for pid, appointment_ids in wanted.items():
            keys.append({"pk": _patient_pk(pid), "sk": "STATE"})
            keys.extend({"pk": _patient_pk(pid), "sk": f"APPT#{aid}"} for aid in dict.fromkeys(appointment_ids))
        states = {pid: PatientState(patient_id=pid) for pid in wanted}
        for item in self._batch_get(keys):
            _apply_item(states[str(item["pk"]).removeprefix("PAT#")], item)
        return states

    def _batch_get(self, keys: Sequence[dict[str, str]]) -> list[dict[str, Any]]:
        return batch_get(self._table, keys)

    def _load_patient(self, patient_id: str) -> PatientState:
        state = PatientState(patient_id=patient_id)
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(_patient_pk(patient_id))}
        while True:
            page = self._table.query(**kwargs)
            for item in page.get("Items", []):
                _apply_item(state, item)
            if "LastEvaluatedKey" not in page:
                return state
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def save_patients(
        self, saves: Sequence[tuple[PatientState, Sequence[str]]], loaded: Mapping[str, PatientState]
    ) -> None:
        """Persist after the CRM accepted the writes.

        Items that already existed when ``loaded`` was read are replaced with a condition on their
        version (never older over newer), up to 100 per TransactWriteItems request rather than one
        request each. New items and reverse maps go in BatchWriteItem calls: nobody else can be
        creating them, since a patient's shard is a FIFO group served by one invocation at a time.
        """
        fresh: list[dict[str, Any]] = []
        versioned: dict[tuple[str, str], dict[str, Any]] = {}
        for state, changed in saves:
            before = loaded.get(state.patient_id, PatientState(patient_id=state.patient_id))
            for item in _items_for(state, changed):
                sk = str(item["sk"])
                existed = (sk == "STATE" and before.version >= 0) or (
                    sk.startswith("APPT#") and before.appointment(sk.removeprefix("APPT#")).version >= 0
                )
                if existed and "version" in item:
                    versioned[(str(item["pk"]), sk)] = item
                else:
                    fresh.append(item)
        items = list(versioned.values())
        for start in range(0, len(items), TRANSACT_LIMIT):
            self._put_if_not_older(items[start : start + TRANSACT_LIMIT])
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for item in fresh:
                batch.put_item(Item=item)

    def _put_if_not_older(self, items: list[dict[str, Any]]) -> None:
        """Conditional puts in one transaction; an item whose stored version is newer is dropped on
        purpose (the transaction is cancelled for it and sent again without it)."""
        client = self._table.meta.client
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
                for item in items
            ]
            try:
                client.transact_write_items(TransactItems=transact)  # type: ignore[arg-type]
                return
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                reasons = exc.response.get("CancellationReasons", [])
                newer = [r.get("Code") == "ConditionalCheckFailed" for r in reasons]
                if len(newer) != len(items) or not any(newer):
                    raise  # cancelled for another reason (a conflicting transaction): the message is retried
                items = [item for item, dropped in zip(items, newer, strict=True) if not dropped]

    def delete_patient(self, patient_id: str) -> None:
        state = self._load_patient(patient_id)
        keys: list[dict[str, str]] = [{"pk": _patient_pk(patient_id), "sk": "STATE"}]
        for aid, appt in state.appointments.items():
            keys.append({"pk": _patient_pk(patient_id), "sk": f"APPT#{aid}"})
            if appt.deal_id:
                keys.append({"pk": f"CRM#deal#{appt.deal_id}", "sk": "MAP"})
        if state.contact_id:
            keys.append({"pk": f"CRM#contact#{state.contact_id}", "sk": "MAP"})
        if state.phone_key:
            keys.append({"pk": f"PHONE#{state.phone_key}", "sk": _patient_pk(patient_id)})
        with self._table.batch_writer() as batch:
            for key in keys:
                batch.delete_item(Key=key)

    def patient_for_crm(self, entity: str, crm_id: str) -> dict[str, str] | None:
        item = self._table.get_item(Key={"pk": f"CRM#{entity}#{crm_id}", "sk": "MAP"}).get("Item")
        return {k: str(v) for k, v in item.items() if k not in ("pk", "sk")} if item else None

    # --- cursors -----------------------------------------------------------------------------------

    def get_cursor(self, source: str) -> Cursor | None:
        item = self._table.get_item(Key={"pk": "CURSOR", "sk": source}).get("Item")
        return json.loads(str(item["cursor"])) if item else None

    def put_cursor(self, source: str, cursor: Cursor) -> None:
        self._table.put_item(
            Item={
                "pk": "CURSOR",
                "sk": source,
                "cursor": json.dumps(dict(cursor)),
                "updated_at": int(time.time()),
            }
        )

    # --- create intents -----------------------------------------------------------------------------

    def write_intents(self, keys: Sequence[str], at: int) -> None:
        """Recorded before a create is sent: if its response is lost, the retry knows to look it up."""
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for key in dict.fromkeys(keys):
                batch.put_item(Item={"pk": f"INTENT#{key}", "sk": "I", "at": at, "expires_at": at + 2 * 86400})

    def load_intents(self, keys: Sequence[str]) -> dict[str, int]:
        found = self._batch_get([{"pk": f"INTENT#{k}", "sk": "I"} for k in dict.fromkeys(keys)])
        return {str(i["pk"]).removeprefix("INTENT#"): int(i["at"]) for i in found}

    def clear_intents(self, keys: Sequence[str]) -> None:
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for key in dict.fromkeys(keys):
                batch.delete_item(Key={"pk": f"INTENT#{key}", "sk": "I"})

    # --- leases ------------------------------------------------------------------------------------

    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
        """At most one holder at a time (polls may overlap when one runs long); expired leases are taken over."""
        try:
            self._table.put_item(
                Item={"pk": "LEASE", "sk": name, "owner": owner, "expires_at": now + seconds},
                ConditionExpression="attribute_not_exists(pk) OR expires_at < :now OR #o = :owner",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":now": now, ":owner": owner},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] == "ConditionalCheckFailedException":
                return False
            raise
        return True

    def release_lease(self, name: str, owner: str) -> None:
        try:
            self._table.delete_item(
                Key={"pk": "LEASE", "sk": name},
                ConditionExpression="#o = :owner",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":owner": owner},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    # --- per-patient claims ---------------------------------------------------------------------------

    def claim_patients(self, patient_ids: Sequence[str], owner: str, now: int, seconds: int) -> set[str]:
        """Claim patients for one syncer invocation; returns those claimed (the rest are held by another).

        Conditional puts in TransactWriteItems of 100: one request per message in the normal case. A
        cancelled transaction names the held items; the others are claimed again without them. If a
        request fails otherwise half-way, the claims already taken are released before the error goes
        up: nobody may stay locked out for ``seconds`` by a sync that never ran.
        """
        claimed: set[str] = set()
        try:
            return self._claim_chunks(list(dict.fromkeys(patient_ids)), owner, now, seconds, claimed)
        except Exception:
            if claimed:
                self.release_claims(sorted(claimed))
            raise

    def _claim_chunks(self, pending: list[str], owner: str, now: int, seconds: int, claimed: set[str]) -> set[str]:
        client = self._table.meta.client
        while pending:
            chunk, pending = pending[:100], pending[100:]
            while chunk:
                items = [
                    {
                        "Put": {
                            "TableName": self._table.name,
                            "Item": {"pk": f"CLAIM#{pid}", "sk": "C", "owner": owner, "expires_at": now + seconds},
                            "ConditionExpression": "attribute_not_exists(pk) OR expires_at < :now OR #o = :owner",
                            "ExpressionAttributeNames": {"#o": "owner"},
                            "ExpressionAttributeValues": {":now": now, ":owner": owner},
                        }
                    }
                    for pid in chunk
                ]
                try:
                    client.transact_write_items(TransactItems=items)  # type: ignore[arg-type]
                except ClientError as exc:
                    if exc.response["Error"]["Code"] != "TransactionCanceledException":
                        raise
                    reasons = exc.response.get("CancellationReasons", [])
                    # A live claim fails its condition; two claims racing for one item conflict instead.
                    busy = ("ConditionalCheckFailed", "TransactionConflict")
                    held = {pid for pid, r in zip(chunk, reasons, strict=False) if r.get("Code") in busy}
                    if not held:
                        raise  # cancelled for another reason (a conflicting transaction): the caller retries
                    chunk = [pid for pid in chunk if pid not in held]
                    continue
                claimed.update(chunk)
                break
        return claimed

    def release_claims(self, patient_ids: Sequence[str]) -> None:
        """Unconditional deletes in batches: a claim outlives the syncer's timeout, so while its owner
        runs nobody else can have taken it over."""
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for pid in dict.fromkeys(patient_ids):
                batch.delete_item(Key={"pk": f"CLAIM#{pid}", "sk": "C"})

    # --- adoptions ----------------------------------------------------------------------------------

    def claim_adoptions(self, claims: Mapping[str, str], now: int, seconds: int) -> set[str]:
        """Claim CRM records (``L<lead id>``/``D<deal id>`` -> the appointment adopting them); returns
        the keys another appointment holds. Concurrent invocations read the CRM before either writes,
        so the CRM alone cannot stop a record being adopted twice. A repeat by the same appointment
        (a redelivery, a retry) succeeds; a claim expires, by when the CRM shows the adoption."""
        held: set[str] = set()
        for key, appointment_id in claims.items():
            try:
                self._table.put_item(
                    Item={"pk": f"ADOPT#{key}", "sk": "A", "owner": appointment_id, "expires_at": now + seconds},
                    ConditionExpression="attribute_not_exists(pk) OR expires_at < :now OR #o = :owner",
                    ExpressionAttributeNames={"#o": "owner"},
                    ExpressionAttributeValues={":now": now, ":owner": appointment_id},
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                held.add(key)
        return held

    # --- phone index -------------------------------------------------------------------------------

    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None:
        if previous_key and previous_key != phone_key:
            self._table.delete_item(Key={"pk": f"PHONE#{previous_key}", "sk": _patient_pk(patient_id)})
        self._table.put_item(Item={"pk": f"PHONE#{phone_key}", "sk": _patient_pk(patient_id)})

    def index_phones(self, entries: Sequence[tuple[str, str]]) -> None:
        """(phone key, patient id) pairs, written in batches; stale keys are removed by ``index_phone``."""
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for phone_key, patient_id in dict.fromkeys(entries):
                batch.put_item(Item={"pk": f"PHONE#{phone_key}", "sk": _patient_pk(patient_id)})

    def patients_by_phone(self, phone_key: str) -> list[str]:
        page = self._table.query(KeyConditionExpression=Key("pk").eq(f"PHONE#{phone_key}"))
        return [str(item["sk"]).removeprefix("PAT#") for item in page.get("Items", [])]

    # --- the CRM account's phone index (amoCRM: its contacts cannot be searched by phone) -------------

    def crm_phone_index(self) -> tuple[int | None, dict[str, set[str]]]:
        """(how far the index has read the CRM, contact id -> phone keys). The cursor sorts first in the
        partition, so it is read before the entries: every entry written before it moved is then read."""
        cursor: int | None = None
        contacts: dict[str, set[str]] = {}
        query: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(_CRM_PHONES), "ConsistentRead": True}
        while True:
            page = self._table.query(**query)
            for item in page.get("Items", []):
                if item["sk"] == "CURSOR":
                    cursor = int(str(item["seen_to"]))
                elif (entry := _crm_phone_entry(str(item["sk"]))) is not None:
                    contacts.setdefault(entry[0], set()).add(entry[1])
            if "LastEvaluatedKey" not in page:
                return cursor, contacts
            query["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def update_crm_phones(self, add: Sequence[tuple[str, str]], drop: Sequence[tuple[str, str]]) -> None:
        """Put and delete ``(contact id, phone key)`` entries, in batches; both are safe to repeat."""
        if not add and not drop:
            return
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for contact_id, phone_key in dict.fromkeys(drop):
                batch.delete_item(Key={"pk": _CRM_PHONES, "sk": _crm_phone_sk(contact_id, phone_key)})
            for contact_id, phone_key in dict.fromkeys(add):
                batch.put_item(Item={"pk": _CRM_PHONES, "sk": _crm_phone_sk(contact_id, phone_key)})

    def advance_crm_phones(self, seen_to: int) -> None:
        """Move the index's cursor forward only: a slower container never moves it back."""
        try:
            self._table.put_item(
                Item={"pk": _CRM_PHONES, "sk": "CURSOR", "seen_to": seen_to},
                ConditionExpression="attribute_not_exists(pk) OR seen_to < :to",
                ExpressionAttributeValues={":to": seen_to},
            )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise

    # --- consent ledger ----------------------------------------------------------------------------

    def record_opt_outs(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        """Opt-outs are sticky: recording one again is a no-op, and only a newer explicit opt-in (see
        ``record_opt_ins``) ever lifts one. Returns the channels that changed (they need outputs).

        Every channel and its audit entry go in one transaction (one request, not two per channel);
        if a channel is already out, the transaction is cancelled and the channels go one by one."""
        wanted = list(dict.fromkeys(channels))
        if not wanted:
            return []
        client = self._table.meta.client
        items: list[dict[str, Any]] = []
        for channel in wanted:
            items.append({"Put": {"TableName": self._table.name, **self._opt_out_put(subject, channel, source, at)}})
            audit = self._audit_item(subject, channel, "opt_out", source, at, detail)
            items.append({"Put": {"TableName": self._table.name, "Item": audit}})
        try:
            client.transact_write_items(TransactItems=items)  # type: ignore[arg-type]
            return wanted
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "TransactionCanceledException":
                raise
        changed = []
        for channel in wanted:
            try:
                self._table.put_item(**self._opt_out_put(subject, channel, source, at))
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                continue
            self._audit(subject, channel, "opt_out", source, at, detail)
            changed.append(channel)
        return changed

    @staticmethod
    def _opt_out_put(subject: str, channel: str, source: ConsentSource, at: int) -> dict[str, Any]:
        return {
            "Item": {"pk": f"CONSENT#{subject}", "sk": f"CH#{channel}", "opted_out": True, "source": source, "at": at},
            # New, or an earlier opt-in that this later opt-out overrides.
            "ConditionExpression": "attribute_not_exists(pk) OR (opted_out = :no AND #at <= :at)",
            "ExpressionAttributeNames": {"#at": "at"},
            "ExpressionAttributeValues": {":no": False, ":at": at},
        }

    def record_opt_ins(
        self, subject: str, channels: Sequence[str], source: ConsentSource, at: int, detail: str = ""
    ) -> list[str]:
        """An explicit opt-in from the MIS or the CRM lifts an opt-out only if it is newer than it."""
        if source not in ("mis", "crm"):
            raise ValueError("only the MIS or the CRM can record an opt-in")
        changed = []
        for channel in channels:
            try:
                self._table.put_item(
                    Item={
                        "pk": f"CONSENT#{subject}",
                        "sk": f"CH#{channel}",
                        "opted_out": False,
                        "source": source,
                        "at": at,
                    },
                    ConditionExpression="opted_out = :yes AND #at < :at",
                    ExpressionAttributeNames={"#at": "at"},
                    ExpressionAttributeValues={":yes": True, ":at": at},
                )
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                    raise
                continue
            self._audit(subject, channel, "opt_in", source, at, detail)
            changed.append(channel)
        return changed

    def observe_crm_opt_ins(
        self, subject: str, contact_id: str, opt_ins: Sequence[str], at: int, held: Sequence[str] = ()
    ) -> list[str]:
        """Note the mapped CRM contact's opt-in field as seen at ``at`` (its modification time) and return
        the channels it gained since the last observation. Nothing is gained on the first observation of
        a contact, nor from a snapshot older than the last one: an unchanged field is never an opt-in,
        however recently the record was touched. A gained channel in ``held`` (the opt-out field still
        lists it) is not noted as seen, so it counts once that field is cleared."""
        key = {"pk": f"CONSENT#{subject}", "sk": "SEEN#crm_opt_ins"}
        old = self._table.get_item(Key=key, ConsistentRead=True).get("Item")
        same = old is not None and old.get("contact_id") == contact_id
        if old is not None and same and int(str(old["at"])) > at:
            return []  # older than what we already saw
        before = set(str(old["channels"]).split(",")) if old is not None and same else set(opt_ins)
        gained = set(opt_ins) - before
        waiting = gained & set(held)
        seen = ",".join(sorted(set(opt_ins) - waiting)) or "-"
        item: dict[str, Any] = {**key, "contact_id": contact_id, "channels": seen, "at": at}
        try:
            if old is None:
                self._table.put_item(Item=item, ConditionExpression="attribute_not_exists(pk)")
            else:  # unchanged since our read, or a concurrent observation decides
                self._table.put_item(
                    Item=item,
                    ConditionExpression="channels = :c AND contact_id = :k AND #at = :at",
                    ExpressionAttributeNames={"#at": "at"},
                    ExpressionAttributeValues={":c": old["channels"], ":k": old["contact_id"], ":at": old["at"]},
                )
        except ClientError as exc:
            if exc.response["Error"]["Code"] != "ConditionalCheckFailedException":
                raise
            return []
        return sorted(gained - waiting)

    def _audit(self, subject: str, channel: str, event: str, source: str, at: int, detail: str) -> None:
        self._table.put_item(Item=self._audit_item(subject, channel, event, source, at, detail))

    @staticmethod
    def _audit_item(subject: str, channel: str, event: str, source: str, at: int, detail: str) -> dict[str, Any]:
        return {
            "pk": f"CONSENT#{subject}",
            "sk": f"AUDIT#{at:012d}#{channel}#{event}",
            "event": event,
            "channel": channel,
            "source": source,
            "detail": detail,
            "at": at,
            "expires_at": at + AUDIT_TTL_SECONDS,
        }

    def opted_out_many(self, subjects: Sequence[str], channels: Sequence[str]) -> dict[str, set[str]]:
        keys = [{"pk": f"CONSENT#{s}", "sk": f"CH#{c}"} for s in dict.fromkeys(subjects) for c in channels]
        found: dict[str, set[str]] = {s: set() for s in subjects}
        for item in self._batch_get(keys):
            if item.get("opted_out"):
                found[str(item["pk"]).removeprefix("CONSENT#")].add(str(item["sk"]).removeprefix("CH#"))
        return found

    def consent_items(self, subject: str) -> list[dict[str, Any]]:
        """Everything the ledger holds for one subject: channels, audit trail, identity, outputs."""
        kwargs: dict[str, Any] = {"KeyConditionExpression": Key("pk").eq(f"CONSENT#{subject}")}
        items: list[dict[str, Any]] = []
        while True:
            page = self._table.query(**kwargs)
            items.extend(page.get("Items", []))
            if "LastEvaluatedKey" not in page:
                return items
            kwargs["ExclusiveStartKey"] = page["LastEvaluatedKey"]

    def note_identity(self, subject: str, keys: Mapping[str, str | None]) -> None:
        """Which keyed hashes and system ids a subject is known by (never the values themselves)."""
        values = {k: v for k, v in keys.items() if v}
        if not values:
            return
        names = {f"#k{i}": k for i, k in enumerate(values)}
        sets = ", ".join(f"#k{i} = :v{i}" for i in range(len(values)))
        self._table.update_item(
            Key={"pk": f"CONSENT#{subject}", "sk": "ID"},
            UpdateExpression=f"SET {sets}",
            ExpressionAttributeNames=names,
            ExpressionAttributeValues={f":v{i}": v for i, v in enumerate(values.values())},
        )

    def output_done(self, subject: str) -> dict[str, str]:
        """Per output target, the ledger digest it last reached (a retried job skips finished targets)."""
        item = self._table.get_item(Key={"pk": f"CONSENT#{subject}", "sk": "OUT"}).get("Item") or {}
        return {str(k): str(v) for k, v in item.items() if k not in ("pk", "sk")}

    def mark_output(self, subject: str, target: str, digest: str) -> None:
        self._table.update_item(
            Key={"pk": f"CONSENT#{subject}", "sk": "OUT"},
            UpdateExpression="SET #t = :d",
            ExpressionAttributeNames={"#t": target},
            ExpressionAttributeValues={":d": digest},
        )

    # --- Mailchimp members ---------------------------------------------------------------------------

    def mailchimp_members_many(self, subjects: Sequence[str]) -> dict[str, MemberBook]:
        books = {s: MemberBook() for s in subjects}
        for item in self._batch_get([{"pk": f"MEMBERS#{s}", "sk": "M"} for s in dict.fromkeys(subjects)]):
            book = books[str(item["pk"]).removeprefix("MEMBERS#")]
            book.current = str(item["current"]) if item.get("current") else None
            for name, value in item.items():
                if name.startswith(_MEMBER_PREFIX):
                    member = name.removeprefix(_MEMBER_PREFIX)
                    book.known.add(member)
                    if value != "-":
                        book.moved[member] = str(value)
        return books

    def note_mailchimp_member(self, subject: str, member: str, moved_from: str | None = None) -> None:
        """``member`` is now the subject's member; ``moved_from``, if given, was moved to it (upemail, or
        our address change). Old members stay listed: an opt-out still reaches them."""
        hashes = [h for h in (member, moved_from) if h]
        if not all(re.fullmatch(r"[0-9a-f]{32}", h) for h in hashes):
            raise ValueError("not a subscriber hash")
        names = {"#m": _MEMBER_PREFIX + member, "#cur": "current"}
        values = {":m": member, ":dash": "-"}
        sets = ["#cur = :m", "#m = :dash"]
        if moved_from and moved_from != member:
            names["#o"] = _MEMBER_PREFIX + moved_from
            sets.append("#o = :m")
        self._table.update_item(
            Key={"pk": f"MEMBERS#{subject}", "sk": "M"},
            UpdateExpression="SET " + ", ".join(sets),
            ExpressionAttributeNames=names,
            ExpressionAttributeValues=values,
        )

    def mark_outputs(self, target: str, digests: Mapping[str, str]) -> None:
        """``mark_output`` for many subjects (subject -> digest): up to 100 per transaction. A transaction
        cancelled by a concurrent update of one of them (a consent job) is marked one by one instead."""
        client = self._table.meta.client
        subjects = list(digests)
        for start in range(0, len(subjects), TRANSACT_LIMIT):
            chunk = subjects[start : start + TRANSACT_LIMIT]
            items = [
                {
                    "Update": {
                        "TableName": self._table.name,
                        "Key": {"pk": f"CONSENT#{subject}", "sk": "OUT"},
                        "UpdateExpression": "SET #t = :d",
                        "ExpressionAttributeNames": {"#t": target},
                        "ExpressionAttributeValues": {":d": digests[subject]},
                    }
                }
                for subject in chunk
            ]
            try:
                client.transact_write_items(TransactItems=items)  # type: ignore[arg-type]
            except ClientError as exc:
                if exc.response["Error"]["Code"] != "TransactionCanceledException":
                    raise
                for subject in chunk:
                    self.mark_output(subject, target, digests[subject])

    # --- e-mail index ------------------------------------------------------------------------------

    def index_emails(self, entries: Sequence[tuple[str, str]]) -> None:
        """(e-mail key, subject) pairs: a Mailchimp event names an e-mail, the ledger needs the person."""
        with self._table.batch_writer(overwrite_by_pkeys=["pk", "sk"]) as batch:
            for email_key, subject in dict.fromkeys(entries):
                batch.put_item(Item={"pk": f"EMAIL#{email_key}", "sk": f"SUBJ#{subject}"})

    def subjects_by_email(self, email_key: str) -> list[str]:
        page = self._table.query(KeyConditionExpression=Key("pk").eq(f"EMAIL#{email_key}"))
        return [str(item["sk"]).removeprefix("SUBJ#") for item in page.get("Items", [])]
