"""What this process knows to be recorded in the isolation ledger: (holder, digest) pairs, so that
the hot path (a HEAD or GET by digest) is answered from memory. Both ledgers (SQLite and S3)
keep one. Positive answers only: a pair is added once its record is durable, and dropped
when the record is forgotten here; a miss asks the store.

Bounded (least recently used goes first) and read without a lock: a writer may hold the
ledger's lock through an fsync or a PUT, and the event loop must not wait for that. Single
dict operations are atomic; an entry evicted meanwhile is simply a miss.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Iterator

Pair = tuple[str, str]  # (tenant or "/<repository>", digest)


class RecordedPairs:
    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._pairs: OrderedDict[Pair, None] = OrderedDict()
        self.hits = 0  # lookups answered from memory (`cached`)
        self.misses = 0  # lookups the ledger had to ask its store (counted by the ledger)

    def holds(self, pair: Pair) -> bool:
        try:
            self._pairs.move_to_end(pair)
        except KeyError:
            return False
        return True

    def cached(self, pair: Pair) -> bool:
        """`holds`, counted as a hit: the isolation hot path's lookup."""
        if not self.holds(pair):
            return False
        self.hits += 1
        return True

    def remember(self, pair: Pair) -> None:
        self._pairs[pair] = None
        if len(self._pairs) > self.limit:
            self._pairs.popitem(last=False)

    def discard(self, pairs: Iterable[Pair]) -> None:
        for pair in pairs:
            self._pairs.pop(pair, None)

    def discard_digests(self, digests: Iterable[str]) -> None:
        gone = set(digests)
        self.discard([p for p in self if p[1] in gone])  # a copy: other threads read on

    def __iter__(self) -> Iterator[Pair]:
        return iter(list(self._pairs))  # copied in one C call: no thread interleaves

    def __len__(self) -> int:
        return len(self._pairs)
