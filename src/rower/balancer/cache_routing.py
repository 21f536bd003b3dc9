"""The cache-aware pick: send a conversation back to the server that holds its prefix.

The rule (docs/routing.md says it for operators):

1. Only usable upstreams with a free slot are candidates; the slot truth comes first.
2. Among them, the one this balancer last sent the longest head of the request's prefix to
   (`PrefixMemory.matches`) wins, unless it is much busier than the least busy candidate: its
   busy fraction may exceed the least busy one's by at most `SPREAD` (the load-spread guard).
3. A request that matches nothing, or only its tools and system prompt (a new conversation, or
   one this balancer forgot and whose server it cannot tell), goes to the candidate with the
   fewest conversations lately (`recent_conversations`), within the load guard; among those the
   least busy, then by rendezvous hashing of its first own block (after the shared part) with
   each address (`hash_rank`), so balancers that remember the same (`peers`) tend to choose
   alike. So each server's cache gets its share of conversations: on an idle 3-server fleet, 9
   new conversations go 3/3/3, where the hash alone gave 2/3/4. Least busy first, as it was,
   placed 12 conversations 5/4/3 in 4 of 5 runs on real llama-servers (the servers finish first
   turns at different times), and the server with 5 did most of the evicting (docs/routing.md).
   When every server with the fewest conversations is busy, that server is the home the new
   conversation may wait for (`Fleet`, as for a conversation's own server: while the wait is
   shorter than what its prompt costs to compute, at most 2 s), and in the buffer a new
   conversation lets a fuller server's freed slot go for as long (`waiting_line`): placed by
   the free slot alone, 12 conversations went other than 4/4/4 in 11 of 25 runs, where each
   server keeps 4, and a fifth conversation on a server makes them evict each other (with the
   wait: 2 of 25, docs/routing.md).
   One whose home cannot take it (a spill) goes where the load says: to a candidate with as
   few busy slots as the least-busy pick; among those, the one with the fewest conversations.
   A/B in one run (5 interleaved repeats, 12 chat conversations that fit the caches): reuse
   0.68 and 0.68, prefill 10.3 s against 13.7 s with the hash alone. Not the hash home
   regardless of load: two conversations
   sharing a system prompt on one server evict each other from its slots (llama-server gives a
   prompt the idle slot with the longest common prefix), and on a model of the fleet
   (bench/experiment_routing_model.py) hashing within the load guard gained nothing. Keying a
   new conversation on a system prompt it shares with others would send them all to one
   server (the known trap of hashing the first message).
4. A request without a prefix (short prompts, embeddings) takes the least-busy pick.

A conversation the memory forgot for room goes back to where it lived
(`PrefixMemory.last_server`) when that server has a free slot within the guard; when it has
none, that server is the home the request may wait for (`Fleet`), as for one believed to hold
it. Sent elsewhere at once, as it was, it was computed again there and pushed another
conversation out of that server's cache (docs/routing.md, "Forgotten is not moved").

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


class Affinity(enum.Enum):
    """What the cache-aware pick did with one request."""

    HIT = "hit"
    """Sent to the server holding the longest head of its prefix."""
    HIT_AFTER_WAIT = "hit_after_wait"
    """Sent there after waiting for it to free a slot (`Fleet`'s brief wait for home)."""
    MISS = "miss"
    """No server was sent a head of it: a new conversation (or one this balancer forgot)."""
    RETURN = "return"
    """Back to the server where its conversation lived, which the memory forgot for want of
    room (`PrefixMemory.last_server`): the server may still hold some of it. Also after
    waiting for that server."""
    SPILL_BUSY = "spill_busy"
    """The server holding its longest head (or, for a conversation the memory forgot, the
    server where it lived) had no free slot."""
    SPILL_LOAD = "spill_load"
    """The server holding its longest head (or where a forgotten conversation lived) was too
    much busier than the least busy one."""
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
    members: Mapping[str, Upstream],
    least_busy: Upstream,
    candidates: Callable[[], Iterable[Upstream]],
    now: float,
    conversations: Callable[[Upstream], int],
) -> CachePick:
    """The cache-aware choice for `needs` (which has a prefix), given the least-busy pick.

    `members` are the pool's upstreams by identity; `candidates` lists the usable ones with a
    free slot (called only when the memory does not decide); `conversations` says how many
    conversations a server served lately (`recent_conversations`).
    """
    floor = busy_fraction(least_busy)
    longest: Affinity | None = None
    home: Upstream | None = None
    home_blocks = 0
    for identity, blocks in memory.matches(needs.prefix):
        if blocks <= needs.shared_blocks:
            break  # Only the shared part: a new conversation.
        upstream = members.get(identity)
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
            longest = longest or Affinity.SPILL_LOAD
            break
        return CachePick(upstream, longest or Affinity.HIT, blocks, home, home_blocks)
    if longest is None:
        # Forgotten for want of room, the conversation still lives where it went last: going
        # back there keeps each server's set of conversations (its cache) stable. When that
        # server is busy, it is the home to wait for (`Fleet`), as one believed to hold the
        # prefix would be: the memory forgot the conversation for room, not because the
        # server did, so its whole head is at stake.
        last = members.get(memory.last_server(needs.prefix) or "")
        if last is not None and last.is_usable(now):
            if last.slots_free(now) <= 0:
                longest, home, home_blocks = Affinity.SPILL_BUSY, last, len(needs.prefix)
            elif busy_fraction(last) - floor <= SPREAD:
                return CachePick(last, Affinity.RETURN)
            else:
                longest = Affinity.SPILL_LOAD
    rank = hash_rank(needs)
    if longest is None:
        # A new conversation: where it will live for its next turns matters more than this
        # turn's slot. The server with the fewest conversations lately (within the load
        # guard), then the least busy, then by rendezvous rank, so that balancers that
        # remember the same choose alike.
        placed = max(
            (u for u in candidates() if busy_fraction(u) - floor <= SPREAD),
            key=lambda u: (-conversations(u), -u.slots_processing, rank(u)),
            default=least_busy,
        )
        # When every server with the fewest conversations is busy, the one of them it ranks
        # first is the home it may wait for (`Fleet`): placed on a fuller server, it and the
        # conversations there evict each other at their next turns.
        emptiest = fewest_conversations(members.values(), now, conversations)
        if emptiest is None or conversations(placed) <= conversations(emptiest):
            return CachePick(placed, Affinity.MISS)
        emptier = max(
            (
                u
                for u in members.values()
                if u.is_usable(now) and conversations(u) == conversations(emptiest)
            ),
            key=rank,
        )
        return CachePick(placed, Affinity.MISS, 0, emptier, len(needs.prefix))
    # A spill goes where the load says: a server with as few busy slots as the least busy
    # pick's, the one with the fewest conversations lately, then by rendezvous rank.
    fewest = least_busy.slots_processing
    elsewhere = max(
        (u for u in candidates() if u.slots_processing <= fewest),
        key=lambda u: (-conversations(u), rank(u)),
        default=least_busy,
    )
    return CachePick(elsewhere, longest, 0, home, home_blocks)


def fewest_conversations(
    members: Iterable[Upstream], now: float, conversations: Callable[[Upstream], int]
) -> Upstream | None:
    """A usable member with the fewest conversations lately, free slot or not (None when no
    member is usable)."""
    return min((u for u in members if u.is_usable(now)), key=conversations, default=None)


def home_of(
    needs: RequestNeeds, memory: PrefixMemory, members: Mapping[str, Upstream], now: float
) -> str | None:
    """Where a request waiting in the buffer belongs (`waiting_line`): the usable member the
    balancer sent the longest head of its own prefix (beyond the shared part) to, or where the
    conversation lived when the memory forgot it; None for a new conversation (the first free
    slot anywhere will do: that keeps the servers' sets of conversations even). A home that
    stops being usable later only delays the request by the buffer's patience."""
    for identity, blocks in memory.matches(needs.prefix):
        if blocks <= needs.shared_blocks:
            return None
        upstream = members.get(identity)
        if upstream is not None and upstream.is_usable(now):
            return identity
    last = members.get(memory.last_server(needs.prefix) or "")
    return last.identity if last is not None and last.is_usable(now) else None


def conversation_of(needs: RequestNeeds) -> int:
    """A conversation's name: its first own block (after the shared part; the same in every
    turn). `needs` has a prefix."""
    return needs.prefix[min(needs.shared_blocks, len(needs.prefix) - 1)]


def hash_rank(needs: RequestNeeds) -> Callable[[Upstream], int]:
    """Rendezvous hashing of a conversation with a server: its name (`conversation_of`)
    hashed with the server's address. The server of the highest rank is the conversation's
    hash home; every balancer computes the same."""
    seed = conversation_of(needs)
    return lambda upstream: xxhash.xxh3_64_intdigest(upstream.address.encode(), seed)
