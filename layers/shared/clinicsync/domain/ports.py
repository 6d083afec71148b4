"""Ports: what the use cases need from a MIS, independent of any vendor (the CRM's: ``crm_ports``; the
store's: ``store_ports``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from clinicsync.domain.models import PatientChanges

Cursor = Mapping[str, Any]


# --- MIS -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChangePage:
    """One read from a MIS feed.

    ``cursor`` is opaque to the poller: an updated-since watermark, the ids of an acknowledged
    change queue, or a date window with its content hashes. ``more`` says the feed has more now.
    """

    changes: Sequence[PatientChanges]
    cursor: Cursor
    more: bool = False
    rejected: int = 0  # records the adapter could not translate (reported, never guessed)


class MisSource(Protocol):
    kind: str

    def fetch_changes(self, cursor: Cursor | None) -> ChangePage: ...

    def resync_cursor(self, window_seconds: int, now: float) -> Cursor:
        """A cursor that re-reads the last ``window_seconds`` in full (deep resync repairs drift)."""
        ...

    def acknowledge(self, page: ChangePage) -> None:
        """Called once the page's changes are safely enqueued (change-queue feeds confirm here)."""
        ...


class MisConsentWriter(Protocol):
    """Writes a patient's "do not send" flags into the MIS, where its API allows it."""

    writable_channels: frozenset[str]

    def write_opt_outs(self, patient_id: str, channels: Sequence[str], cleared: Sequence[str] = ()) -> None:
        """Set the flags of ``channels``; clear those of ``cleared`` (opt-outs an opt-in lifted)."""
        ...
