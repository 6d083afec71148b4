"""MEDODS as a ``MisConsentWriter``: the ledger's opt-outs written back as the client card's deny flags."""

from __future__ import annotations

from collections.abc import Sequence

from clinicsync.adapters.medods.source import MedodsApi

# Ledger channel -> the MEDODS flag that says "do not send" for it. Each maps back to the same channel
# when the poller reads the client again (denySmsDispatches would also read as marketing: not used).
MEDODS_FLAGS = {
    "email": "denyEmail",
    "sms": "denySmsNotifications",
    "call": "denyCalls",
    "marketing": "denyWhatsappMessages",
}


class MedodsConsentWriter:
    """``PUT /clients/{id}`` with the deny flags (public clients update a client's deny* fields)."""

    writable_channels = frozenset(MEDODS_FLAGS)

    def __init__(self, api: MedodsApi) -> None:
        self._api = api

    def write_opt_outs(self, patient_id: str, channels: Sequence[str], cleared: Sequence[str] = ()) -> None:
        flags = {MEDODS_FLAGS[c]: False for c in cleared if c in MEDODS_FLAGS and c not in channels}
        flags |= {MEDODS_FLAGS[c]: True for c in channels if c in MEDODS_FLAGS}
        if flags:
            self._api.put(f"/clients/{patient_id}", flags)
