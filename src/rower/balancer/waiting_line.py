"""One pool's buffer: first come first served, except that a server's freed slot goes first to
the oldest request whose prompt prefix that server holds.

When every slot of a pool is busy, requests wait here, and each slot that frees takes one. A
plain first-come line hands it to the oldest request whatever server freed it: under
saturation, when nearly every request passes through the buffer, conversations then land on
any server, push other conversations out of its cache, and are computed again from scratch
(in the model of the fleet, `bench/experiment_routing_model.py`, with 18 conversations on 3
servers that hold 5 each: nearly every turn went through the buffer, a third of them spilled
so, and reuse fell from the anchor's 0.77 to 0.22; with home lines it is 0.69). So each waiting
request also stands in the line of its *home*, the server holding its conversation (`Fleet`
says which, when it is buffered), and a freed slot goes to the oldest request of that server's
own line. A server no waiting request calls home takes the oldest request that has no home (a
new conversation, or one without a prompt prefix), and any server takes the oldest request
once it has waited `patience` seconds (its home may be slow, gone, or swamped).

And when every waiting request belongs to another server, a freed slot is *held*: nobody takes
it until the oldest request has waited `patience` (`next_for` says None, and the fleet keeps the
slot free for new conversations and for the conversations of that server). Giving it away would
move a conversation off its server: its whole prompt computed again there, and another
conversation pushed out of that server's cache, to win the few hundred milliseconds until its
own server frees a slot. In the model of the fleet, 18 conversations on 3 servers that hold 5
each: reuse 0.69 -> 0.88 (the anchor: 0.77), e2e p50 1.90 -> 1.32 s, p99 unchanged (4.55 ->
4.52 s), 19% more turns served (311 -> 371: the prefill it saves is the servers' time); 12
conversations: 0.89 -> 0.97 (the anchor 0.95).

A new conversation (a request with a prompt prefix that no server holds) has no home: any server
takes it, except that a server that served more conversations lately than another lets it go
(`next_for(crowded=)`) for as long as waiting costs less than computing its prompt (the fleet
says until when, `Waiter.emptier_until`): a server's cache keeps a handful of
conversations, and one more than it keeps makes them evict each other at every turn.

Every operation is O(1) (a dict per line), so a buffer of 10,000 costs no scan; the fleet's
`crowded` test looks at the pool's servers, and only when a new conversation could take a slot.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from rower.balancer.request_needs import RequestNeeds


@dataclass(frozen=True, slots=True)
class Waiter:
    """A request in the buffer: what it needs, since when it waits, and its home server."""

    needs: RequestNeeds | None
    since: float
    home: str | None = None
    emptier_until: float | None = None
    """For a new conversation (no home, a prompt prefix): until when a server that served more
    conversations lately than another lets it go (`next_for`)."""

    @property
    def new_conversation(self) -> bool:
        """Whether it is a new conversation (`emptier_until`)."""
        return self.emptier_until is not None


class WaitingLine:
    """The requests waiting for any slot of one pool, oldest first, and per home server."""

    def __init__(self) -> None:
        self._all: OrderedDict[int, Waiter] = OrderedDict()
        self._by_home: dict[str, OrderedDict[int, None]] = {}
        self._homeless: OrderedDict[int, None] = OrderedDict()
        self._newcomers: OrderedDict[int, None] = OrderedDict()
        """Waiters without a home that are new conversations."""

    def __len__(self) -> int:
        return len(self._all)

    def __bool__(self) -> bool:
        return bool(self._all)

    def __contains__(self, request_id: object) -> bool:
        return request_id in self._all

    def items(self) -> Iterator[tuple[int, Waiter]]:
        """The waiting requests, oldest first."""
        return iter(self._all.items())

    def get(self, request_id: int) -> Waiter | None:
        """`request_id`'s place in the buffer, or None if it does not wait."""
        return self._all.get(request_id)

    @property
    def has_newcomers(self) -> bool:
        """Whether a new conversation waits (without a home)."""
        return bool(self._newcomers)

    def add(self, request_id: int, waiter: Waiter, *, first: bool = False) -> None:
        """`request_id` waits; `first` puts it before everyone (it has waited longest)."""
        self._all[request_id] = waiter
        if first:
            self._all.move_to_end(request_id, last=False)
        line = self._line_of(waiter, create=True)
        line[request_id] = None
        if first:
            line.move_to_end(request_id, last=False)

    def remove(self, request_id: int) -> Waiter | None:
        """`request_id` stops waiting (dispatched, or its client left); None if it was not."""
        waiter = self._all.pop(request_id, None)
        if waiter is None:
            return None
        line = self._line_of(waiter, create=False)
        del line[request_id]
        if not line and waiter.home is not None:
            del self._by_home[waiter.home]
        return waiter

    def next_for(
        self, home: str, now: float, patience: float, crowded: Callable[[], bool] = lambda: False
    ) -> int | None:
        """Whom a slot freed on `home` goes to: the line's oldest once it has waited `patience`
        seconds; before, `home`'s own oldest waiter, else the oldest without a home, except a
        new conversation when `crowded()` says `home` serves more conversations than another
        server (until its `emptier_until`); None when nobody is left (the slot is held for a
        while)."""
        if not self._all:
            return None
        oldest, waiter = next(iter(self._all.items()))
        if now - waiter.since >= patience:
            return oldest
        line = self._by_home.get(home)
        if line:
            return next(iter(line))
        homeless = next(iter(self._homeless), None)
        newcomer = next(iter(self._newcomers), None)
        if newcomer is not None:
            waiter = self._all[newcomer]
            older = homeless is not None and self._all[homeless].since <= waiter.since
            fussy = waiter.emptier_until is not None and now < waiter.emptier_until
            if older or (fussy and crowded()):
                newcomer = None
        return newcomer if newcomer is not None else homeless

    def _line_of(self, waiter: Waiter, *, create: bool) -> OrderedDict[int, None]:
        if waiter.home is not None:
            if create:
                return self._by_home.setdefault(waiter.home, OrderedDict())
            return self._by_home[waiter.home]
        return self._newcomers if waiter.new_conversation else self._homeless

    def clear(self) -> None:
        self._all.clear()
        self._by_home.clear()
        self._homeless.clear()
        self._newcomers.clear()
