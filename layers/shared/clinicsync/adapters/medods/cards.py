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
    """Client cards this container has read, each with the clients feed's mark when it was read; memory
    only (they hold names and phones: never stored, never logged), at most ``limit``, least recent first out.

    A card read when the feed's mark was ``m`` is older than every change the MIS can make after it, and
    such a change has ``updatedAt >= m``. A later read of the clients feed from ``since < m``
    (``updatedAtAfter`` is strict) therefore returns every client changed after the card was read, under
    the same assumption the feed's overlap already makes (a change is visible within the overlap). So
    after such a read, a card whose client is not in it is the client as it is now.
    """

    def __init__(self, limit: int = 5000) -> None:
        self._limit = limit
        self._cards: OrderedDict[str, tuple[Card, int]] = OrderedDict()
        self._lock = threading.Lock()  # a container's threads may poll and resync at once

    def __len__(self) -> int:
        return len(self._cards)

    def vouched(self, since: int, read: Mapping[str, Card], mark: int, wanted: set[str]) -> dict[str, Card]:
        """After a whole read of the clients feed from ``since`` that returned ``read`` (every row,
        sent before or not) and left the feed's mark at ``mark``: the cards of ``wanted`` clients
        that read proves current. Cards it cannot vouch for are forgotten; the read's rows are kept."""
        with self._lock:
            for client_id in [k for k, (_, at) in self._cards.items() if at <= since]:
                del self._cards[client_id]
            self._keep(read, mark)
            found = {}
            for client_id in wanted:
                if (entry := self._cards.get(client_id)) is not None:
                    self._cards.move_to_end(client_id)
                    found[client_id] = entry[0]
            return found

    def keep(self, cards: Mapping[str, Card], mark: int) -> None:
        """Cards read now, when the clients feed's mark is ``mark`` (at most the MIS's clock)."""
        with self._lock:
            self._keep(cards, mark)

    def forget(self) -> None:
        """After a read that cannot vouch for anything: cut short, or with a client row that did not parse."""
        with self._lock:
            self._cards.clear()

    def _keep(self, cards: Mapping[str, Card], mark: int) -> None:
        for client_id, card in cards.items():
            self._cards[client_id] = (card, mark)
            self._cards.move_to_end(client_id)
        while len(self._cards) > self._limit:
            self._cards.popitem(last=False)
