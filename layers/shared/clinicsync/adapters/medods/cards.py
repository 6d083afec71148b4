"""MEDODS client cards a warm container has read, and when the clients feed can vouch for one.

MEDODS reads cards one at a time (``GET /clients/{id}``, no batch read), and a visit whose client did not
change needs the client's card: on a steady day most of the poller's MIS requests. The cards are kept in
the container's memory, never stored or logged (they hold names and phones), and reused only on a
feed read's word (``MedodsCards``).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping


class MedodsCards[Card]:
    """Client cards this container has read, all current as of one point of the clients feed (its mark
    then); memory only (they hold names and phones: never stored, never logged), at most ``limit``,
    least recently used first out.

    Cards current at mark ``m`` stay current until a change, and a change made after that point has
    ``updatedAt >= m``. A whole read of the clients feed from ``since < m`` (``updatedAtAfter`` is
    strict) returns every such change, under the same assumption the feed's overlap already makes (a
    change is visible within the overlap): the cards of the clients it does not return are current
    as of that read, and take its mark. A read from ``since >= m`` cannot tell: every card goes. So
    a container that keeps polling keeps its cards; a cursor another container moved on empties them.
    """

    def __init__(self, limit: int = 5000) -> None:
        self._limit = limit
        self._cards: OrderedDict[str, Card] = OrderedDict()
        self._mark: int | None = None  # every card is the client as of this mark of the clients feed
        self._lock = threading.Lock()  # a container's threads may poll and resync at once

    def __len__(self) -> int:
        return len(self._cards)

    def vouched(self, since: int, read: Mapping[str, Card], mark: int, wanted: set[str]) -> dict[str, Card]:
        """After a whole read of the clients feed from ``since`` that returned ``read`` (every row,
        sent before or not) and left the feed's mark at ``mark``: the cards of ``wanted`` clients
        that read proves current. The read's rows are kept; the cards it cannot vouch for go."""
        with self._lock:
            if self._mark is None or since >= self._mark:
                self._cards.clear()
            self._mark = mark
            self._keep(read)
            found = {}
            for client_id in wanted:
                if (card := self._cards.get(client_id)) is not None:
                    self._cards.move_to_end(client_id)
                    found[client_id] = card
            return found

    def keep(self, cards: Mapping[str, Card], mark: int) -> None:
        """Cards read now, when the clients feed's mark is ``mark`` (at most the MIS's clock)."""
        with self._lock:
            self._mark = mark if self._mark is None or not self._cards else min(self._mark, mark)
            self._keep(cards)

    def forget(self) -> None:
        """After a read that cannot vouch for anything: cut short, or with a client row that did not parse."""
        with self._lock:
            self._cards.clear()
            self._mark = None

    def _keep(self, cards: Mapping[str, Card]) -> None:
        for client_id, card in cards.items():
            self._cards[client_id] = card
            self._cards.move_to_end(client_id)
        while len(self._cards) > self._limit:
            self._cards.popitem(last=False)
