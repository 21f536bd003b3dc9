"""Upstreams ordered by the pick policy, so the fleet finds the best one in O(log n).

The policy: among upstreams with a free slot, the fewest busy slots, then the most free, then
the least recently dispatched, then the earliest registered (the order a scan of the fleet
would see them in). Fewest busy comes first because a server's slots share its compute (one
CPU thread, or one GPU): a server with more slots is not faster, and ranking by free slots
piled streams onto the biggest one while a smaller one sat idle (SPEC ranks most free first;
docs/routing.md, "The least-busy pick", has the measurements).

A heap holds one entry per change of an upstream, keyed that way; the fleet adds one whenever
an upstream's free slots, busy slots or last dispatch may have changed.
Entries are never updated in place: an entry whose key no longer matches its upstream's state
(or whose upstream left the fleet) is dropped when it reaches the top. That covers what only
time changes too: an upstream that went stale has no free slot, so its entry goes, and its next
report adds a new one. `now` must never go back.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rower.balancer.upstream import Upstream

_Key = tuple[int, int, int, int]
_Entry = tuple[int, int, int, int, int, "Upstream"]


def pick_key(upstream: Upstream, now: float) -> _Key:
    """The upstream's rank now: smaller is better; a second item of 0 means no free slot."""
    return (
        upstream.slots_processing,
        -upstream.slots_free(now),
        upstream.last_dispatch,
        upstream.registered,
    )


def _has_free_slot(key: _Key) -> bool:
    return key[1] < 0


class UpstreamIndex:
    """A lazily cleaned heap over `upstreams` (the fleet's own dict, shared, never copied)."""

    def __init__(self, upstreams: Mapping[str, Upstream]) -> None:
        self._upstreams = upstreams
        self._heap: list[_Entry] = []
        # Breaks ties between two entries of one upstream with the same key (never compared
        # further: an Upstream is not orderable).
        self._pushes = itertools.count()

    def __len__(self) -> int:
        return len(self._heap)

    def update(self, upstream: Upstream, now: float) -> None:
        """`upstream` changed: rank it anew (if it has a free slot at all)."""
        key = pick_key(upstream, now)
        if _has_free_slot(key):
            heapq.heappush(self._heap, (*key, next(self._pushes), upstream))
        if len(self._heap) > 4 * len(self._upstreams) + 64:
            self._rebuild(now)

    def best(self, now: float) -> Upstream | None:
        """The upstream the policy picks now, or None when no upstream has a free slot."""
        heap = self._heap
        while heap:
            entry = heap[0]
            upstream = entry[5]
            if self._upstreams.get(upstream.key) is upstream:
                key = pick_key(upstream, now)
                if _has_free_slot(key) and key == entry[:4]:
                    return upstream
            heapq.heappop(heap)
        return None

    def _rebuild(self, now: float) -> None:
        self._heap = [
            (*key, next(self._pushes), upstream)
            for upstream in self._upstreams.values()
            if _has_free_slot(key := pick_key(upstream, now))
        ]
        heapq.heapify(self._heap)
