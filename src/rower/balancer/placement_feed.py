"""This balancer's placements, fanned out to the balancers that follow it.

Each dispatch the memory of prefixes recorded is encoded once, only while somebody follows, and
queued for every follower. Only this balancer's own placements are told, never what it heard
from its peers: so two balancers that follow each other do not echo.

A follower that does not keep up is let go: its queue is bounded (`MAX_QUEUED` lines), and when
it is full the follower's stream is ended (it reconnects, and has only missed placements: its
reuse drops for the conversations they concerned, nothing else). Waiting for it instead would
let one slow peer grow this balancer's memory without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from rower.balancer.placement_wire import encode
from rower.balancer.prefix_memory import Placement

MAX_QUEUED = 4096
"""Lines queued for one follower at most (a few seconds of a busy fleet's dispatches)."""


@dataclass(slots=True, eq=False)
class Follower:
    """One balancer following this one's placements: its lines, and whether it fell behind."""

    lines: asyncio.Queue[bytes] = field(default_factory=lambda: asyncio.Queue(MAX_QUEUED))
    fell_behind: bool = False
    """Its queue overflowed: its stream must end (the queue being full, its reader finds out
    at once)."""


class PlacementFeed:
    """Where placements are published and followers subscribe."""

    def __init__(self) -> None:
        self._followers: set[Follower] = set()
        self.published = 0
        """Placements told to at least one follower since start."""
        self.dropped_followers = 0
        """Followers let go for falling behind since start."""

    @property
    def followers(self) -> int:
        return len(self._followers)

    def publish(self, placement: Placement | None) -> None:
        """This balancer sent `placement.prefix` to `placement.server` (None: nothing)."""
        if placement is None or not self._followers:
            return
        line = encode(placement)
        self.published += 1
        for follower in self._followers:
            if follower.fell_behind:
                continue
            try:
                follower.lines.put_nowait(line)
            except asyncio.QueueFull:
                follower.fell_behind = True
                self.dropped_followers += 1

    @contextlib.asynccontextmanager
    async def follow(self) -> AsyncIterator[Follower]:
        """A follower that gets every placement from now on, until it leaves."""
        follower = Follower()
        self._followers.add(follower)
        try:
            yield follower
        finally:
            self._followers.discard(follower)
