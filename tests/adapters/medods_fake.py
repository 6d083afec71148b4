"""MEDODS' list and card API in memory, for the tests that drive ``MedodsSource`` against it."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any


class MedodsFake:
    """MEDODS' list semantics: ``updatedAtAfter`` is strictly greater-than, rows come in ``updatedAt`` order
    (then id), offset paging; ``get`` reads one client card (counted in ``card_reads``). Records are kept
    by id and may be edited in place between reads; every answer is a copy, as a decoded response is.
    A client in ``broken`` comes back from the clients feed as a row that does not parse (no id)."""

    def __init__(self, appointments: Iterable[dict[str, Any]], clients: Iterable[dict[str, Any]]) -> None:
        self.visits: dict[str, dict[str, Any]] = {str(v["id"]): v for v in appointments}
        self.clients: dict[str, dict[str, Any]] = {str(c["id"]): c for c in clients}
        self.card_reads = 0
        self.broken: set[str] = set()

    def pages(self, path: str, params: dict[str, Any], limit: int) -> Iterator[list[dict[str, Any]]]:
        records = self.visits if path == "/appointments" else self.clients
        after = int(params["updatedAtAfter"])
        rows = sorted((r for r in records.values() if r["updatedAt"] > after), key=lambda r: (r["updatedAt"], r["id"]))
        rows = [
            {**r, "id": None} if path == "/clients" and str(r["id"]) in self.broken else dict(r) for r in rows
        ]  # a broken row names nobody
        for offset in range(0, len(rows) + 1, limit):
            page = rows[offset : offset + limit]
            yield page
            if len(page) < limit:
                return

    def get(self, path: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self.card_reads += 1
        return {"data": dict(self.clients[path.rsplit("/", 1)[1]])}
