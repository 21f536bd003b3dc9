"""How the proxy talks to llama-servers: kept-alive connections, where reusing one is safe.

llama-server (build 11434) says `Keep-Alive: timeout=5, max=100` but closes the connection
after every streamed answer, and closes a connection idle for 5 s. A pool that reuses either
kind sends a request on a connection the server has closed, and the request fails with "Server
disconnected" (about 1 request in 40 in mixed benchmarks). A new connection per request avoids
that at ~1 ms per request. So:

- a connection goes back to the pool only after an answer framed by its `Content-Length` (or
  without a body), read to its end, on which neither side said `Connection: close`
  (`UpstreamConnection.reusable`); a request that asks for a stream says `Connection: close`
  and gets a connection of its own, closed when its answer ends;
- pooled connections expire after `KEEPALIVE_SECONDS` idle, well before the server's 5 s;
- if a reused connection closes before any byte of the answer arrived (`NothingAnswered`),
  the server never read the request: it is sent again, once, on a new connection to the same
  server. The caller's slot is untouched by this: the request is still on the slot it was
  dispatched to, released once when it ends.

The connections are `upstream_connection.UpstreamConnection`s (a protocol, not aiohttp's
client: docs/performance.md). No total timeout (a generation may run for minutes), no pool
limit (the slot count is the limit), bytes pass through as the server sent them.
"""

from __future__ import annotations

import asyncio
from collections import deque

import msgspec

from rower.balancer.upstream_connection import NothingAnswered, UpstreamConnection, connect
from rower.balancer.upstream_framing import AnswerHead

KEEPALIVE_SECONDS = 2.0
"""Longest idle time of a pooled connection: llama-server closes them at 5 s, and a connection
expired here 3 s early cannot race with the server's close."""


class UpstreamAnswer(msgspec.Struct, frozen=True):
    """An upstream's answer (head read), and how the connection for it was got.

    Attributes:
        connection: the connection; the body is still to be read from it. Hand it back with
            `UpstreamClient.release` when done.
        head: the answer's status and headers.
        reused: whether it came on a kept-alive connection (not after a retry).
        retried: whether a reused connection failed first and it was sent again on a new one.
    """

    connection: UpstreamConnection
    head: AnswerHead
    reused: bool
    retried: bool


class UpstreamClient:
    """The proxy's connections to llama-servers: a pool per server, and new ones for retries."""

    def __init__(self) -> None:
        self._idle: dict[str, deque[UpstreamConnection]] = {}
        self._sweep: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (on Python 3.11 each `get_running_loop()` is a
        `getpid` system call)."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    async def request(
        self, upstream: str, request: bytes, *, head_request: bool, closing: bool
    ) -> UpstreamAnswer:
        """Send one request (head and body, as bytes) to `upstream` (HOST:PORT); returns once
        the answer's head is in.

        `closing`: the request says `Connection: close` (it asks for a stream); it never takes
        a pooled connection. Raises what `connect` and `UpstreamConnection.head` raise, on a new
        connection or on the retry.
        """
        pooled = None if closing else self._take(upstream)
        if pooled is not None:
            pooled.send(request, head_request=head_request)
            try:
                return UpstreamAnswer(pooled, await pooled.head(), reused=True, retried=False)
            except NothingAnswered:
                # The server closed the kept-alive connection as the request went out: it never
                # read it. Once more, on a connection of its own.
                pooled.close()
            except BaseException:
                pooled.close()
                raise
        fresh = await connect(upstream)
        try:
            fresh.send(request, head_request=head_request, closing=closing)
            head = await fresh.head()
        except BaseException:
            fresh.close()
            raise
        return UpstreamAnswer(fresh, head, reused=False, retried=pooled is not None)

    def release(self, upstream: str, connection: UpstreamConnection) -> None:
        """Done with `connection`: pooled if `reusable`, else closed."""
        if connection.reusable:
            self._idle.setdefault(upstream, deque()).append(connection)
            if self._sweep is None:
                self._sweep = self.loop.call_later(KEEPALIVE_SECONDS, self._sweep_idle)
        else:
            connection.close()

    def _take(self, upstream: str) -> UpstreamConnection | None:
        """The most recently used idle connection to `upstream`; expired ones are closed."""
        idle = self._idle.get(upstream)
        if not idle:
            return None
        oldest = self.loop.time() - KEEPALIVE_SECONDS
        taken = None
        while idle and taken is None:
            connection = idle.pop()
            if connection.is_idle_and_open and connection.idle_since > oldest:
                taken = connection
            else:
                connection.close()
        self._expire(upstream, oldest)
        return taken

    def _expire(self, upstream: str, oldest: float) -> None:
        """Close the connections idle since before `oldest`: the first ones, as they were
        released in order."""
        idle = self._idle[upstream]
        while idle and idle[0].idle_since <= oldest:
            idle.popleft().close()
        if not idle:
            del self._idle[upstream]

    def _sweep_idle(self) -> None:
        """Close what expired or was closed, also to servers no request goes to any more."""
        self._sweep = None
        oldest = self.loop.time() - KEEPALIVE_SECONDS
        for upstream, idle in list(self._idle.items()):
            for connection in [c for c in idle if not c.is_idle_and_open]:
                idle.remove(connection)
                connection.close()
            if idle:
                self._expire(upstream, oldest)
            else:
                del self._idle[upstream]
        if self._idle:
            self._sweep = self.loop.call_later(KEEPALIVE_SECONDS, self._sweep_idle)

    async def close(self) -> None:
        """Close every idle connection."""
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        for idle in self._idle.values():
            for connection in idle:
                connection.close()
        self._idle.clear()
