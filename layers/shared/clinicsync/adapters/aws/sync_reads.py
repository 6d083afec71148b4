"""A sync's reads before it plans (``SyncReader``): patient states, create intents and the consent
ledger's channels live on the one table, so they go out together, 100 keys a BatchGetItem, instead of
one request (or more) per seam."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from clinicsync.adapters.aws import keys
from clinicsync.adapters.aws.consent_ledger import channel_keys, on_record_from, opted_out_from
from clinicsync.adapters.aws.mappings import intents_from, state_keys, states_from
from clinicsync.adapters.aws.table import TableRepository
from clinicsync.domain.store_ports import SyncReads


class DynamoSyncReader(TableRepository):
    def read_for_sync(
        self,
        wanted: Mapping[str, Sequence[str]],
        intent_keys: Sequence[str],
        ledger: Mapping[str, Sequence[str]],
    ) -> SyncReads:
        parts = {
            "state": state_keys(wanted),
            "intent": [keys.intent(k) for k in dict.fromkeys(intent_keys)],
            "consent": [key for subject, channels in ledger.items() for key in channel_keys([subject], channels)],
        }
        part_of = {(key["pk"], key["sk"]): part for part, part_keys in parts.items() for key in part_keys}
        found: dict[str, list[dict[str, Any]]] = {part: [] for part in parts}
        for item in self._batch_get(_unique(parts)):
            found[part_of[(str(item["pk"]), str(item["sk"]))]].append(item)
        return SyncReads(
            states=states_from(wanted, found["state"]),
            intents=intents_from(found["intent"]),
            opted_out=opted_out_from(list(ledger), found["consent"]),
            on_record=on_record_from(list(ledger), found["consent"]),
        )


def _unique(parts: Mapping[str, list[dict[str, str]]]) -> list[dict[str, str]]:
    """Every key once (a BatchGetItem refuses a key asked twice)."""
    seen: dict[tuple[str, str], dict[str, str]] = {}
    for part_keys in parts.values():
        for key in part_keys:
            seen.setdefault((key["pk"], key["sk"]), key)
    return list(seen.values())
