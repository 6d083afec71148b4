"""Each poll re-reads ``overlap_seconds`` of the appointments feed and drops the rows it already sent. Such
a row is recognised before it is validated again (its id, ``updatedAt`` and digest match the cursor's
marker): a steady poll re-reads a few hundred rows a minute, and validating each cost as much as its digest."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinicsync.adapters.medods import source as medods
from clinicsync.adapters.medods.source import MedodsApi, MedodsSource
from clinicsync.domain.ports import ChangePage, Cursor
from tests.adapters.medods_fake import MedodsFake
from tests.helpers import demo_config

NOW = 1_780_000_000


def _visit(n: int, updated: Any, status: str = "approved", visit_id: Any = None) -> dict[str, Any]:
    return {
        "id": 10_000 + n if visit_id is None else visit_id,
        "clientId": 1 + n % 3,
        "date": "2026-10-01",
        "time": "10:00",
        "status": status,
        "updatedAt": updated,
    }


class CoercingFeed(MedodsFake):
    """The feed, ordering and filtering by ``updatedAt`` as a number even where a row spells it otherwise."""

    def pages(self, path: str, params: dict[str, Any], limit: int) -> Iterator[list[dict[str, Any]]]:
        after = int(params["updatedAtAfter"])
        records = self.visits if path == "/appointments" else self.clients
        rows = [dict(r) for r in records.values() if int(r["updatedAt"]) > after]
        rows.sort(key=lambda r: (int(r["updatedAt"]), str(r["id"])))
        for offset in range(0, len(rows) + 1, limit):
            page = rows[offset : offset + limit]
            yield page
            if len(page) < limit:
                return


def _feed(visits: list[dict[str, Any]]) -> CoercingFeed:
    clients = [{"id": p, "surname": "X", "phone": None, "updatedAt": NOW - 86_400} for p in range(1, 4)]
    return CoercingFeed(visits, clients)


def _source(api: MedodsFake) -> MedodsSource:
    return MedodsSource(cast(MedodsApi, api), demo_config(), max_records=10_000)


@pytest.fixture
def validations(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every appointment row validated."""
    seen: list[Any] = []
    real = medods.MedodsAppointment.model_validate

    def counted(row: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(row)
        return real(row, *args, **kwargs)

    monkeypatch.setattr(medods.MedodsAppointment, "model_validate", counted)
    return seen


def test_the_overlap_re_read_validates_no_row_it_already_sent(validations: list[Any]) -> None:
    visits = [_visit(n, NOW - 60 + n % 30) for n in range(200)]
    api = _feed(visits)
    source = _source(api)
    first = source.fetch_changes(None)
    assert len(validations) == 200
    validations.clear()
    again = source.fetch_changes(first.cursor)  # the overlap returns all 200 again
    assert validations == [] and again.changes == []
    visits[5]["status"] = "canceled"  # an edit within the same second: same updatedAt, another digest
    visits[7]["updatedAt"] = NOW
    third = source.fetch_changes(again.cursor)
    assert sorted(row["id"] for row in validations) == [10_005, 10_007]
    assert sorted(a.mis_id for c in third.changes for a in c.appointments) == ["10005", "10007"]


_rows = st.fixed_dictionaries(
    {
        "n": st.integers(0, 5),
        "updated": st.one_of(st.integers(NOW - 200, NOW), st.integers(NOW - 200, NOW).map(str), st.just(True)),
        "status": st.sampled_from(["approved", "canceled", "no-such-status", "approved"]),
        "id": st.one_of(st.none(), st.integers(1, 3).map(str), st.just(""), st.just(True)),
    }
)


@settings(max_examples=150, deadline=None)
@given(reads=st.lists(st.lists(_rows, max_size=6), min_size=1, max_size=4))
def test_skipping_sent_rows_gives_the_pages_a_full_validation_gives(reads: list[list[dict[str, Any]]]) -> None:
    """Rows edited between reads (same or new ``updatedAt``), ids and times the model coerces (strings),
    rows it rejects: the skip before validation changes no page, cursor or rejection count."""

    def run(already_sent: Callable[[Any, dict[str, str]], bool]) -> list[ChangePage]:
        visits: dict[int, dict[str, Any]] = {}
        pages: list[ChangePage] = []
        cursor: Cursor | None = None
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(medods, "_already_sent", already_sent)
            api = _feed([])
            source = _source(api)
            for edits in reads:
                for edit in edits:
                    visits[edit["n"]] = _visit(edit["n"], edit["updated"], edit["status"], edit["id"])
                api.visits = {str(key): dict(v) for key, v in visits.items()}
                page = source.fetch_changes(cursor)
                pages.append(page)
                cursor = page.cursor
        return pages

    assert run(medods._already_sent) == run(lambda row, seen: False)
