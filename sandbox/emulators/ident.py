"""IDENT, emulated: its database (SQLite with the tables and columns the connector reads) and IDENT's own
outbound HTTP calls to our stack (``GetTickets``, ``PostTimeTable`` with ``IDENT-Integration-Key``).

IDENT has no API to emulate for appointments: the integration reads its SQL Server database. The schema
here mirrors what third-party readers of that database use (``../shared/reference/mis_and_peers.md`` §1.1)
plus our two documented assumptions (``ScheduledReceptions.PlanStart``; ``Receptions.ID`` equals the
booking's ``ID_Receptions``). Times are naive clinic-local, as IDENT stores them. The clock is frozen at
start and moved by tests, so derived states (no-shows) never depend on when the suite runs.
"""

from __future__ import annotations

import sqlite3
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from sandbox.emulators.base import Clock
from sandbox.seed import CLINIC_TZ, SampleClinic, VisitStatus

SCHEMA = """
CREATE TABLE Branches (ID INTEGER PRIMARY KEY, Name TEXT NOT NULL, Address TEXT);
CREATE TABLE Staffs (
    ID INTEGER PRIMARY KEY, Surname TEXT, Name TEXT, Patronymic TEXT, ID_Branches INTEGER, DateTimeChanged TEXT
);
CREATE TABLE Persons (
    ID INTEGER PRIMARY KEY, Surname TEXT, Name TEXT, Patronymic TEXT, Sex INTEGER, Birthday TEXT,
    Phone TEXT, MobilePhone TEXT, Email TEXT, DateTimeChanged TEXT, City TEXT
);
CREATE TABLE Patients (
    ID_Patients INTEGER PRIMARY KEY, ID_Persons INTEGER NOT NULL REFERENCES Persons(ID), PatientNumber TEXT,
    CardNumber TEXT, FirstVisit TEXT, Status INTEGER NOT NULL DEFAULT 1, ID_Branches INTEGER, DateTimeChanged TEXT,
    Comment TEXT, InsurancePolicy TEXT
);
CREATE TABLE ReceptionCancelReasons (ID INTEGER PRIMARY KEY, Name TEXT NOT NULL);
CREATE TABLE ScheduledReceptions (
    ID_Receptions INTEGER PRIMARY KEY, ID_Patients INTEGER NOT NULL REFERENCES Patients(ID_Patients),
    ID_Staffs INTEGER REFERENCES Staffs(ID), PlanStart TEXT NOT NULL, Length INTEGER NOT NULL DEFAULT 30,
    Comment TEXT, ID_ReceptionCancelReasons INTEGER REFERENCES ReceptionCancelReasons(ID),
    DateTimeAdded TEXT NOT NULL, DateTimeChanged TEXT NOT NULL
);
CREATE TABLE Receptions (
    ID INTEGER PRIMARY KEY, ID_Patients INTEGER NOT NULL REFERENCES Patients(ID_Patients),
    ID_Staffs INTEGER REFERENCES Staffs(ID), DateTimeChanged TEXT NOT NULL, Comment TEXT
);
CREATE TABLE Treatments (
    ID INTEGER PRIMARY KEY, ID_Receptions INTEGER NOT NULL REFERENCES Receptions(ID), Cost NUMERIC NOT NULL
);
CREATE INDEX ix_sr_changed ON ScheduledReceptions(DateTimeChanged);
CREATE INDEX ix_sr_added ON ScheduledReceptions(DateTimeAdded);
CREATE INDEX ix_sr_start ON ScheduledReceptions(PlanStart);
CREATE INDEX ix_r_changed ON Receptions(DateTimeChanged);
CREATE INDEX ix_p_changed ON Patients(DateTimeChanged);
CREATE INDEX ix_per_changed ON Persons(DateTimeChanged);
"""

CANCEL_REASONS = {1: "Пациент отменил", 2: "Перенос по инициативе клиники"}
PERSON_OFFSET = 700_000  # Persons.ID differs from Patients.ID_Patients, as in IDENT
COMPLETED = {VisitStatus.COMPLETED, VisitStatus.BILLED, VisitStatus.PAID}


def _local(moment: datetime) -> str:
    return moment.astimezone(CLINIC_TZ).replace(tzinfo=None).isoformat(sep=" ", timespec="seconds")


class IdentEmulator:
    """IDENT's database on disk, seeded from the sample clinic, with the front desk's actions."""

    def __init__(self, sample: SampleClinic, path: Path, clock: Clock | None = None) -> None:
        self.path = Path(path)
        self.clock = clock or Clock()
        self.clock.freeze(self.clock.now())  # a clock handed in frozen keeps its instant
        self._lock = threading.Lock()
        self._next_id = 900_001
        self._planned_cost: dict[int, str] = {}  # what the doctor will record at the visit, by booking
        with self._connect() as db:
            db.executescript(SCHEMA)
            self._seed(db, sample)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def now_local(self) -> datetime:
        return datetime.fromtimestamp(self.clock.now(), CLINIC_TZ).replace(tzinfo=None, microsecond=0)

    def _stamp(self) -> str:
        return self.now_local().isoformat(sep=" ")

    def _seed(self, db: sqlite3.Connection, sample: SampleClinic) -> None:
        db.executemany("INSERT INTO Branches VALUES (?, ?, ?)", [(b.id, b.title, b.address) for b in sample.branches])
        db.executemany(
            "INSERT INTO Staffs VALUES (?, ?, ?, ?, ?, ?)",
            [(d.id, d.surname, d.name, d.patronymic, d.branch_ids[0], "2020-01-01 00:00:00") for d in sample.doctors],
        )
        db.executemany("INSERT INTO ReceptionCancelReasons VALUES (?, ?)", list(CANCEL_REASONS.items()))
        for p in sample.patients:
            changed = _local(p.updated_at)
            # IDENT keeps a mobile and a landline; the front desk types the one it was given.
            db.execute(
                "INSERT INTO Persons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    PERSON_OFFSET + p.id, p.surname, p.name, p.patronymic, 1 if p.sex == "male" else 2,
                    p.birthdate.isoformat(), None, p.phone, p.email, changed, sample.branches[0].city,
                ),
            )  # fmt: skip
            policy = next(
                (a.insurance_policy for a in sample.appointments if a.patient_id == p.id and a.insurance_policy), None
            )  # a DMS patient's policy is on the card
            db.execute(
                "INSERT INTO Patients VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    p.id, PERSON_OFFSET + p.id, f"К-{p.id}", f"{p.id:06d}", None, 3 if p.archived else 1,
                    sample.branches[0].id, changed, None, policy,
                ),
            )  # fmt: skip
        for a in sample.appointments:
            if a.anonymous:
                continue  # IDENT books named patients only
            cancelled = 1 if a.status is VisitStatus.CANCELLED else None
            db.execute(
                "INSERT INTO ScheduledReceptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    a.id, a.patient_id, a.doctor_id, _local(a.start), a.duration_min, None, cancelled,
                    _local(a.created_at), _local(a.updated_at),
                ),
            )  # fmt: skip
            if a.status in COMPLETED:
                db.execute(
                    "INSERT INTO Receptions VALUES (?, ?, ?, ?, ?)",
                    (a.id, a.patient_id, a.doctor_id, _local(a.updated_at), None),
                )
                db.execute("INSERT INTO Treatments (ID_Receptions, Cost) VALUES (?, ?)", (a.id, str(a.price)))

    # --- the front desk ------------------------------------------------------------------------------

    def _new_id(self) -> int:
        with self._lock:
            self._next_id += 1
            return self._next_id

    def add_client(self, surname: str, phone: str, name: str = "Анна", patronymic: str = "Игоревна") -> int:
        patient_id = self._new_id()
        stamp = self._stamp()
        with self._connect() as db:
            db.execute(
                "INSERT INTO Persons VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    PERSON_OFFSET + patient_id,
                    surname,
                    name,
                    patronymic,
                    2,
                    "1990-05-17",
                    None,
                    phone,
                    None,
                    stamp,
                    None,
                ),
            )
            db.execute(
                "INSERT INTO Patients VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (patient_id, PERSON_OFFSET + patient_id, f"К-{patient_id}", None, None, 1, 1, stamp, None, None),
            )
        return patient_id

    def edit_card(self, patient_id: int, **columns: str | None) -> None:
        """The front desk edits the card: ``CardNumber``, ``Comment``, ``InsurancePolicy`` (Patients) or
        ``City`` (Persons)."""
        stamp = self._stamp()
        with self._connect() as db:
            for column, value in columns.items():
                if column == "City":
                    db.execute(
                        "UPDATE Persons SET City = ?, DateTimeChanged = ? WHERE ID = ?",
                        (value, stamp, PERSON_OFFSET + patient_id),
                    )
                else:
                    assert column in ("CardNumber", "Comment", "InsurancePolicy"), column
                    db.execute(
                        f"UPDATE Patients SET {column} = ?, DateTimeChanged = ? WHERE ID_Patients = ?",
                        (value, stamp, patient_id),
                    )

    def book(
        self,
        patient_id: int,
        start: datetime,
        doctor_id: int = 11,
        length: int = 30,
        price: str | None = None,
        insurance_policy: str | None = None,
    ) -> int:
        """A booking; ``price`` is what the doctor records at the visit (IDENT prices treatments, not
        bookings), ``insurance_policy`` goes on the patient's card, where IDENT keeps it."""
        reception_id = self._new_id()
        stamp = self._stamp()
        with self._connect() as db:
            db.execute(
                "INSERT INTO ScheduledReceptions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (reception_id, patient_id, doctor_id, _local(start), length, None, None, stamp, stamp),
            )
        if price is not None:
            self._planned_cost[reception_id] = price
        if insurance_policy is not None:
            self.edit_card(patient_id, InsurancePolicy=insurance_policy)
        return reception_id

    def reschedule(self, reception_id: int, start: datetime) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE ScheduledReceptions SET PlanStart = ?, DateTimeChanged = ? WHERE ID_Receptions = ?",
                (_local(start), self._stamp(), reception_id),
            )

    def cancel(self, reception_id: int) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE ScheduledReceptions SET ID_ReceptionCancelReasons = 1, DateTimeChanged = ? "
                "WHERE ID_Receptions = ?",
                (self._stamp(), reception_id),
            )

    def complete(self, reception_id: int) -> None:
        """The doctor opens the visit: IDENT writes a row in Receptions for the booking."""
        with self._connect() as db:
            patient, staff = db.execute(
                "SELECT ID_Patients, ID_Staffs FROM ScheduledReceptions WHERE ID_Receptions = ?", (reception_id,)
            ).fetchone()
            db.execute(
                "INSERT INTO Receptions VALUES (?, ?, ?, ?, ?)", (reception_id, patient, staff, self._stamp(), None)
            )
            if reception_id in self._planned_cost:
                db.execute(
                    "INSERT INTO Treatments (ID_Receptions, Cost) VALUES (?, ?)",
                    (reception_id, self._planned_cost[reception_id]),
                )

    def edit_phone(self, patient_id: int, phone: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE Persons SET MobilePhone = ?, DateTimeChanged = ? WHERE ID = ?",
                (phone, self._stamp(), PERSON_OFFSET + patient_id),
            )

    def at(self, days: int, hh_mm: str) -> datetime:
        hours, minutes = (int(x) for x in hh_mm.split(":"))
        day = self.now_local().date() + timedelta(days=days)
        return datetime(day.year, day.month, day.day, hours, minutes, tzinfo=CLINIC_TZ)

    # --- sandbox-only peeks (the oracle and the tests) -----------------------------------------------

    def rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
        with self._connect() as db:
            cursor = db.execute(sql, params)
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]

    def doctors(self) -> list[dict[str, Any]]:
        return self.rows("SELECT ID, Surname, Name, Patronymic, ID_Branches FROM Staffs ORDER BY ID")

    def branches(self) -> list[dict[str, Any]]:
        return self.rows("SELECT ID, Name FROM Branches ORDER BY ID")


class IdentHttpClient:
    """IDENT's own outbound calls, shaped as IDENT sends them: the key header, URL-encoded ISO 8601
    dates with an offset, ``limit``/``offset`` paging, and the timetable as a JSON body."""

    def __init__(self, base_url: str, integration_key: str, http: httpx.Client | None = None) -> None:
        self._base = base_url.rstrip("/")
        self._key = integration_key
        self._http = http or httpx.Client(timeout=10.0)

    def get_tickets(self, date_from: datetime, date_to: datetime, limit: int = 500, offset: int = 0) -> httpx.Response:
        query = (
            f"dateTimeFrom={quote(date_from.isoformat(timespec='seconds'), safe='')}"
            f"&dateTimeTo={quote(date_to.isoformat(timespec='seconds'), safe='')}&limit={limit}&offset={offset}"
        )
        return self._http.get(f"{self._base}/ident/GetTickets?{query}", headers={"IDENT-Integration-Key": self._key})

    def post_timetable(self, emulator: IdentEmulator, days: int = 7) -> httpx.Response:
        doctors = emulator.doctors()
        start = emulator.now_local().replace(hour=9, minute=0, second=0)
        intervals = [
            {
                "DoctorId": d["ID"],
                "BranchId": d["ID_Branches"],
                "StartDateTime": (start + timedelta(days=day, hours=hour)).isoformat(),
                "LengthInMinutes": 60,
                "IsBusy": (d["ID"] + day + hour) % 3 == 0,
            }
            for d in doctors
            for day in range(days)
            for hour in range(8)
        ]
        body = {
            "Doctors": [
                {"Id": d["ID"], "Name": " ".join(x for x in (d["Surname"], d["Name"], d["Patronymic"]) if x)}
                for d in doctors
            ],
            "Branches": [{"Id": b["ID"], "Name": b["Name"]} for b in emulator.branches()],
            "Intervals": intervals,
        }
        return self._http.post(
            f"{self._base}/ident/PostTimeTable", json=body, headers={"IDENT-Integration-Key": self._key}
        )
