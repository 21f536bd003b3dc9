"""The cache-aware pick: send a conversation back to the server that holds its prefix.

The rule (docs/routing.md says it for operators):

1. Only usable upstreams with a free slot are candidates; the slot truth comes first.
2. Among them, the one this balancer last sent the longest head of the request's prefix to
   (`PrefixMemory.matches`) wins, unless it is much busier than the least busy candidate: its
   busy fraction may exceed the least busy one's by at most `SPREAD` (the load-spread guard).
3. A request that matches nothing, or only its tools and system prompt (a new conversation, or
   one this balancer forgot), goes to its *hash home*: of the candidates within the same guard
   of the least busy one, and not holding much more of the cached working set than the others
   (`WORKING_SET_SLACK`), the first in rendezvous order of its first own block (after the
   shared part) hashed with each address. That is consistent hashing with bounded load: a
   conversation's first own block is the same in every turn and in every balancer, so two
   balancers fed by the same agents place it alike, and a turn the memory forgot still finds
   the server that was its home; the bounds keep the load and the caches' contents even.
   Keying a new conversation on a system prompt it shares with others would send them all to
   one server (the known trap of hashing the first message).
4. A request without a prefix (short prompts, embeddings) takes the least-busy pick.

Every choice says what it was (`Affinity`), for metrics.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from rower.balancer.prefix_memory import PrefixMemory
from rower.balancer.request_needs import RequestNeeds

if TYPE_CHECKING:
    from rower.balancer.upstream import Upstream

SPREAD = 0.5
"""How much busier (in busy slots over all slots) a server holding a request's prefix may be
than the least busy one and still get it. With 2-slot servers any free slot qualifies; with 8
slots a server 4 slots busier than the least busy loses its conversations to it."""


WORKING_SET_SLACK = 1.25
"""A new conversation skips a server that the memory says holds more than this times the
fleet's mean of remembered prefix blocks (plus the conversation's own): one server must not
end up with the conversations the others' caches would hold."""


class Affinity(enum.Enum):
    """What the cache-aware pick did with one request."""

    HIT = "hit"
    """Sent to the server holding the longest head of its prefix."""
    HIT_AFTER_WAIT = "hit_after_wait"
    """Sent there after waiting for it to free a slot (`Fleet`'s brief wait for home)."""
    MISS = "miss"
    """No server was sent a head of it: a new conversation (or one this balancer forgot)."""
    SPILL_BUSY = "spill_busy"
    """The server holding its longest head had no free slot."""
    SPILL_LOAD = "spill_load"
    """The server holding its longest head was too much busier than the least busy one."""
    SPILL_AFTER_WAIT = "spill_after_wait"
    """It waited for its busy home, which did not free a slot in time."""
    SPILL_UNUSABLE = "spill_unusable"
    """The server holding its longest head is stale, draining, quarantined or failing."""


@dataclass(frozen=True, slots=True)
class CachePick:
    """Where a request goes, why, and how many of its blocks that server was sent before.

    `home` is the server holding the request's longest head when it had no free slot (a
    request may wait for it: `Fleet`), with the blocks it holds.
    """

    upstream: Upstream
    affinity: Affinity
    matched_blocks: int = 0
    home: Upstream | None = None
    home_blocks: int = 0


def busy_fraction(upstream: Upstream) -> float:
    """Busy slots over all slots (1.0 for a server with no slots)."""
    total = upstream.slots_total
    return upstream.slots_processing / total if total else 1.0


def pick_cached(
    needs: RequestNeeds,
    memory: PrefixMemory,
    by_address: Mapping[str, Upstream],
    least_busy: Upstream,
    candidates: Callable[[], Iterable[Upstream]],
    now: float,
) -> CachePick:
    """The cache-aware choice for `needs` (which has a prefix), given the least-busy pick.

    `candidates` lists the usable upstreams with a free slot (called only for new
    conversations).
    """
    floor = busy_fraction(least_busy)
    longest: Affinity | None = None
    home: Upstream | None = None
    home_blocks = 0
    for address, blocks in memory.matches(needs.prefix):
        if blocks <= needs.shared_blocks:
            break  # Only the shared part: a new conversation.
        upstream = by_address.get(address)
        if upstream is None:
            continue
        if not upstream.is_usable(now):
            longest = longest or Affinity.SPILL_UNUSABLE
            continue
        if upstream.slots_free(now) <= 0:
            if longest is None:
                longest, home, home_blocks = Affinity.SPILL_BUSY, upstream, blocks
            continue
        if busy_fraction(upstream) - floor > SPREAD:
            return CachePick(least_busy, longest or Affinity.SPILL_LOAD, 0, home, home_blocks)
        return CachePick(upstream, longest or Affinity.HIT, blocks, home, home_blocks)
    if longest is not None:
        return CachePick(least_busy, longest, 0, home, home_blocks)
    return CachePick(hash_home(needs, memory, least_busy, candidates), Affinity.MISS)


def hash_home(
    needs: RequestNeeds,
    memory: PrefixMemory,
    least_busy: Upstream,
    candidates: Callable[[], Iterable[Upstream]],
) -> Upstream:
    """Where a new conversation goes: the first candidate in the rendezvous order of its first
    own block that is within `SPREAD` of `least_busy` and within `WORKING_SET_SLACK` of the
    fleet's mean remembered working set; `least_busy` when none is."""
    floor = busy_fraction(least_busy)
    seed = needs.prefix[min(needs.shared_blocks, len(needs.prefix) - 1)]
    bound = WORKING_SET_SLACK * memory.mean_weight() + len(needs.prefix)
    ranked = sorted(
        candidates(),
        key=lambda u: xxhash.xxh3_64_intdigest(u.address.encode(), seed),
        reverse=True,
    )
    for upstream in ranked:
        if busy_fraction(upstream) - floor <= SPREAD and memory.weight(upstream.identity) <= bound:
            return upstream
    return least_busy
