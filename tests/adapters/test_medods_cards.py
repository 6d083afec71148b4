"""A warm poller keeps the MEDODS client cards it has read and reuses one only while the clients feed
vouches for it: whatever the edits, polls, other containers and restarts, every change set carries the
client's card as the MIS has it at that poll, and a steady day's visit changes cost no card read."""

from __future__ import annotations

from typing import cast

from hypothesis import example, given, settings
from hypothesis import strategies as st

from clinicsync.adapters.medods.cards import MedodsCards
from clinicsync.adapters.medods.source import MedodsApi, MedodsClient, MedodsSource
from clinicsync.domain.ports import Cursor
from tests.adapters.medods_fake import MedodsFake
from tests.helpers import demo_config

NOW = 1_780_000_000
# Every visit is new to the feed, no client is: each visit needs its client's card.
START: Cursor = {"appointments": NOW - 7200, "clients": NOW, "seen": {}}


class LiveMis(MedodsFake):
    """The MIS over records that change with a clock: clients edited, visits moved, at ``now``."""

    def __init__(self, clients: int, visits: int) -> None:
        visit = {"date": "2026-10-01", "time": "10:00", "status": "approved", "updatedAt": NOW - 3600}
        super().__init__(
            [{**visit, "id": 1000 + v, "clientId": 1 + v % clients} for v in range(visits)],
            [{"id": c, "surname": "S0", "phone": None, "updatedAt": NOW - 3600} for c in range(1, clients + 1)],
        )
        self.now = NOW

    def edit_client(self, n: int) -> None:
        client = self.clients[str(1 + n % len(self.clients))]
        client["surname"] = f"S{self.now}"
        client["updatedAt"] = self.now

    def move_visit(self, n: int) -> None:
        visit = list(self.visits.values())[n % len(self.visits)]
        visit["status"] = "confirmed_by_administrator" if visit["status"] == "approved" else "approved"
        visit["updatedAt"] = self.now


def _source(mis: LiveMis, cards: MedodsCards[MedodsClient] | None, max_records: int = 5000) -> MedodsSource:
    config = demo_config()
    config = config.model_copy(update={"mis": config.mis.model_copy(update={"page_size": 7})})
    return MedodsSource(cast(MedodsApi, mis), config, max_records=max_records, cards=cards)


class Poller:
    """A container's poll against the shared cursor (the table's), as the scheduled poller runs it."""

    def __init__(self, mis: LiveMis, cards: MedodsCards[MedodsClient] | None, max_records: int = 5000) -> None:
        self.source = _source(mis, cards, max_records)

    def poll(self, mis: LiveMis, cursor: Cursor | None) -> Cursor:
        while True:
            page = self.source.fetch_changes(cursor)
            for change in page.changes:
                card = mis.clients[change.patient.mis_id]
                assert change.patient.last_name == card["surname"], "a stale card was sent"
                assert change.patient.version == card["updatedAt"]
            cursor = page.cursor
            if not page.more:
                return cursor


@st.composite
def cycles(draw: st.DrawFn) -> tuple[int, list[int], list[int], list[int], bool, int]:
    """One poll cycle: the clock moves, some clients are edited (some into rows that do not parse, until
    the next cycle mends them), some visits move, a container may restart, one container polls."""
    return (
        draw(st.sampled_from([1, 60, 119, 120, 121, 600])),
        draw(st.lists(st.integers(0, 7), max_size=2)),
        draw(st.lists(st.integers(0, 7), max_size=1)),
        draw(st.lists(st.integers(0, 7), max_size=3)),
        draw(st.booleans()),
        draw(st.integers(0, 2)),  # which container polls: 0 and 1 stay warm, 2 is a fresh one each time
    )


@settings(max_examples=300, deadline=None)
@example(  # container 0 reads client 1's card; others poll its edit and move the cursor past it; 0 polls
    clients=2,
    visits=2,
    max_records=5000,
    steps=[
        (1, [], [], [0, 1], False, 0),
        (600, [0], [], [], False, 2),
        (600, [1], [], [], False, 2),
        (600, [], [], [0], False, 0),
    ],
    from_start=True,
)
@given(
    clients=st.integers(1, 3),  # few: edits, visit moves and card reads keep meeting the same clients
    visits=st.integers(1, 8),
    max_records=st.sampled_from([2, 5000]),  # 2: reads cut short, the clients feed often not read at all
    steps=st.lists(cycles(), max_size=12),
    from_start=st.booleans(),
)
def test_every_change_set_carries_the_card_as_the_mis_has_it_at_that_poll(
    clients: int,
    visits: int,
    max_records: int,
    steps: list[tuple[int, list[int], list[int], list[int], bool, int]],
    from_start: bool,
) -> None:
    mis = LiveMis(clients, visits)
    pollers = [Poller(mis, MedodsCards(limit=2), max_records) for _ in range(2)]  # small: eviction too
    cursor: Cursor | None = START if from_start else None
    for tick, edits, breaks, moves, restart, which in steps:
        mis.now += tick
        mis.broken.clear()
        for n in edits:
            mis.edit_client(n)
        for n in breaks:
            mis.broken.add(str(1 + n % clients))
            mis.edit_client(n)
        for n in moves:
            mis.move_visit(n)
        if restart and which < 2:
            pollers[which] = Poller(mis, MedodsCards(limit=2), max_records)
        poller = pollers[which] if which < 2 else Poller(mis, MedodsCards(), max_records)
        cursor = poller.poll(mis, cursor)


def test_a_warm_poller_reads_no_card_for_a_visit_whose_client_the_feed_shows_unchanged() -> None:
    mis = LiveMis(clients=10, visits=10)
    poller = Poller(mis, MedodsCards())
    cursor = poller.poll(mis, START)  # the container's first poll: every visit's card is read
    assert mis.card_reads == 10
    for cycle in range(1, 8):  # a client edited every minute: the feed's mark moves past the overlap
        mis.now += 60
        mis.edit_client(cycle + 6)
        mis.move_visit(cycle)
        mis.move_visit(cycle + 3)
        reads = mis.card_reads
        cursor = poller.poll(mis, cursor)
        assert mis.card_reads == reads, f"cycle {cycle} read cards the feed vouched for"
    mis.now += 60
    mis.edit_client(2)  # client 3 changed: its row in the clients feed is the card, nothing read
    mis.move_visit(2)
    reads = mis.card_reads
    poller.poll(mis, cursor)
    assert mis.card_reads == reads


def test_a_poll_whose_cursor_another_container_moved_past_a_card_reads_it_again() -> None:
    mis = LiveMis(clients=4, visits=4)
    warm, other = Poller(mis, MedodsCards()), Poller(mis, MedodsCards())
    cursor = warm.poll(mis, START)
    mis.now += 600  # past the overlap: the shared cursor moves beyond the warm container's cards
    mis.edit_client(0)
    cursor = other.poll(mis, cursor)
    mis.now += 600
    mis.move_visit(1)
    reads = mis.card_reads
    warm.poll(mis, cursor)
    assert mis.card_reads == reads + 1


def test_a_client_row_the_overlap_returns_again_is_the_card_without_a_cache() -> None:
    mis = LiveMis(clients=3, visits=3)
    poller = Poller(mis, None)
    cursor = poller.poll(mis, None)
    mis.now += 10
    mis.edit_client(0)
    cursor = poller.poll(mis, cursor)
    mis.now += 10  # within the overlap: the next read returns client 1's row again, already sent
    mis.move_visit(0)
    reads = mis.card_reads
    poller.poll(mis, cursor)
    assert mis.card_reads == reads


def test_the_cards_kept_are_bounded() -> None:
    mis = LiveMis(clients=50, visits=50)
    cards: MedodsCards[MedodsClient] = MedodsCards(limit=20)
    Poller(mis, cards).poll(mis, None)
    assert len(cards) == 20
