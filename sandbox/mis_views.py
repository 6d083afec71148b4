"""One view over each MIS emulator, so the end-to-end story is written once for every MIS.

A view gives the oracle the MIS's raw truth (``visits()``/``clients()`` in a common shape, statuses
still in the MIS's own words) and gives tests the front desk's actions (book, confirm, …).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any, Protocol

from sandbox.emulators.ident import IdentEmulator
from sandbox.emulators.infoclinica import InfoClinicaEmulator
from sandbox.emulators.medods import MedodsEmulator
from sandbox.emulators.renovatio import RenovatioEmulator

Row = dict[str, Any]


class MisView(Protocol):
    kind: str
    emulator: Any

    def visits(self) -> list[Row]: ...  # {id, client_id, start (naive local), status (raw), anonymous}
    def clients(self) -> list[Row]: ...  # {id, refused_processing, archived}
    def book(self, client_id: int, start: datetime, **details: Any) -> int: ...  # price=, insurance_policy=
    def add_client(self, surname: str, phone: str) -> int: ...
    def at(self, days: int, hh_mm: str) -> datetime: ...
    def in_feed(self, start: datetime) -> bool: ...  # does the MIS feed cover a visit at this time?


class MedodsView:
    kind = "medods"

    def __init__(self, emulator: MedodsEmulator) -> None:
        self.emulator = emulator

    def visits(self) -> list[Row]:
        return [
            {
                "id": str(r["id"]),
                "client_id": str(r["clientId"]),
                "status": r["status"],
                "start": datetime.fromisoformat(f"{r['date']}T{r['time']}"),
                "anonymous": bool(r.get("anonymous")),
            }
            for r in self.emulator.all_appointments()
            if r.get("deletedAt") is None
        ]

    def clients(self) -> list[Row]:
        return [
            {
                "id": str(c["id"]),
                "refused_processing": bool(c.get("denyDataProcessing")),
                "archived": bool(c.get("archived")),
            }
            for c in self.emulator.all_clients()
        ]

    def book(self, client_id: int, start: datetime, **details: Any) -> int:
        doctor = self.emulator._users[0]  # sandbox-only peek: the first doctor and branch
        return self.emulator.book(client_id, doctor["id"], self.emulator._clinics[0]["id"], start, **details)

    def add_client(self, surname: str, phone: str) -> int:
        return self.emulator.add_client(surname, "Анна", second_name="Игоревна", sex="female", phone=phone)

    def at(self, days: int, hh_mm: str) -> datetime:
        return self.emulator.at(days, hh_mm)

    def in_feed(self, start: datetime) -> bool:
        return True


class InfoClinicaView:
    kind = "infoclinica"

    def __init__(self, emulator: InfoClinicaEmulator) -> None:
        self.emulator = emulator

    def visits(self) -> list[Row]:
        return [
            {
                "id": str(v["SCHEDID"]),
                "client_id": str(v["PCODE"]),
                "status": v["SCHEDSTATUS"],
                "start": v["START"].replace(tzinfo=None),
                "anonymous": bool(v.get("ANONYMOUS")),
            }
            for v in self.emulator.all_visits()
        ]

    def clients(self) -> list[Row]:
        with self.emulator._lock:  # sandbox-only peek at the cards
            cards = [dict(c) for c in self.emulator._clients.values()]
        return [
            {"id": str(c["PCODE"]), "refused_processing": bool(c.get("REFUSEPD")), "archived": bool(c.get("ARCHIVED"))}
            for c in cards
        ]

    def book(self, client_id: int, start: datetime, **details: Any) -> int:
        with self.emulator._lock:
            doctor = next(iter(self.emulator._doctors))
            branch = next(iter(self.emulator._branches))
        return self.emulator.book(client_id, doctor, branch, start, **details)

    def add_client(self, surname: str, phone: str) -> int:
        return self.emulator.add_client(surname, "Анна", midname="Игоревна", phone=phone)

    def at(self, days: int, hh_mm: str) -> datetime:
        return self.emulator.at(days, hh_mm)

    def in_feed(self, start: datetime) -> bool:
        return True


class RenovatioView:
    kind = "renovatio"

    def __init__(self, emulator: RenovatioEmulator, past_days: int = 45, ahead_days: int = 30) -> None:
        self.emulator = emulator
        self._past, self._ahead = past_days, ahead_days

    def visits(self) -> list[Row]:
        with self.emulator._lock:  # sandbox-only peek at the visits
            rows = [dict(v) for v in self.emulator._visits.values()]
        return [
            {
                "id": str(v["id"]),
                "client_id": str(v["patient_id"]),
                "status": v["status"],
                "start": v["start"].replace(tzinfo=None),
                "anonymous": bool(v.get("is_anonymous")),
            }
            for v in rows
        ]

    def clients(self) -> list[Row]:
        with self.emulator._lock:
            rows = [dict(p) for p in self.emulator._patients.values()]
        return [
            {"id": str(p["id"]), "refused_processing": bool(p.get("refuse_pd")), "archived": bool(p.get("is_archive"))}
            for p in rows
        ]

    def book(self, client_id: int, start: datetime, **details: Any) -> int:
        with self.emulator._lock:
            doctor = next(iter(self.emulator._doctors))
            branch = self.emulator._clinics[0]["id"]
        return self.emulator.book(client_id, doctor, branch, start, **details)

    def add_client(self, surname: str, phone: str) -> int:
        return self.emulator.add_client(surname, "Анна", third_name="Игоревна", mobile=phone)

    def at(self, days: int, hh_mm: str) -> datetime:
        return self.emulator.at(days, hh_mm)

    def in_feed(self, start: datetime) -> bool:
        """Renovatio has only a date window: visits outside the rolling window are never read."""
        today = self.emulator.at(0, "00:00").replace(tzinfo=None)
        return today - timedelta(days=self._past) <= start < today + timedelta(days=self._ahead + 1)


class IdentView:
    """IDENT states derived from the tables, independently of the connector: a reception row is a visit,
    a cancel reason a cancellation, a booking past its end plus the grace period a no-show."""

    kind = "ident"

    def __init__(self, emulator: IdentEmulator, grace_minutes: int = 120) -> None:
        self.emulator = emulator
        self._grace = timedelta(minutes=grace_minutes)

    def visits(self) -> list[Row]:
        now = self.emulator.now_local()
        rows = self.emulator.rows(
            "SELECT sr.ID_Receptions AS id, sr.ID_Patients AS client_id, sr.PlanStart AS start, sr.Length AS length, "
            "sr.ID_ReceptionCancelReasons AS cancel, r.ID AS visit FROM ScheduledReceptions sr "
            "LEFT JOIN Receptions r ON r.ID = sr.ID_Receptions"
        )
        out = []
        for row in rows:
            start = datetime.fromisoformat(row["start"])
            if row["visit"] is not None:
                status = "visited"
            elif row["cancel"] is not None:
                status = "cancelled"
            elif start + timedelta(minutes=row["length"]) + self._grace <= now:
                status = "no_show"
            else:
                status = "scheduled"
            out.append(
                {"id": str(row["id"]), "client_id": str(row["client_id"]), "status": status, "start": start}
                | {"anonymous": False}
            )
        walk_ins = self.emulator.rows(
            "SELECT r.ID AS id, r.ID_Patients AS client_id, r.DateTimeChanged AS start FROM Receptions r "
            "LEFT JOIN ScheduledReceptions sr ON sr.ID_Receptions = r.ID WHERE sr.ID_Receptions IS NULL"
        )
        out += [
            {
                "id": str(r["id"]),
                "client_id": str(r["client_id"]),
                "status": "visited",
                "start": datetime.fromisoformat(r["start"]),
                "anonymous": False,
            }
            for r in walk_ins
        ]
        return out

    def clients(self) -> list[Row]:
        rows = self.emulator.rows("SELECT ID_Patients AS id, Status AS status FROM Patients")
        return [{"id": str(r["id"]), "refused_processing": False, "archived": r["status"] == 3} for r in rows]

    def book(self, client_id: int, start: datetime, **details: Any) -> int:
        return self.emulator.book(client_id, start, **details)  # price, insurance_policy: never dropped

    def add_client(self, surname: str, phone: str) -> int:
        return self.emulator.add_client(surname, phone)

    def at(self, days: int, hh_mm: str) -> datetime:
        return self.emulator.at(days, hh_mm)

    def in_feed(self, start: datetime) -> bool:
        return True


# Front-desk actions every emulator offers under the same names.
ACTIONS: tuple[str, ...] = ("confirm", "arrive", "complete", "cancel", "no_show")


def action(view: MisView, name: str) -> Callable[[int], None]:
    assert name in ACTIONS
    return getattr(view.emulator, name)  # type: ignore[no-any-return]
