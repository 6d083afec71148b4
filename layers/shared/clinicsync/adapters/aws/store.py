"""The single DynamoDB table as every store port at once (``domain.ports.Store``).

Each seam has its repository module (``mappings``, ``cursors``, ``coordination``, ``phone_index``,
``consent_ledger``; ``sync_reads`` reads several seams at once); the key formats are in ``keys``.
``DynamoStore`` only composes them, so the
composition root builds one object for use cases that take several seams.
"""

from __future__ import annotations

from clinicsync.adapters.aws.consent_ledger import (
    DynamoConsentOutputMarks,
    DynamoConsentRecords,
    DynamoEmailIndex,
    DynamoMemberStore,
)
from clinicsync.adapters.aws.coordination import DynamoClaims, DynamoLeases
from clinicsync.adapters.aws.cursors import DynamoCursors
from clinicsync.adapters.aws.mappings import DynamoCreateIntents, DynamoCrmIdMaps, DynamoPatientStates
from clinicsync.adapters.aws.phone_index import DynamoCrmPhoneBook, DynamoPhoneIndex, DynamoPollIndexes
from clinicsync.adapters.aws.sync_reads import DynamoSyncReader


class DynamoStore(
    DynamoPatientStates,
    DynamoCrmIdMaps,
    DynamoCreateIntents,
    DynamoCursors,
    DynamoLeases,
    DynamoClaims,
    DynamoPhoneIndex,
    DynamoPollIndexes,
    DynamoCrmPhoneBook,
    DynamoConsentRecords,
    DynamoConsentOutputMarks,
    DynamoEmailIndex,
    DynamoMemberStore,
    DynamoSyncReader,
):
    """All repositories over one table (they share only ``TableRepository.__init__``)."""
