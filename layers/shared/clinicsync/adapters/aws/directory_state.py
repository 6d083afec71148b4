"""The lab directory's sync state in DynamoDB: ``DIR#<kind>#<lis id>`` / ``STATE`` holds the CRM id and
keyed hashes of the last synced values (never a value in clear), and after a vTiger write of unknown outcome
the hashes it may have left (``unsure``). Implements ``DirectoryStateStore``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.table import batch_get, batch_writer
from clinicsync.domain.directory_records import DirectoryState, Kind


class DirectoryStore:
    """``DIR#<kind>#<lis id>`` / ``STATE``: the CRM id and keyed hashes of the last synced values."""

    def __init__(self, table: Any) -> None:
        self._table = table

    def load(self, kind: Kind, lis_ids: Sequence[str]) -> dict[str, DirectoryState]:
        states = {i: DirectoryState(kind, i) for i in dict.fromkeys(lis_ids)}
        for item in batch_get(self._table, [keys.directory_state(kind, i) for i in states]):
            lis_id = str(item["pk"]).split("#", 2)[2]
            state = states[lis_id]
            state.crm_id = str(item["crm_id"]) if item.get("crm_id") else None
            state.hashes = {str(k): str(v) for k, v in (item.get("hashes") or {}).items()}
            state.audience = str(item["audience"]) if item.get("audience") else None
            state.unsure = {str(k): [str(h) for h in v] for k, v in (item.get("unsure") or {}).items()}
        return states

    def save(self, states: Sequence[DirectoryState], now: int) -> None:
        with batch_writer(self._table, ["pk", "sk"]) as batch:
            for s in states:
                item: dict[str, Any] = {**keys.directory_state(s.kind, s.lis_id), "updated_at": now}
                if s.crm_id:
                    item["crm_id"] = s.crm_id
                if s.hashes:
                    item["hashes"] = dict(s.hashes)
                if s.audience:
                    item["audience"] = s.audience
                if s.unsure:
                    item["unsure"] = {k: list(v) for k, v in s.unsure.items()}
                batch.put_item(Item=item)
