"""Reading IDENT's database through any DB-API 2.0 driver with ``?`` parameters (pyodbc, sqlite3).

SQL Server returns ``datetime`` objects; SQLite (the tests' stand-in) stores text. Both are read back as
naive clinic-local datetimes, which is what IDENT stores.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Literal, Protocol

from clinicsync_ident import queries

Row = dict[str, Any]


class Connection(Protocol):
    def cursor(self) -> Any: ...
    def close(self) -> None: ...


def as_datetime(value: Any) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day)
    return datetime.fromisoformat(str(value)).replace(tzinfo=None)


def _chunks(ids: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for start in range(0, len(ids), size):
        yield ids[start : start + size]


@dataclass
class ChangedIds:
    patients: set[int]
    bookings: set[int]
    receptions: set[int]


class IdentDatabase:
    def __init__(self, connection: Connection, dialect: Literal["mssql", "sqlite"]) -> None:
        self._conn = connection
        self._dialect = dialect

    @classmethod
    def connect(cls, driver: Literal["mssql", "sqlite"], dsn: str) -> IdentDatabase:
        if driver == "sqlite":
            return cls(sqlite3.connect(dsn), "sqlite")
        import pyodbc  # type: ignore[import-not-found]  # installed at the clinic, not in the stack

        return cls(pyodbc.connect(dsn, readonly=True, timeout=30), "mssql")

    def close(self) -> None:
        self._conn.close()

    def _param(self, moment: datetime) -> Any:
        return moment.isoformat(sep=" ", timespec="seconds") if self._dialect == "sqlite" else moment

    def _rows(self, sql: str, params: Iterable[Any]) -> list[Row]:
        cursor = self._conn.cursor()
        try:
            cursor.execute(sql, tuple(params))
            names = [d[0] for d in cursor.description]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        finally:
            cursor.close()

    def _by_ids(self, sql: str, ids: Iterable[int]) -> list[Row]:
        wanted = sorted(set(ids))
        out: list[Row] = []
        for chunk in _chunks(wanted, queries.CHUNK):
            out += self._rows(sql.format(ids=",".join("?" * len(chunk))), chunk)
        return out

    def changed_since(self, since: datetime) -> ChangedIds:
        at = self._param(since)
        patients = {int(r["ID_Patients"]) for r in self._rows(queries.CHANGED_PATIENTS, (at, at))}
        bookings: set[int] = set()
        for r in self._rows(queries.CHANGED_BOOKINGS, (at, at)):
            bookings.add(int(r["ID_Receptions"]))
            patients.add(int(r["ID_Patients"]))
        receptions: set[int] = set()
        for r in self._rows(queries.CHANGED_RECEPTIONS, (at,)):
            receptions.add(int(r["ID"]))
            patients.add(int(r["ID_Patients"]))
        return ChangedIds(patients, bookings, receptions)

    def due_bookings(self, start_from: datetime, start_to: datetime) -> list[Row]:
        return self._rows(queries.DUE_BOOKINGS, (self._param(start_from), self._param(start_to)))

    def patients(self, ids: Iterable[int]) -> list[Row]:
        return self._by_ids(queries.PATIENTS_BY_ID, ids)

    def bookings(self, ids: Iterable[int]) -> list[Row]:
        return self._by_ids(queries.BOOKINGS_BY_ID, ids)

    def walk_ins(self, ids: Iterable[int]) -> list[Row]:
        return self._by_ids(queries.WALK_INS_BY_ID, ids)

    def doctors_seen(self, patient_ids: Iterable[int]) -> list[Row]:
        return self._by_ids(queries.DOCTORS_SEEN_BY_PATIENT, patient_ids)
