"""The public listener's HTTP/1.1 server: one `asyncio.Protocol` per client connection.

aiohttp's server kept 9.4 KB per waiting request (its protocol, parsed message, request and
payload stream) and most of the Python time of a small proxied request (docs/performance.md).
Here a connection is this protocol and a request a `ClientRequest` (`client_request`): the
head is parsed by `request_head` (sans-I/O), the body is collected as it arrives, and the
handler (the proxy) writes its answer as bytes to the transport, or relays llama-server's
straight to it.

What a connection lives by (the listener's `ListenerLimits`, as `http_limits` does it for the
management listener on aiohttp):

- one request at a time: bytes after a request's body (pipelining) wait in the buffer, and
  reading pauses while they pile up; the next head is read once the answer is out;
- a request head must be complete within `header_timeout` of its first byte (else 408), a
  connection with no request under way is closed after `idle_timeout` (also one that never
  sends a byte), the body's deadline is the handler's (`ClientRequest.read_body`);
- a head that is malformed or too large (`request_head`), or that a proxy must not pass on
  (`request_framing`), is answered 400, 405, 431, 501 or 505 and the connection closed;
- at most `max_connections` at once: one more is answered 503 and closed, its request unread;
- a client that leaves cancels its handler (the proxy counts it as a client that left);
- an answer that leaves part of the request body unread closes the connection after the rest
  is read and dropped, for `LINGER` seconds at most (so the client reads an answer, not a
  reset).

Every refusal is one rate-limited warning line and a count in `ListenerStats`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import cast

from rower.balancer.client_request import ClientRequest
from rower.balancer.http_limits import (
    LINGER,
    OVER_CAPACITY_LINGER,
    ListenerLimits,
    ListenerStats,
    raw_answer,
    refuse_over_capacity,
    refuse_slow_head,
)
from rower.balancer.request_framing import refusal
from rower.balancer.request_head import HeadRefused, head_end, parse_head
from rower.llamacpp import error_body
from rower.logs import log_throttled

log = logging.getLogger(__name__)

PIPELINE_BYTES = 64 * 1024
"""Bytes of requests sent ahead (pipelined) kept before reading from the client pauses."""

Handler = Callable[[ClientRequest], Awaitable[None]]


class ClientConnection(asyncio.Protocol):
    """One client connection to the public listener (see the module docstring)."""

    __slots__ = (
        "_buffer",
        "_drain",
        "_head_timed",
        "_lingering",
        "_listener",
        "_loop",
        "_remote",
        "_request",
        "_task",
        "_timer",
        "_writing_paused",
        "admitted",
        "transport",
    )

    def __init__(self, listener: ClientListener) -> None:
        self._listener = listener
        # Looked up once: on Python 3.11 each `get_running_loop()` is a `getpid` system call.
        self._loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.admitted = False
        self._buffer = bytearray()
        self._request: ClientRequest | None = None
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._lingering = False
        self._head_timed = False
        self._writing_paused = False
        self._drain: asyncio.Future[None] | None = None
        self._remote: str | None = None

    @property
    def busy(self) -> bool:
        """Whether a request is being handled."""
        return self._task is not None

    @property
    def handler(self) -> asyncio.Task[None] | None:
        """The task handling the current request, if any."""
        return self._task

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP transport (uvloop's does not subclass asyncio.Transport).
        self.transport = cast(asyncio.Transport, transport)
        listener = self._listener
        stats, limits = listener.stats, listener.limits
        if stats.connections >= limits.max_connections:
            self._over_capacity()
            return
        stats.connections += 1
        self.admitted = True
        listener.connections.add(self)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple) and peer else None
        self._set_timer(limits.idle_timeout, self._idle_expired)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._cancel_timer()
        if self.admitted:
            self.admitted = False
            self._listener.stats.connections -= 1
            self._listener.connections.discard(self)
        if self._task is not None:
            # The client left: its handler is cancelled (the proxy counts it as such).
            self._task.cancel()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("the client closed the connection"))
            self._drain.exception()

    def data_received(self, data: bytes) -> None:
        if self._lingering or not self.admitted:
            self._drop(data)
            return
        request = self._request
        if request is not None and not request.body_complete and not request.body_failed:
            data = request.feed_body(data, self._listener.max_body_bytes)
            if not data:
                return
        self._buffer += data
        if request is not None:
            if len(self._buffer) > PIPELINE_BYTES and self.transport is not None:
                self.transport.pause_reading()
            return
        self._read_head()

    def eof_received(self) -> bool | None:
        # A client that half-closes is treated as gone (as aiohttp's server does).
        return None

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)

    async def drain(self) -> None:
        """Return once the transport's buffer is below its high-water mark."""
        if self.transport is None:
            raise ConnectionResetError("the client closed the connection")
        if not self._writing_paused:
            return
        self._drain = self._loop.create_future()
        try:
            await self._drain
        finally:
            self._drain = None

    # Reading requests.

    def _read_head(self) -> None:
        buffer = self._buffer
        while buffer[:2] == b"\r\n":
            # Empty lines before a request line are tolerated (RFC 9112 section 2.2).
            del buffer[:2]
        if not buffer:
            return
        limits = self._listener.limits
        try:
            end = head_end(buffer, limits.max_header_bytes)
            if end < 0:
                if not self._head_timed:
                    # From the head's first byte; the idle deadline is over. (A head that
                    # arrives whole sets no timer: most do.)
                    self._head_timed = True
                    self._set_timer(limits.header_timeout, self._head_expired)
                return
            head = parse_head(bytes(buffer[:end]), limits.max_header_bytes)
        except HeadRefused as refused:
            self._refuse(refused.status, refused.message, refused.reason)
            return
        del buffer[:end]
        # The head or idle deadline is over. (A waiting request keeps no timer of its own
        # connection: 0.5 KB each.)
        self._cancel_timer()
        self._head_timed = False
        framing = refusal(
            head.method,
            head.version,
            head.target,
            head.headers.items(),
        )
        if framing is not None:
            error_type = None if framing.status == 501 else "invalid_request_error"
            self._refuse(framing.status, framing.message, "framing", error_type=error_type)
            return
        request = ClientRequest(self, head, self._remote)
        self._request = request
        if buffer:
            pending, self._buffer = bytes(buffer), bytearray()
            rest = request.feed_body(pending, self._listener.max_body_bytes)
            self._buffer += rest
        self._task = self._loop.create_task(self._serve(request))

    async def _serve(self, request: ClientRequest) -> None:
        try:
            await self._listener.handler(request)
        except asyncio.CancelledError:
            self._task = None
            self._close()
            raise
        except Exception:
            log_throttled(
                log,
                logging.ERROR,
                f"{self._listener.limits.name} unexpected error",
                "unexpected error answering a request from %s on the %s listener",
                request.remote,
                self._listener.limits.name,
                exc_info=True,
            )
            if not request.answered:
                message = "Internal error in the balancer; its log has the details"
                request.respond(500, _JSON, error_body(500, message), close=True)
            else:
                request.abort()
        self._task = None
        self._finished(request)

    def _finished(self, request: ClientRequest) -> None:
        """The answer is out: read the next request, or close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if not request.answered:
            request.abort()
            return
        if request.body_failed:
            self._linger(LINGER, write_eof=True)
            return
        if not request.body_complete:
            # The rest of the body is still coming: read and drop it for a moment, then close.
            self._linger(LINGER, write_eof=False)
            return
        if request.closes:
            self._close()
            return
        self._request = None
        transport.resume_reading()
        self._set_timer(self._listener.limits.idle_timeout, self._idle_expired)
        if self._buffer:
            self._read_head()

    # Deadlines and refusals.

    def _idle_expired(self) -> None:
        self._timer = None
        if not self.busy:
            self._close()

    def _head_expired(self) -> None:
        self._timer = None
        if self.busy or self.transport is None:
            return
        listener = self._listener
        self._answer_raw(refuse_slow_head(listener.limits, listener.stats, self._remote or "?"))

    def _refuse(
        self,
        status: int,
        message: str,
        reason: str,
        *,
        error_type: str | None = "invalid_request_error",
    ) -> None:
        listener = self._listener
        listener.stats.refused[reason] += 1
        log_throttled(
            log,
            logging.WARNING,
            f"{listener.limits.name} {reason}",
            "refused a request from %s on the %s listener: %s",
            self._remote or "?",
            listener.limits.name,
            message,
        )
        self._answer_raw(raw_answer(status, error_body(status, message, error_type)))

    def _over_capacity(self) -> None:
        listener = self._listener
        self._answer_raw(
            refuse_over_capacity(listener.limits, listener.stats), linger=OVER_CAPACITY_LINGER
        )

    def _answer_raw(self, answer: bytes, *, linger: float = LINGER) -> None:
        """A whole HTTP/1.1 answer (`http_limits.raw_answer`), for when no request is being
        handled; then the connection closes (after `linger`, so that what the client still
        sends does not reset it)."""
        transport = self.transport
        if transport is None:
            return
        transport.write(answer)
        self._linger(linger, write_eof=True)

    def _linger(self, seconds: float, *, write_eof: bool) -> None:
        transport = self.transport
        if transport is None:
            return
        self._lingering = True
        self._buffer = bytearray()
        if write_eof and transport.can_write_eof():
            transport.write_eof()
        transport.resume_reading()
        self._set_timer(seconds, self._close)

    def _drop(self, data: bytes) -> None:
        request = self._request
        if self._lingering and request is not None and not request.body_complete:
            if not request.body_failed:
                request.feed_body(data, 0)
            if request.body_complete:
                # The rest of the body is in: nothing more to wait for.
                self._close()

    def _close(self) -> None:
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    def _set_timer(self, seconds: float, then: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer = self._loop.call_later(seconds, then)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def close_if_idle(self) -> bool:
        """Close the connection if no request is being handled; whether it was closed."""
        if self.busy:
            return False
        self._close()
        return True


_JSON = (("Content-Type", "application/json; charset=utf-8"),)


class ClientListener:
    """The public listener: a `ClientConnection` per accepted connection, served by `handler`.

    Args:
        handler: serves one request (it writes the answer with `ClientRequest`'s methods).
        limits: what the listener allows a connection.
        stats: where it counts connections and refusals.
        max_body_bytes: the most request body bytes kept per request (more is dropped and
            the handler's `read_body` says it is too large).
    """

    def __init__(
        self,
        handler: Handler,
        *,
        limits: ListenerLimits,
        stats: ListenerStats,
        max_body_bytes: int,
    ) -> None:
        self.handler = handler
        self.limits = limits
        self.stats = stats
        self.max_body_bytes = max_body_bytes
        self.connections: set[ClientConnection] = set()
        self._server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, *, backlog: int) -> None:
        """Listen on `host`:`port`."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: ClientConnection(self), host, port, reuse_address=True, backlog=backlog
        )

    def stop_listening(self) -> None:
        """Accept no new connections; those open are served on."""
        if self._server is not None:
            self._server.close()

    async def close(self, grace: float) -> None:
        """Stop listening, close idle connections, give requests under way `grace` seconds,
        then cut them."""
        self.stop_listening()
        busy = [c for c in list(self.connections) if not c.close_if_idle()]
        handlers = [c.handler for c in busy if c.handler is not None]
        if handlers:
            await asyncio.wait(handlers, timeout=grace)
        for connection in busy:
            if connection.transport is not None:
                connection.transport.close()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None
