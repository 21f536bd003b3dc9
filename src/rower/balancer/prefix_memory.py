"""The fleet's memory of prefixes: which conversation heads this balancer sent to which server.

Per llama-server (by address), a bounded LRU of affinity keys (`affinity.chain`). Not every
block of every request is remembered: a request's chain ends in its *leaf* (its last whole
block), and the next turn of the same conversation contains that leaf at the same position, so
the leaf alone finds it. A leaf that a longer leaf of the same conversation on the same server
extends is dropped: the server's cache holds the prefix once. So a conversation costs one entry
on each server it went to, whatever its length (~285 bytes: 100,000 conversations in 27 MiB,
tests/unit/balancer/test_prefix_memory.py).

Nothing is kept for a system prompt that conversations share: a new conversation must go where
the load says, not to the server that last got the same system prompt (every new conversation
would pile onto it, and there evict each other from its slots; llama-server reuses a shared
system prompt in whichever slot has it anyway).

What a server can hold bounds its LRU: `capacity_blocks` (its slots' context plus what its
host-RAM prompt cache keeps, an estimate given by the caller), counted in the blocks of the leaves
it remembers. A global bound on entries caps the memory of the whole fleet: each server gets an
equal share of it.

What is forgotten for want of room (or because the server restarted) is no longer believed
held, but where it went is kept (`last_server`, bounded by the same number of entries, ~105
bytes each, tests/unit/balancer/test_prefix_memory.py): a conversation goes back to the server
it lives on even when that server no longer holds its prefix, so each server keeps its own set
of conversations instead of trading them (the anchor's strength: a session hash never moves a
conversation).

`holder` answers "where did this prefix go last": one dict from block hash to address, so a
lookup costs one dict access per block of the request, however large the fleet.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

from rower.balancer.affinity import Chain

DEFAULT_MAX_ENTRIES = 200_000
"""Entries in the whole fleet's memory: 200,000 conversations, ~55 MB (~285 bytes an entry)."""


@dataclass(frozen=True, slots=True)
class Placement:
    """`prefix` was sent to the llama-server `server` (an upstream's identity): what one
    balancer tells the others (`peer_placements`), so that all remember the same."""

    server: str
    prefix: Chain


@dataclass(slots=True)
class _ServerPrefixes:
    entries: OrderedDict[int, int] = field(default_factory=OrderedDict)
    """Block hash of a leaf -> the blocks it stands for, oldest first."""
    weight: int = 0


class PrefixMemory:
    """What was sent where, bounded per server and in all.

    Args:
        max_entries: most entries over all servers.
    """

    def __init__(self, *, max_entries: int = DEFAULT_MAX_ENTRIES) -> None:
        self.max_entries = max_entries
        self._servers: dict[str, _ServerPrefixes] = {}
        self._holder: dict[int, str] = {}
        self._last_server: OrderedDict[int, str] = OrderedDict()
        """Leaves forgotten for want of room -> where they were: the server is believed not to
        hold them any more, but it is still where the conversation lives (`last_server`)."""

    def __len__(self) -> int:
        return sum(len(server.entries) for server in self._servers.values())

    def matches(self, prefix: Chain) -> Iterator[tuple[str, int]]:
        """Servers that were sent a head of `prefix`: (address, blocks matched), longest first.

        Each address comes once, with its longest match.
        """
        seen: set[str] = set()
        holder = self._holder
        for position in range(len(prefix) - 1, -1, -1):
            address = holder.get(prefix[position])
            if address is not None and address not in seen:
                seen.add(address)
                yield address, position + 1

    def matched(self, address: str, prefix: Chain) -> int:
        """Blocks of `prefix` that `address` was sent (0 when none)."""
        server = self._servers.get(address)
        if server is None:
            return 0
        entries = server.entries
        for position in range(len(prefix) - 1, -1, -1):
            if prefix[position] in entries:
                return position + 1
        return 0

    def last_server(self, prefix: Chain) -> str | None:
        """Where the longest head of `prefix` went, among the leaves forgotten for want of
        room (None when none was)."""
        last = self._last_server
        for position in range(len(prefix) - 1, -1, -1):
            address = last.get(prefix[position])
            if address is not None:
                return address
        return None

    def record(self, address: str, prefix: Chain, *, capacity_blocks: int) -> int:
        """`prefix` was sent to `address`, a server that holds about `capacity_blocks`.

        Returns the blocks of the other conversations sent to `address` since the previous
        turn of this one there (0 if it had none there): were that turn found evicted, the
        server holds no more than those (`Fleet.answered`).
        """
        if not prefix:
            return 0
        server = self._servers.get(address)
        if server is None:
            server = self._servers[address] = _ServerPrefixes()
        entries = server.entries
        newer = 0
        # The conversation's previous turn here (a shorter leaf of this chain, or the same) is
        # now inside this one: keep one of them.
        for position in range(len(prefix) - 1, -1, -1):
            key = prefix[position]
            if key in entries:
                newer = _weight_after(entries, key)
                self._drop(address, server, key)
                break
        self._put(address, server, prefix[-1], len(prefix))
        share = max(1, self.max_entries // len(self._servers))
        while entries and (server.weight > capacity_blocks or len(entries) > share):
            self._forget_for_room(address, server)
        if self._last_server:
            for key in prefix:
                self._last_server.pop(key, None)
        return newer

    def weight(self, address: str) -> int:
        """The blocks the memory says `address` holds."""
        server = self._servers.get(address)
        return server.weight if server is not None else 0

    def trim(self, address: str, capacity_blocks: int) -> None:
        """`address` holds at most `capacity_blocks`: forget its oldest entries beyond."""
        server = self._servers.get(address)
        while server is not None and server.entries and server.weight > capacity_blocks:
            self._forget_for_room(address, server)

    def forget(self, address: str) -> None:
        """The server at `address` restarted, reloaded or changed model: its cache is gone."""
        server = self._servers.pop(address, None)
        if server is None:
            return
        for key in server.entries:
            if self._holder.get(key) == address:
                del self._holder[key]
            # Its conversations still live there: their next turns rebuild its cache.
            self._remember_last(key, address)

    def _put(self, address: str, server: _ServerPrefixes, key: int, weight: int) -> None:
        old = server.entries.pop(key, None)
        if old is not None:
            server.weight -= old
        server.entries[key] = weight
        server.weight += weight
        self._holder[key] = address

    def _forget_for_room(self, address: str, server: _ServerPrefixes) -> None:
        key = next(iter(server.entries))
        self._drop(address, server, key)
        self._remember_last(key, address)

    def _remember_last(self, key: int, address: str) -> None:
        self._last_server[key] = address
        self._last_server.move_to_end(key)
        if len(self._last_server) > self.max_entries:
            self._last_server.popitem(last=False)

    def _drop(self, address: str, server: _ServerPrefixes, key: int) -> None:
        server.weight -= server.entries.pop(key)
        if self._holder.get(key) == address:
            del self._holder[key]


def _weight_after(entries: OrderedDict[int, int], key: int) -> int:
    """The blocks of the entries more recent than `key`'s (a walk from the newest: as many
    steps as conversations were sent to the server since, which its capacity bounds)."""
    weight = 0
    for newer, blocks in reversed(entries.items()):
        if newer == key:
            break
        weight += blocks
    return weight
