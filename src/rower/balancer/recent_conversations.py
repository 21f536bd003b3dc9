"""How many conversations each server has served lately: where a new conversation goes.

A server's prompt cache keeps a handful of conversations; one more than it keeps and they
evict each other turn after turn. So a new conversation goes to the server with the fewest
conversations that had a turn there in the last `WINDOW` seconds (`cache_routing`), which
keeps the servers' sets of conversations even, as a session hash keeps them about even. The
prefix memory's weight per server could not say it: it also counts conversations that ended
long ago (their entries stay until room is needed) and shrinks when the server is found to
hold less, so a server that evicts looked emptier and got more. On real llama-servers, 12
conversations placed by fewest busy slots first went 5/4/3 in 4 of 5 runs, and the server with
5 did most of the evicting (docs/routing.md).

A conversation is named by its first own block (after any shared system prompt: the same in
every turn). Bounded: at most `max_per_server` conversations a server, the oldest dropped; a
server none of whose conversations had a turn in the window is forgotten at the next sweep (one
per window), so servers that left or were replaced (new addresses as a fleet scales) keep
nothing.
"""

from __future__ import annotations

from collections import OrderedDict

WINDOW = 10.0
"""Seconds since its last turn for which a conversation still counts as living on a server. A
conversation that ended still counts that long, and new ones are placed around it: with 60 s,
on real llama-servers (benchmark runs 10-30 s apart), the previous run's conversations skewed
the next run's placement (12 conversations went 4/4/4 in 1 of 5 runs). One that pauses longer
counts as gone until its next turn: so the count follows how busy each server's cache is kept,
the turns of the last seconds, more than how many users it has. A judgement."""

MAX_PER_SERVER = 1_000
"""Most conversations counted for one server (~165 bytes each, measured: 165 KB at the bound).
More than a llama-server serves in `WINDOW`: slots times the turns a slot ends in 10 s."""


class RecentConversations:
    """Per server, the conversations that had a turn there lately, by their last turn."""

    def __init__(self, *, window: float = WINDOW, max_per_server: int = MAX_PER_SERVER) -> None:
        self.window = window
        self.max_per_server = max_per_server
        self._servers: dict[str, OrderedDict[int, float]] = {}
        self._swept = 0.0

    def __len__(self) -> int:
        """The servers with conversations kept (some may have expired since the last sweep)."""
        return len(self._servers)

    def saw(self, server: str, conversation: int, now: float) -> None:
        """A turn of `conversation` went to `server` at `now`."""
        if now - self._swept > self.window:
            self._sweep(now)
        seen = self._servers.setdefault(server, OrderedDict())
        seen[conversation] = now
        seen.move_to_end(conversation)
        self._expire(seen, now)
        while len(seen) > self.max_per_server:
            seen.popitem(last=False)

    def count(self, server: str, now: float) -> int:
        """The conversations that had a turn on `server` in the last `window` seconds."""
        seen = self._servers.get(server)
        if not seen:
            return 0
        self._expire(seen, now)
        return len(seen)

    def _sweep(self, now: float) -> None:
        """Forget the servers whose newest turn is older than the window (or that have none
        left: `count` expires them one by one)."""
        self._swept = now
        oldest = now - self.window
        for server in [
            s
            for s, seen in self._servers.items()
            if not seen or next(reversed(seen.values())) < oldest
        ]:
            del self._servers[server]

    def _expire(self, seen: OrderedDict[int, float], now: float) -> None:
        oldest = now - self.window
        while seen and next(iter(seen.values())) < oldest:
            seen.popitem(last=False)
