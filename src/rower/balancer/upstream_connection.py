"""One connection to a llama-server, read and relayed at the protocol level.

Through aiohttp's client and server, every token of a stream cost a parser callback, a stream
reader woken, the handler task resumed, a chunk re-encoded and two coroutines, and every small
request the client's whole request machinery (docs/performance.md). Here the connection is an
`asyncio.Protocol`: the request goes out as one write of bytes the proxy built, the answer's
head is parsed by `upstream_framing`, and a body that is relayed (a stream) is written to the
client's transport from `data_received`, in the same callback: no task wakes per token.
llama-server's chunks go out as they came to an HTTP/1.1 client (`ChunkedBody` checks them and
finds the end), so nothing is re-encoded; an HTTP/1.0 client gets the chunks' data.

The handler owns the exchange: it sends the request (`send`), waits for the head (`head`), then
either reads a short body whole (`whole`) or sends the head of the client's answer and waits
in `relay` until the answer ended, the upstream failed (`UpstreamCut`), or the client left
(`ClientLeft`, or the handler is cancelled: it then closes the connection). Back-pressure: when
the client's transport buffers more than `HIGH_WATER`, reading from llama-server pauses, and the
handler resumes it once the client's transport has drained. Which connections are kept for another
request is `upstream_client`'s business; this one says whether it may be (`reusable`).
"""

from __future__ import annotations

import asyncio
import functools
import socket
from collections import deque
from typing import Protocol, cast

from rower.addresses import Address
from rower.balancer import stream_pacing
from rower.balancer.answer_timings import STREAM_TAIL_READS
from rower.balancer.upstream_framing import (
    AnswerHead,
    BadAnswer,
    ChunkedBody,
    Framing,
    head_end,
    parse_head,
)

CONNECT_SECONDS = 5.0
"""Longest wait for llama-server to accept a connection."""

HIGH_WATER = 64 * 1024
"""Bytes the client's transport may buffer before reading from llama-server pauses."""


class Drainable(Protocol):
    """What waits until the client's transport takes more (`ClientRequest.drain`)."""

    async def drain(self) -> None:
        """Return once the client's transport buffers less."""


class ClientLeft(Exception):
    """The client's connection closed while its answer was being written."""


class UpstreamCut(Exception):
    """llama-server failed, or sent a malformed body, after its head was in."""


class NothingAnswered(ConnectionResetError):
    """The connection closed before any byte of the answer: the server never read the request
    if the connection was a kept-alive one it had closed (`upstream_client` retries then)."""


async def connect(upstream: str) -> UpstreamConnection:
    """A new connection to `upstream` (HOST:PORT).

    Raises:
        ConnectionRefusedError: nothing listens there (nothing was sent: safe to try elsewhere).
        OSError, TimeoutError: it could not be reached.
    """
    address = _address(upstream)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_SECONDS):
        _, connection = await loop.create_connection(UpstreamConnection, address.host, address.port)
    return connection


@functools.lru_cache(maxsize=4096)
def _address(upstream: str) -> Address:
    # Parsed once per server, not once per request (it showed in the per-request profile).
    return Address.parse(upstream)


class UpstreamConnection(asyncio.Protocol):
    """A connection to llama-server carrying one request at a time.

    Attributes:
        payload_bytes: body bytes of the current answer relayed or read (without framing).
        tail: the last reads relayed, for the final event's `timings`.
        idle_since: when its last answer ended (`loop.time()`), for the pool.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._wake: asyncio.Future[None] | None = None
        self._lost = False
        self._lost_with: Exception | None = None
        self.idle_since = 0.0
        self._start(head_request=False, closing=True)

    def _start(self, *, head_request: bool, closing: bool) -> None:
        """State for one exchange."""
        self._buffer = bytearray()
        self._head: asyncio.Future[AnswerHead] = self._loop.create_future()
        self._head_request = head_request
        self._closing = closing
        self._answer: AnswerHead | None = None
        self._answered_any = False
        self._chunks: ChunkedBody | None = None
        self._left = 0
        self._pending = bytearray()
        self._client: asyncio.Transport | None = None
        self._framed = True
        self._paused = False
        self._done = False
        self._error: Exception | None = None
        self._pacer: stream_pacing.Pacer | None = None
        self._socket: socket.socket | None = None
        self.payload_bytes = 0
        self.tail: deque[bytes] = deque(maxlen=STREAM_TAIL_READS)

    # The handler's side.

    def send(self, request: bytes, *, head_request: bool = False, closing: bool = False) -> None:
        """Write a request (head and body); `head_request`: a HEAD, answered without a body;
        `closing`: it says `Connection: close`."""
        self._start(head_request=head_request, closing=closing)
        if self._transport is None:
            self._head_failed(NothingAnswered("the connection was closed"))
            return
        self._transport.write(request)

    @property
    def is_idle_and_open(self) -> bool:
        """Whether it can carry a new request: open, and nothing arrived since its answer."""
        return not self._lost and self._done and not self._pending and self._error is None

    @property
    def reusable(self) -> bool:
        """Whether its answer was framed by its length, read to its end and nothing more, and
        neither side said the connection closes after it."""
        answer = self._answer
        return (
            self.is_idle_and_open
            and answer is not None
            and answer.framing in (Framing.LENGTH, Framing.EMPTY)
            and not answer.closes
            and not self._closing
        )

    async def head(self) -> AnswerHead:
        """The answer's head, once it is in (interim 1xx answers skipped).

        Raises:
            BadAnswer: the head is malformed.
            NothingAnswered: the connection closed before any byte of the answer.
            ConnectionError: it closed in the middle of the head.
        """
        # Not shielded: a handler cancelled here cancels the future, and the protocol's side
        # then leaves it alone (`_head_failed`, `_read_head`).
        return await self._head

    async def whole(self) -> bytes:
        """The whole body of an answer framed by its length (or without a body).

        Raises:
            UpstreamCut: the connection closed before the body's end.
        """
        answer = self._answer
        assert answer is not None
        length = answer.length if answer.framing is Framing.LENGTH else 0
        while len(self._pending) < length and not self._lost:
            await self._wait()
        if len(self._pending) < length:
            raise UpstreamCut(str(self._lost_with or "closed before the end of the answer"))
        body = bytes(self._pending[:length])
        del self._pending[:length]
        self.payload_bytes = length
        self._done = True
        self.idle_since = self._loop.time()
        return body

    async def relay(
        self,
        client: asyncio.Transport,
        writer: Drainable,
        *,
        chunked: bool,
        pacer: stream_pacing.Pacer | None = None,
    ) -> None:
        """Pass the body to `client` until the answer ends: as chunks when the client's answer
        is `chunked` (llama-server's own, when it sent chunks), else as bare data.

        `pacer`: read from llama-server at most once per its interval, so the tokens that come
        meanwhile go to the client in one write (`stream_pacing`; None: every read as it comes).

        `writer` is waited on when the client reads slower than llama-server writes (the
        client's request, `ClientRequest.drain`). Raises `UpstreamCut` or `ClientLeft`.
        """
        self._client, self._framed = client, chunked
        if pacer is not None and self._transport is not None:
            self._pacer, self._socket = pacer, self._transport.get_extra_info("socket")
        if self._answer is not None and self._answer.framing is Framing.CHUNKED:
            self._chunks = ChunkedBody(dechunk=not chunked)
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._forward(data)
        if self._lost:
            self._closed(self._lost_with)
        while not self._done:
            await self._wait()
            if self._paused and not self._done:
                try:
                    await writer.drain()
                except ConnectionError as error:
                    raise ClientLeft(str(error) or type(error).__name__) from error
                self._paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
        self._client = None
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Close the connection."""
        if self._transport is not None:
            self._transport.close()

    async def _wait(self) -> None:
        self._wake = self._loop.create_future()
        try:
            await self._wake
        finally:
            self._wake = None

    def _wake_handler(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    # The connection's side (asyncio.Protocol).

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A TCP connection's transport (uvloop's does not subclass asyncio.Transport).
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._answered_any = True
        if self._answer is None:
            self._read_head(data)
        elif self._client is not None:
            if not self._done:
                self._forward(data)
        else:
            # The handler is preparing the client's answer or reading a short body whole (or,
            # on an idle connection, the server sent what nobody asked for: never reused).
            self._pending += data
            self._wake_handler()

    def connection_lost(self, exc: Exception | None) -> None:
        self._unpace()
        self._transport = None
        self._lost, self._lost_with = True, exc
        if not self._head.done():
            if self._answered_any:
                self._head_failed(exc or ConnectionResetError("closed in the answer's head"))
            else:
                self._head_failed(NothingAnswered(str(exc) if exc else "closed unanswered"))
        elif self._client is not None:
            self._closed(exc)
        else:
            self._wake_handler()

    def _head_failed(self, error: Exception) -> None:
        if self._head.done():
            return  # the handler was cancelled while it waited
        self._head.set_exception(error)
        self._head.exception()  # retrieved: the handler may have gone already

    def _read_head(self, data: bytes) -> None:
        self._buffer += data
        try:
            while (end := head_end(self._buffer)) >= 0:
                answer = parse_head(bytes(self._buffer[:end]))
                del self._buffer[:end]
                if not 100 <= answer.status < 200:
                    break
            else:
                return
        except BadAnswer as error:
            self._head_failed(error)
            self.close()
            return
        if self._head_request:
            answer = answer.without_body()
        self._answer = answer
        self._left = answer.length
        self._pending, self._buffer = self._buffer, bytearray()
        if not self._head.done():
            self._head.set_result(answer)

    def _forward(self, data: bytes) -> None:
        client = self._client
        assert client is not None
        if client.is_closing():
            self._fail(ClientLeft("the client's connection is closing"))
            return
        if self._chunks is not None:
            try:
                out = self._chunks.feed(data)
            except BadAnswer as error:
                self._fail(UpstreamCut(f"bad chunked body: {error}"))
                return
            self.payload_bytes = self._chunks.payload_bytes
            if out:
                client.write(out)
                self.tail.append(out)
            if self._chunks.ended:
                self._finish()
                return
        else:
            if self._answer is not None and self._answer.framing is Framing.LENGTH:
                data = data[: self._left]
                self._left -= len(data)
            if data:
                client.write(b"%x\r\n%b\r\n" % (len(data), data) if self._framed else data)
                self.payload_bytes += len(data)
                self.tail.append(data)
            framing = self._answer.framing if self._answer is not None else Framing.CLOSE
            if framing is not Framing.CLOSE and not self._left:
                self._finish()
                return
        if client.get_write_buffer_size() > HIGH_WATER and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
            self._wake_handler()
        # Let the next tokens wait in the kernel until the pacer's next tick.
        if (
            self._pacer is not None
            and self._socket is not None
            and not self._pacer.hold(self._socket)
        ):
            self._pacer = None  # closing: read as it comes

    def _closed(self, exc: Exception | None) -> None:
        if self._done:
            return
        answer = self._answer
        if exc is None and answer is not None and answer.framing is Framing.CLOSE:
            self._finish()
        else:
            self._fail(UpstreamCut(str(exc) if exc else "closed before the end of the answer"))

    def _finish(self) -> None:
        # A relayed answer's connection is never reused: close it now, not at the pool.
        self._unpace()
        self._done = True
        self.close()
        self._wake_handler()

    def _unpace(self) -> None:
        if self._pacer is not None and self._socket is not None:
            self._pacer.forget(self._socket)
        self._pacer = self._socket = None

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._finish()
