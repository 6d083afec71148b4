"""MIS status vocabularies mapped onto the canonical lifecycle.

The defaults below are documented in docs/statuses.md; a clinic overrides or extends them with
``mis.statuses`` in its config. An unknown status is reported (``UnknownStatus``), never guessed.
"""

from __future__ import annotations

from collections.abc import Mapping

from clinicsync.domain.models import AppointmentStatus as S

DEFAULT_STATUSES: Mapping[str, Mapping[str, S]] = {
    # MEDODS publishes no enum; these are the values seen in public client code and our emulator.
    "medods": {
        "need_approval": S.BOOKED,
        "approved": S.BOOKED,
        "confirmed_by_administrator": S.CONFIRMED,
        "arrived": S.ARRIVED,
        "serviced": S.COMPLETED,
        "billed": S.COMPLETED,
        "paid": S.COMPLETED,
        "canceled": S.CANCELLED,
        "failed": S.NO_SHOW,
    },
    # InfoClinica's public fixtures show no status enum: these are the SCHEDSTATUS words our emulator
    # and adapter assume (docs/statuses.md); a clinic whose installation spells them differently maps
    # its own words in mis.statuses.
    "infoclinica": {
        "reserved": S.BOOKED,
        "booked": S.BOOKED,
        "confirmed": S.CONFIRMED,
        "arrived": S.ARRIVED,
        "visited": S.COMPLETED,
        "paid": S.COMPLETED,
        "cancelled": S.CANCELLED,
        "removed": S.CANCELLED,
        "noshow": S.NO_SHOW,
    },
    # Renovatio: upcoming/completed/refused are seen in integrators' code (refused = no-show there);
    # confirmed/arrived/canceled are inferred from the API's confirm and cancel methods.
    "renovatio": {
        "upcoming": S.BOOKED,
        "confirmed": S.CONFIRMED,
        "arrived": S.ARRIVED,
        "completed": S.COMPLETED,
        "canceled": S.CANCELLED,
        "refused": S.NO_SHOW,
    },
    # IDENT has no status column: its connector derives these words from the tables (a booking, a cancel
    # reason, a reception row, or a booking left past its end plus the clinic's grace period).
    "ident": {
        "scheduled": S.BOOKED,
        "cancelled": S.CANCELLED,
        "visited": S.COMPLETED,
        "no_show": S.NO_SHOW,
    },
}


class UnknownStatus(ValueError):
    def __init__(self, mis_kind: str, raw: str) -> None:
        super().__init__(f"{mis_kind} status {raw!r} is not mapped; add it to mis.statuses in the clinic config")
        self.mis_kind = mis_kind
        self.raw = raw


def canonical_status(mis_kind: str, raw: str, overrides: Mapping[str, S] | None = None) -> S:
    table = {**DEFAULT_STATUSES.get(mis_kind, {}), **(overrides or {})}
    try:
        return table[raw]
    except KeyError:
        raise UnknownStatus(mis_kind, raw) from None
