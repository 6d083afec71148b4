"""Ports of the IDENT routes: where the timetable's names are kept, and the connector's inbox."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol


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
