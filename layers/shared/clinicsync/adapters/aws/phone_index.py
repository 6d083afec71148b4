"""Phone indexes on the table: MIS patients by phone key (``PhoneIndex``, written with the e-mail index
by ``PollIndexes``) and the CRM account's contacts by phone key with its read cursor (``CrmPhoneBook``,
amoCRM: its contacts cannot be searched by phone). Keys are keyed HMACs, never the number."""

from __future__ import annotations

from collections.abc import Sequence

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import TRANSACT_LIMIT, TableRepository, batch_writer, cancelled, failed_condition


class DynamoPhoneIndex(TableRepository):
    def index_phone(self, phone_key: str, patient_id: str, previous_key: str | None) -> None:
        if previous_key and previous_key != phone_key:
            self._table.delete_item(Key=keys.phone(previous_key, patient_id))
        self._table.put_item(Item=keys.phone(phone_key, patient_id))

    def patients_by_phone(self, phone_key: str) -> list[str]:
        return [keys.patient_of(str(item["sk"])) for item in self._query(keys.phone_pk(phone_key))]


class DynamoPollIndexes(TableRepository):
    def index_contacts(self, phones: Sequence[tuple[str, str]], emails: Sequence[tuple[str, str]]) -> None:
        """A poll page's phone and e-mail entries in one TransactWriteItems while they fit in 100 puts
        (the two batch writes took two requests or more, 25 items each); more, or a transaction cancelled
        by a concurrent write of one of its items, go in batches. Every put is safe to repeat."""
        entries = [*(keys.phone(k, pid) for k, pid in phones), *(keys.email(k, s) for k, s in emails)]
        items = list({(e["pk"], e["sk"]): e for e in entries}.values())  # a transaction names an item once
        if 0 < len(items) <= TRANSACT_LIMIT:
            try:
                self._transact([{"Put": {"TableName": self._table.name, "Item": item}} for item in items])
                return
            except ClientError as exc:
                if not cancelled(exc):
                    raise
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for item in items:
                batch.put_item(Item=item)


class DynamoCrmPhoneBook(TableRepository):
    def crm_phone_index(self) -> tuple[int | None, dict[str, set[str]]]:
        """(how far the index has read the CRM, contact id -> phone keys). The cursor sorts first in the
        partition, so it is read before the entries: every entry written before it moved is then read."""
        cursor: int | None = None
        contacts: dict[str, set[str]] = {}
        for item in self._query(keys.CRM_PHONES, consistent=True):
            if item["sk"] == keys.CRM_PHONES_CURSOR:
                cursor = int(str(item["seen_to"]))
            elif (entry := keys.crm_phone_entry(str(item["sk"]))) is not None:
                contacts.setdefault(entry[0], set()).add(entry[1])
        return cursor, contacts

    def update_crm_phones(self, add: Sequence[tuple[str, str]], drop: Sequence[tuple[str, str]]) -> None:
        """Put and delete ``(contact id, phone key)`` entries, in batches; both are safe to repeat."""
        if not add and not drop:
            return
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for contact_id, phone_key in dict.fromkeys(drop):
                batch.delete_item(Key=keys.crm_phone(contact_id, phone_key))
            for contact_id, phone_key in dict.fromkeys(add):
                batch.put_item(Item=keys.crm_phone(contact_id, phone_key))

    def advance_crm_phones(self, seen_to: int) -> None:
        """Move the index's cursor forward only: a slower container never moves it back."""
        try:
            self._table.put_item(
                Item={"pk": keys.CRM_PHONES, "sk": keys.CRM_PHONES_CURSOR, "seen_to": seen_to},
                ConditionExpression="attribute_not_exists(pk) OR seen_to < :to",
                ExpressionAttributeValues={":to": seen_to},
            )
        except ClientError as exc:
            if not failed_condition(exc):
                raise
