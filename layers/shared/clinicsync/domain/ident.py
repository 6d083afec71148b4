"""IDENT's ports (where the timetable's names are kept, the connector's inbox) and how names fill visits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from clinicsync.domain.models import PatientChanges


class IdentNames(Protocol):
    """Doctors' and branches' names from IDENT's timetable (staff and branches: no patient data)."""

    def save(
        self, doctors: Mapping[str, str], branches: Mapping[str, str], intervals: int, busy: int, now: int
    ) -> None: ...

    def load(self) -> tuple[dict[str, str], dict[str, str]]:
        """(doctors, branches), each id -> name."""
        ...


class ConnectorQueue(Protocol):
    """Where a verified connector batch waits for the poller's ``IdentSource`` (one message per batch)."""

    def send(self, body: str, batch_id: str) -> None: ...


def fill_names(
    changes: Sequence[PatientChanges], doctors: Mapping[str, str], branches: Mapping[str, str]
) -> list[PatientChanges]:
    """Doctor and branch names from IDENT's timetable, for visits the connector sent without them."""
    out: list[PatientChanges] = []
    for item in changes:
        visits = []
        for appt in item.appointments:
            update: dict[str, Any] = {}
            if appt.doctor_name is None and appt.doctor_id and appt.doctor_id in doctors:
                update["doctor_name"] = doctors[appt.doctor_id]
            if appt.branch_name is None and appt.branch_id and appt.branch_id in branches:
                update["branch_name"] = branches[appt.branch_id]
            visits.append(appt.model_copy(update=update) if update else appt)
        out.append(item.model_copy(update={"appointments": tuple(visits)}))
    return out
