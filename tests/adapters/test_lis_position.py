"""The directory poll's read position in a LIS register: every edit is read, whatever second it lands in
and however it falls between the pages of a pass (``adapters/lis/position.py``).

The LIS emulator is driven through its HTTP API (in process, over httpx's WSGI transport) on a clock the
test controls; a lab clerk's edits and new rows use its admin helpers, as the LIS's own screens would."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx
from hypothesis import given, settings
from hypothesis import strategies as st

from clinicsync.adapters.lis.source import LisApi, LisSource, to_record
from clinicsync.domain.directory_records import DirectoryRecord
from clinicsync.domain.ports import Cursor
from sandbox.emulators.base import Clock
from sandbox.emulators.lis import LisEmulator

START = 1_780_000_000


@dataclass
class Lab:
    """A LIS on a frozen clock and the directory poll's view of it: the cursor and every record it delivered."""

    lis: LisEmulator
    source: LisSource
    cursor: Cursor | None = None
    delivered: list[DirectoryRecord] = field(default_factory=list)
    requests: int = 0

    @classmethod
    def open(cls, doctors: int, page_size: int, overlap: int = 0) -> Lab:
        lis = LisEmulator(doctors=doctors, clock=Clock(START))
        api = LisApi("http://lis.test", lis.api_key, httpx.Client(transport=httpx.WSGITransport(app=lis)))
        return cls(lis, LisSource(api, "BG", page_size=page_size, overlap_seconds=overlap))

    def page(self) -> bool:
        """One page of the poll, as the directory use case reads it; whether more pages follow."""
        page = self.source.changed("doctor", self.cursor)
        self.cursor = page.cursor
        self.delivered += page.records
        return page.more

    def poll(self) -> list[DirectoryRecord]:
        before = len(self.delivered)
        while self.page():
            pass
        return self.delivered[before:]

    def now(self, lis_id: str) -> DirectoryRecord:
        """The record as the LIS serves it now (its API's GET)."""
        return to_record("doctor", self.source._api.call("GET", f"/api/v1/doctors/{lis_id}"), "BG")

    def ids(self) -> list[str]:
        listed = self.source._api.call("GET", "/api/v1/doctors", params={"updated_since": 0, "limit": 200})
        return sorted(row["id"] for row in listed["items"])

    def last_delivered(self) -> dict[str, DirectoryRecord]:
        return {record.lis_id: record for record in self.delivered}


CITIES = ["Варна", "Русе", "Плевен"]

operations = st.lists(
    st.one_of(
        st.tuples(st.just("clerk_edit"), st.integers(0, 7), st.sampled_from(CITIES)),
        st.tuples(st.just("our_write"), st.integers(0, 7), st.sampled_from(["+359888111222", "+359888333444"])),
        st.tuples(st.just("opt_out"), st.integers(0, 7)),
        st.tuples(st.just("new_doctor"), st.sampled_from(CITIES)),
        st.tuples(st.just("tick"), st.integers(1, 3)),
        st.tuples(
            st.just("page"),
        ),
        st.tuples(
            st.just("poll"),
        ),
    ),
    max_size=25,
)


def _apply(lab: Lab, op: tuple[Any, ...]) -> None:
    ids = lab.ids()
    match op:
        case ("clerk_edit", i, city):
            lab.lis.edit("doctor", ids[i % len(ids)], city=city)
        case ("our_write", i, phone):
            lab.source.update("doctor", ids[i % len(ids)], {"phone": phone})
        case ("opt_out", i):
            lab.source.write_opt_outs(f"doctor:{ids[i % len(ids)]}", ["marketing"])
        case ("new_doctor", city):
            lab.lis.add_doctor(first_name="Нов", last_name="Лекар", city=city)
        case ("tick", seconds):
            lab.lis.clock.advance(seconds)
        case ("page",):
            lab.page()
        case ("poll",):
            lab.poll()


@settings(max_examples=150, deadline=None)
@given(
    doctors=st.integers(2, 6),
    page_size=st.integers(2, 4),
    overlap=st.sampled_from([0, 0, 2]),
    ops=operations,
)
def test_the_first_pass_after_any_edits_and_pages_delivers_every_record_as_the_lis_has_it(
    doctors: int, page_size: int, overlap: int, ops: list[tuple[Any, ...]]
) -> None:
    """Whatever the edits (a clerk's, our own writes, opt-outs, new rows), however they fall in the same
    second or between the pages of a pass, the first pass that starts after them delivers every record's
    current content (an edit to a row the pass under way has already read waits for the next pass)."""
    lab = Lab.open(doctors, page_size, overlap)
    for op in ops:
        _apply(lab, op)
    lab.poll()  # the pass under way, if any
    lab.poll()
    delivered = lab.last_delivered()
    assert {lis_id: lab.now(lis_id) for lis_id in lab.ids()} == {lis_id: delivered.get(lis_id) for lis_id in lab.ids()}


@settings(max_examples=100, deadline=None)
@given(doctors=st.integers(2, 6), page_size=st.integers(2, 4), ops=operations)
def test_without_an_overlap_no_row_is_delivered_twice_unchanged(
    doctors: int, page_size: int, ops: list[tuple[Any, ...]]
) -> None:
    """Asking again for the last row read, or reading a second again after rows moved, costs requests, not
    deliveries: a record reaches the directory sync again only when the LIS changed it."""
    lab = Lab.open(doctors, page_size)
    for op in ops:
        _apply(lab, op)
    lab.poll()
    versions = [(record.lis_id, record.version, record) for record in lab.delivered]
    for index, (lis_id, version, record) in enumerate(versions):
        assert all((i, v, r) != (lis_id, version, record) for i, v, r in versions[:index])


# --- named regressions -----------------------------------------------------------------------------------


def test_an_opt_out_ticked_in_the_same_second_as_our_own_write_is_read_by_the_next_poll() -> None:
    """The lab demo's flake: the directory run wrote a doctor's phone to the LIS, its poll read the row at
    that second, and the consent job ticked the doctor's flag in the same second. The poll skipped the row
    (read at its watermark), so vTiger's opt-out waited for the deep resync."""
    lab = Lab.open(doctors=3, page_size=10)
    lab.poll()
    lab.lis.clock.advance(5)
    lab.source.update("doctor", "D1002", {"phone": "+359888111222"})
    assert [r.lis_id for r in lab.poll()] == ["D1002"]
    lab.source.write_opt_outs("doctor:D1002", ["marketing"])  # the same second
    read = lab.poll()
    assert [(r.lis_id, r.do_not_mail) for r in read] == [("D1002", True)]
    assert lab.poll() == []  # and once only


def test_an_edit_while_a_pass_pages_never_skips_a_row() -> None:
    """A row read on the pass's first page is edited before the second page: it moves to the end, and
    every row after it moves up one. Paging on by the old offset skipped the row that moved into it."""
    lab = Lab.open(doctors=4, page_size=2)
    for second, lis_id in enumerate(["D1001", "D1002", "D1003", "D1004"]):
        lab.lis.clock.advance(1)
        lab.lis.edit("doctor", lis_id, city=CITIES[second % 3])  # one row a second
    assert lab.page()  # D1001, D1002
    lab.lis.clock.advance(1)
    lab.lis.edit("doctor", "D1001", city="Плевен")  # moves to the end
    lab.poll()
    assert sorted(lab.last_delivered()) == ["D1001", "D1002", "D1003", "D1004"]
    assert lab.last_delivered()["D1001"].fields["city"] == "Плевен"


def test_a_new_row_in_the_second_being_paged_is_read_and_nothing_is_skipped() -> None:
    """Every seeded row shares one second; a clerk adds a row in that second while the pass pages it."""
    lab = Lab.open(doctors=5, page_size=2)
    assert lab.page()
    lab.lis.add_doctor(first_name="Нов", last_name="Лекар", city="Русе")  # D1006, same second
    lab.lis.edit("doctor", "D1001", city="Русе")  # and an edit that moves a row already read
    lab.poll()
    assert sorted(lab.last_delivered()) == [f"D{n}" for n in range(1001, 1007)]
    assert lab.last_delivered()["D1001"].fields["city"] == "Русе"


def test_a_row_that_joins_the_second_being_paged_while_another_leaves_it_is_read() -> None:
    """Hypothesis' counterexample to the position check alone: while a pass pages the current second, an
    opt-out moves an older row into it (ahead of the last row read) and, a second later, an edit moves a row
    read earlier out of it. The last row read keeps its offset; the ``total`` shows the row that joined."""
    lab = Lab.open(doctors=2, page_size=3)
    lab.source.write_opt_outs("doctor:D1001", ["marketing"])
    lab.lis.add_doctor(first_name="Нов", last_name="Лекар", city="Варна")  # D1003
    assert lab.page()  # D1002 (seeded second), then D1001 and D1003 (this second)
    lab.source.write_opt_outs("doctor:D1002", ["marketing"])  # joins this second, ahead of D1003
    lab.lis.clock.advance(1)
    lab.lis.edit("doctor", "D1001", city="Варна")  # leaves it
    lab.poll()
    assert lab.last_delivered()["D1002"].do_not_mail is True


def test_reading_a_second_again_twice_delivers_no_row_twice() -> None:
    """Hypothesis' counterexample: a second read again from its start a second time forgot the rows read
    before the first re-read, and delivered them again."""
    lab = Lab.open(doctors=4, page_size=2)
    lab.source.write_opt_outs("doctor:D1001", ["marketing"])
    lab.poll()
    lab.lis.edit("doctor", "D1003", city="Варна")
    lab.lis.add_doctor(first_name="Нов", last_name="Лекар", city="Варна")  # D1005
    assert lab.page() and lab.page()
    lab.lis.edit("doctor", "D1004", city="Варна")
    assert lab.page()
    lab.source.write_opt_outs("doctor:D1002", ["marketing"])
    lab.poll()
    delivered = [(r.lis_id, r.version, r.fields["city"], r.do_not_mail) for r in lab.delivered]
    assert len(delivered) == len(set(delivered))
    assert sorted(lab.last_delivered()) == [f"D{n}" for n in range(1001, 1006)]


def test_a_cursor_written_before_digests_reads_its_watermark_rows_once_more() -> None:
    """A deployed stack's cursor lists the ids read at its watermark without digests (and may be mid-pass):
    those rows are read once more, then skipped while unchanged."""
    lab = Lab.open(doctors=3, page_size=2)
    seeded = lab.now("D1001").version  # every seeded row shares one second
    lab.cursor = {"since": seeded, "offset": 2, "seen": ["D1001", "D1002"], "newest": seeded, "at_newest": ["D1001"]}
    assert sorted(r.lis_id for r in lab.poll()) == ["D1001", "D1002", "D1003"]
    assert lab.poll() == []


def test_every_page_after_the_first_asks_for_the_last_row_again() -> None:
    """The cost of the check: one row of each later page is the last one read again, so a pass of 5 rows by
    pages of 2 takes 5 requests (3 without the check); a second is read again only when its rows moved."""
    lab = Lab.open(doctors=5, page_size=2)
    before = lab.source._api.requests
    lab.poll()
    assert lab.source._api.requests - before == 5 and len(lab.delivered) == 5
