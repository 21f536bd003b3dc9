"""The servers of one model, and the requests waiting for one of them.

A fleet that serves several models keeps one pool per model: its own buffer, its own pick
index, its own requests waiting for their home server. A request for model A waits only behind
other requests for A, and a slot freed on a server of A goes only to A's waiters: no
head-of-line blocking between models. The fleet core (`fleet`) routes every event to the pool
it concerns; the invariants of the core hold per pool.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream import Upstream
from rower.balancer.upstream_index import UpstreamIndex
from rower.balancer.waiting_line import WaitingLine


@dataclass(frozen=True, slots=True)
class Homing:
    """A request waiting for its home server (the busy one holding its prefix) until `until`."""

    upstream: Upstream
    until: float
    needs: RequestNeeds


class Pool:
    """One model's servers (`members`, by unit key) and waiting requests.

    Args:
        model: the model id (`models.UNKNOWN` for servers that name none).
        max_buffered: most requests that may wait here at once; 0 means never wait.
    """

    def __init__(self, model: str, *, max_buffered: int) -> None:
        self.model = model
        self.max_buffered = max_buffered
        self.members: dict[str, Upstream] = {}
        self.index = UpstreamIndex(self.members)
        self.by_identity: dict[str, Upstream] = {}
        """The member of each llama-server (address, and model for a router's): one each."""
        self.waiting = WaitingLine()
        """Requests waiting for any slot: first come first, but a server's freed slot goes
        first to a request whose prefix it holds (`waiting_line`)."""
        self.homing: OrderedDict[int, Homing] = OrderedDict()
        """Requests waiting a short while for the busy server holding their prefix."""
        self.held: dict[str, Upstream] = {}
        """Members with a slot kept free while requests wait, each for a server of its own
        (`waiting_line`), by key: new conversations may take it, and `Fleet.expire_waits`
        gives it away when the oldest request has waited its patience."""

    @property
    def buffered(self) -> int:
        """Requests waiting here now (for any slot, or for their home server)."""
        return len(self.waiting) + len(self.homing)

    @property
    def is_idle(self) -> bool:
        """Whether the pool has neither servers nor waiting requests (it may be dropped)."""
        return not self.members and not self.waiting and not self.homing

    def join(self, upstream: Upstream) -> None:
        """`upstream` serves this pool's model now."""
        self.members[upstream.key] = upstream
        self.by_identity[upstream.identity] = upstream

    def leave(self, upstream: Upstream) -> None:
        """`upstream` left the fleet or serves another model now."""
        if self.members.get(upstream.key) is upstream:
            del self.members[upstream.key]
            self.held.pop(upstream.key, None)
        if self.by_identity.get(upstream.identity) is upstream:
            del self.by_identity[upstream.identity]
