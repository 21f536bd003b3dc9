"""A streamed answer relayed at the protocol level: llama-server's socket to the client's.

llama-server writes one small chunk per generated token. Read through aiohttp's client and
written through its server response, every token costs a parser callback, a stream reader
woken, the handler task resumed, a chunk re-encoded and two coroutines: most of the balancer's
CPU per event once the system calls are paid. Here the upstream connection is an
`asyncio.Protocol` whose `data_received` writes the bytes straight to the client's transport, in
the same callback: no task wakes per token. llama-server's chunks go out as they came
(`upstream_framing.ChunkedBody` checks them and finds the end), so nothing is re-encoded.

The handler still owns the exchange: it sends the request (`open_stream`), waits for the head
(`UpstreamStream.head`), prepares the client's answer with aiohttp, then waits in
`UpstreamStream.relay` until the answer ended, the upstream failed (`UpstreamCut`), or the client
left (`ClientLeft`, or the handler is cancelled: it then closes the upstream connection, as
leaving aiohttp's `async with` did). Back-pressure: when the client's transport buffers more
than `HIGH_WATER`, reading from llama-server pauses, and the handler resumes it once aiohttp's
writer has drained.

A streamed request always gets a connection of its own, with `Connection: close`:
llama-server closes the connection after a stream anyway (`upstream_client`), so there is no
kept-alive connection to reuse or retry on.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import cast

from aiohttp.abc import AbstractStreamWriter
from multidict import CIMultiDict

from rower.addresses import Address
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
"""Longest wait for llama-server to accept the connection (as `upstream_client`'s)."""

HIGH_WATER = 64 * 1024
"""Bytes the client's transport may buffer before reading from llama-server pauses."""


class ClientLeft(Exception):
    """The client's connection closed while its answer was being written."""


class UpstreamCut(Exception):
    """llama-server failed, or sent a malformed body, after its head was relayed."""


def request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    """The request line and headers, as bytes (values as the client sent them)."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")


async def open_stream(upstream: str, request: bytes) -> UpstreamStream:
    """Connect to `upstream` (HOST:PORT) and send `request` (head and body) on it.

    Raises:
        ConnectionRefusedError: nothing listens there (nothing was sent: safe to try elsewhere).
        OSError, TimeoutError: it could not be reached.
    """
    address = Address.parse(upstream)
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(CONNECT_SECONDS):
        _, stream = await loop.create_connection(UpstreamStream, address.host, address.port)
    stream.send(request)
    return stream


class UpstreamStream(asyncio.Protocol):
    """One request's connection to llama-server, from the head of its answer to the end.

    Attributes:
        payload_bytes: body bytes relayed (without the chunked framing).
        tail: the last reads relayed, for the final event's `timings`.
    """

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: asyncio.Future[AnswerHead] = self._loop.create_future()
        self._answer: AnswerHead | None = None
        self._chunks: ChunkedBody | None = None
        self._left = 0
        self._pending = bytearray()
        self._client: asyncio.Transport | None = None
        self._wake: asyncio.Future[None] | None = None
        self._paused = False
        self._done = False
        self._error: Exception | None = None
        self._lost = False
        self._lost_with: Exception | None = None
        self.payload_bytes = 0
        self.tail: deque[bytes] = deque(maxlen=STREAM_TAIL_READS)

    # The handler's side.

    def send(self, data: bytes) -> None:
        """Write the request."""
        assert self._transport is not None
        self._transport.write(data)

    async def head(self) -> AnswerHead:
        """The answer's head, once it is in.

        Raises:
            BadAnswer: the head is malformed.
            ConnectionError: the connection closed before a whole head.
        """
        return await asyncio.shield(self._head)

    async def whole(self) -> bytes:
        """The whole body of an answer framed by its length (or without a body).

        Raises:
            UpstreamCut: the connection closed before the body's end.
        """
        answer = self._answer
        assert answer is not None
        assert answer.framing in (Framing.LENGTH, Framing.EMPTY)
        length = answer.length if answer.framing is Framing.LENGTH else 0
        while len(self._pending) < length and not self._lost:
            await self._wait()
        if len(self._pending) < length:
            raise UpstreamCut(str(self._lost_with or "closed before the end of the answer"))
        body = bytes(self._pending[:length])
        self.payload_bytes = length
        self._done = True
        return body

    async def relay(self, client: asyncio.Transport, writer: AbstractStreamWriter) -> None:
        """Pass the body to `client` as chunks until the answer ends.

        `writer` is aiohttp's writer of the client's answer: waited on when the client reads
        slower than llama-server writes. Raises `UpstreamCut` or `ClientLeft`.
        """
        self._client = client
        if self._pending:
            data, self._pending = bytes(self._pending), bytearray()
            self._forward(data)
        if self._lost:
            self._closed(self._lost_with)
        while not self._done:
            await self._wait()
            if self._paused and not self._done:
                await writer.drain()
                self._paused = False
                if self._transport is not None:
                    self._transport.resume_reading()
        if self._error is not None:
            raise self._error

    def close(self) -> None:
        """Close the connection (an answer not relayed to its end is never reused)."""
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
        if self._answer is None:
            self._read_head(data)
        elif self._client is None:
            # The handler is preparing the client's answer (or reading a short body whole).
            self._pending += data
            self._wake_handler()
        elif not self._done:
            self._forward(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._lost, self._lost_with = True, exc
        if not self._head.done():
            self._head_failed(
                exc or ConnectionResetError("llama-server closed the connection before answering")
            )
        elif self._client is not None:
            self._closed(exc)
        else:
            self._wake_handler()

    def _head_failed(self, error: Exception) -> None:
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
        self._answer = answer
        if answer.framing is Framing.CHUNKED:
            self._chunks = ChunkedBody()
        self._left = answer.length
        self._pending, self._buffer = self._buffer, bytearray()
        self._head.set_result(answer)

    def _forward(self, data: bytes) -> None:
        client = self._client
        assert client is not None
        assert self._answer is not None
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
            if self._answer.framing is Framing.LENGTH:
                data = data[: self._left]
                self._left -= len(data)
            if data:
                client.write(b"%x\r\n%b\r\n" % (len(data), data))
                self.payload_bytes += len(data)
                self.tail.append(data)
            if self._answer.framing is Framing.LENGTH and not self._left:
                self._finish()
                return
        if client.get_write_buffer_size() > HIGH_WATER and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True
            self._wake_handler()

    def _closed(self, exc: Exception | None) -> None:
        if self._done:
            return
        answer = self._answer
        if exc is None and answer is not None and answer.framing is Framing.CLOSE:
            self._finish()
        else:
            self._fail(UpstreamCut(str(exc) if exc else "closed before the end of the answer"))

    def _finish(self) -> None:
        self._done = True
        self.close()
        self._wake_handler()

    def _fail(self, error: Exception) -> None:
        self._error = error
        self._finish()
