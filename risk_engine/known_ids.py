"""Which event ids may be stored already: a Bloom filter that grows without reading the ids back.

Scoring asks it first, so a new id (the common case) needs no database look-up; a "maybe" is settled by one.
A Bloom filter cannot grow, so this is a scalable Bloom filter (Almeida, Baquero, Preguiça and Hutchison,
"Scalable Bloom Filters", 2007): a stack of layers, each twice the size of the one before with half its
false-positive rate. When the newest layer holds as many ids as it was sized for, the next is added; the
false-positive rates sum to less than ``error_rate`` however many ids are added, and memory stays about
2 bytes an id. (Refilling a larger filter from the database instead would stall scoring while it reads
every stored id, for seconds past a few million.)
"""

from __future__ import annotations

from rbloom import Bloom


class KnownIds:
    """A set of strings that may answer "maybe" for one it never took (rarely: under ``error_rate``), never
    "no" for one it took."""

    def __init__(self, capacity: int, error_rate: float = 0.001) -> None:
        if capacity < 1 or not 0 < error_rate < 1:
            raise ValueError("capacity must be at least 1 and error_rate between 0 and 1")
        self._layers: list[Bloom] = []
        self._next_capacity = capacity
        self._next_error_rate = error_rate / 2  # the layers' rates: error_rate/2, /4, /8... sum under it
        self._room = 0
        self._add_layer()

    def _add_layer(self) -> None:
        self._layers.append(Bloom(self._next_capacity, self._next_error_rate))
        self._room = self._next_capacity
        self._next_capacity *= 2
        self._next_error_rate /= 2

    def add(self, key: str) -> None:
        """Take ``key`` in."""
        if self._room <= 0:
            self._add_layer()
        self._layers[-1].add(key)
        self._room -= 1

    def __contains__(self, key: str) -> bool:
        for layer in self._layers:  # noqa: SIM110 (asked on every scoring: a loop, not a generator)
            if key in layer:
                return True
        return False

    @property
    def layers(self) -> int:
        """How many layers it has grown to."""
        return len(self._layers)
