"""Who may run or write now, on the table: leases (``Leases``), per-patient claims and adoption claims
(``Claims``). Every claim is a conditional put: free, expired, or already its owner's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import TRANSACT_LIMIT, TableRepository, batch_writer, cancelled, failed_condition

_FREE = "attribute_not_exists(pk) OR expires_at < :now OR #o = :owner"
# A lease item may outlive its release without an owner (a poll's, see cursors.py): free as well.
LEASE_FREE = "attribute_not_exists(#o) OR expires_at < :now OR #o = :owner"


class DynamoLeases(TableRepository):
    def acquire_lease(self, name: str, owner: str, seconds: int, now: int) -> bool:
        """At most one holder at a time (polls may overlap when one runs long); expired leases are taken over."""
        try:
            self._table.put_item(
                Item={**keys.lease(name), "owner": owner, "expires_at": now + seconds},
                ConditionExpression=LEASE_FREE,
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":now": now, ":owner": owner},
            )
        except ClientError as exc:
            if failed_condition(exc):
                return False
            raise
        return True

    def release_lease(self, name: str, owner: str) -> None:
        try:
            self._table.delete_item(
                Key=keys.lease(name),
                ConditionExpression="#o = :owner",
                ExpressionAttributeNames={"#o": "owner"},
                ExpressionAttributeValues={":owner": owner},
            )
        except ClientError as exc:
            if not failed_condition(exc):
                raise


class DynamoClaims(TableRepository):
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
        while pending:
            chunk, pending = pending[:TRANSACT_LIMIT], pending[TRANSACT_LIMIT:]
            while chunk:
                items = [
                    {
                        "Put": {
                            "TableName": self._table.name,
                            "Item": {**keys.claim(pid), "owner": owner, "expires_at": now + seconds},
                            "ConditionExpression": _FREE,
                            "ExpressionAttributeNames": {"#o": "owner"},
                            "ExpressionAttributeValues": {":now": now, ":owner": owner},
                        }
                    }
                    for pid in chunk
                ]
                try:
                    self._transact(items)
                except ClientError as exc:
                    if not cancelled(exc):
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

    def release_claims(self, patient_ids: Sequence[str], settled_intents: Sequence[str] = ()) -> None:
        """Unconditional deletes in batches: a claim outlives the syncer's timeout, so while its owner
        runs nobody else can have taken it over. Settled create intents go in the same batches (either
        delete landing alone is harmless: an intent kept costs a look-up, a claim kept expires)."""
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for key in dict.fromkeys(settled_intents):
                batch.delete_item(Key=keys.intent(key))
            for pid in dict.fromkeys(patient_ids):
                batch.delete_item(Key=keys.claim(pid))

    def claim_adoptions(self, claims: Mapping[str, str], now: int, seconds: int) -> set[str]:
        """Claim CRM records (``L<lead id>``/``D<deal id>`` -> the appointment adopting them); returns
        the keys another appointment holds. Concurrent invocations read the CRM before either writes,
        so the CRM alone cannot stop a record being adopted twice. A repeat by the same appointment
        (a redelivery, a retry) succeeds; a claim expires, by when the CRM shows the adoption."""
        held: set[str] = set()
        for key, appointment_id in claims.items():
            try:
                self._table.put_item(
                    Item={**keys.adoption(key), "owner": appointment_id, "expires_at": now + seconds},
                    ConditionExpression=_FREE,
                    ExpressionAttributeNames={"#o": "owner"},
                    ExpressionAttributeValues={":now": now, ":owner": appointment_id},
                )
            except ClientError as exc:
                if not failed_condition(exc):
                    raise
                held.add(key)
        return held
