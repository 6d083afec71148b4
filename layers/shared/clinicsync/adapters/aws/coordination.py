"""Who may run or write now, on the table: leases (``Leases``), per-patient claims and adoption claims
(``Claims``). Every claim is a conditional put: free, expired, or already its owner's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from botocore.exceptions import ClientError

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import (
    TRANSACT_LIMIT,
    TableRepository,
    batch_writer,
    cancelled,
    failed_condition,
    item_from_wire,
)
from clinicsync.domain.store_ports import Claimed

# A patient's claim is held until ``held_until``; its item stays (``expires_at``: the table's TTL) past the
# dead-letter queue's retention, so a later attempt knows it takes over a claim its owner left behind.
# (A claim stored before ``held_until`` existed is held until its ``expires_at``.) Two conditions, tried
# in turn, not one: a transaction's put does not say what it replaced, so a take-over is known only as a
# put that failed ``_UNCLAIMED`` and then met ``_LEFT_BEHIND``.
_UNCLAIMED = "attribute_not_exists(pk) OR #o = :owner"
_LEFT_BEHIND = "held_until < :now OR (attribute_not_exists(held_until) AND expires_at < :now)"
# An adoption claim (no ``held_until``: held until its ``expires_at``) needs no take-over to be known: either.
_FREE = f"{_UNCLAIMED} OR {_LEFT_BEHIND}"
CLAIM_ITEM_SECONDS = 15 * 24 * 3600
# A lease item may outlive its release without an owner (a poll's, see cursors.py): free as well.
LEASE_FREE = "attribute_not_exists(#o) OR expires_at < :now OR #o = :owner"


def _hold_passed(claim: Mapping[str, Any], now: int) -> bool:
    """``_LEFT_BEHIND`` read from an item a cancellation returned (the conditional put still decides)."""
    held_until = claim.get("held_until", claim.get("expires_at"))
    return held_until is not None and int(str(held_until)) < now


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
    def claim_patients(self, patient_ids: Sequence[str], owner: str, now: int, seconds: int) -> Claimed:
        """Claim patients for one syncer invocation; returns those claimed (the rest are held by another).

        Conditional puts in TransactWriteItems of 100: one request per message in the normal case (no claim
        item: every released claim is deleted). A cancelled transaction names the items found, with each
        one's hold (``ALL_OLD``): a live one is held, so a wait round on another invocation's patient costs
        this one request. Those whose hold has passed (or were not returned: a conflict) are tried again as
        left behind, a second request only then: the ones taken so are ``taken_over``, the rest are held.
        The others are claimed again without them. If a request fails otherwise half-way, the claims
        already taken are released before the error goes up: nobody may stay locked out for ``seconds`` by
        a sync that never ran.
        """
        claimed = Claimed()
        try:
            found = self._claim_chunks(list(dict.fromkeys(patient_ids)), owner, now, seconds, claimed, _UNCLAIMED)
            left = sorted(pid for pid, item in found.items() if item is None or _hold_passed(item, now))
            if left:
                held = self._claim_chunks(left, owner, now, seconds, claimed, _LEFT_BEHIND)
                claimed.taken_over = set(left) - held.keys()
            return claimed
        except Exception:
            if claimed:
                self.release_claims(sorted(claimed))
            raise

    def _claim_chunks(
        self, pending: list[str], owner: str, now: int, seconds: int, claimed: set[str], condition: str
    ) -> dict[str, Mapping[str, Any] | None]:
        """Claim ``pending`` where their items meet ``condition``; returns those whose items failed it, each
        with the item found (None when the cancellation did not return it: a conflict)."""
        failed: dict[str, Mapping[str, Any] | None] = {}
        names = {"ExpressionAttributeNames": {"#o": "owner"}} if "#o" in condition else {}
        values = {":now": now, **({":owner": owner} if ":owner" in condition else {})}
        item = {"owner": owner, "held_until": now + seconds, "expires_at": now + CLAIM_ITEM_SECONDS}
        while pending:
            chunk, pending = pending[:TRANSACT_LIMIT], pending[TRANSACT_LIMIT:]
            while chunk:
                items = [
                    {
                        "Put": {
                            "TableName": self._table.name,
                            "Item": {**keys.claim(pid), **item},
                            "ConditionExpression": condition,
                            "ExpressionAttributeValues": values,
                            "ReturnValuesOnConditionCheckFailure": "ALL_OLD",
                            **names,
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
                    held = {pid: r for pid, r in zip(chunk, reasons, strict=False) if r.get("Code") in busy}
                    if not held:
                        raise  # cancelled for another reason (a conflicting transaction): the caller retries
                    failed.update({pid: item_from_wire(r["Item"]) if "Item" in r else None for pid, r in held.items()})
                    chunk = [pid for pid in chunk if pid not in held]
                    continue
                claimed.update(chunk)
                break
        return failed

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
