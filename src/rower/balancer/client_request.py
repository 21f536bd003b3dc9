"""A request on a client connection of the public listener, as the proxy handler sees it.

`client_connection` parses the head and feeds the body in as it arrives; the handler reads the
body (`read_body`, bounded in size and time, `100 Continue` sent if the client waits for it)
and answers: whole, in one write (`respond`), or as a head (`start`) followed by a body the
upstream's protocol writes to the transport itself, ended by `end` (or cut by `abort`). The
answer's status line takes the request's version (HTTP/1.0 or 1.1) and says `Connection:
close` when the connection will close after it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from http import HTTPStatus
from typing import TYPE_CHECKING
from urllib.parse import unquote

from rower.balancer.request_head import ChunkedBody, HeadRefused, RequestHead

if TYPE_CHECKING:
    from rower.balancer.client_connection import ClientConnection

REASONS = {status.value: status.phrase for status in HTTPStatus}
"""Reason phrases by status."""

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class BodyTooLarge(Exception):
    """The request body is over the limit it was read with."""


class ClientRequest:
    """One request on a client connection, as the handler sees it.

    Attributes:
        head: the parsed head.
        method: the request method.
        target: the target for the upstream: the path and query as sent (an absolute URL's
            scheme and authority dropped).
        path: the target's path, percent-decoded.
        query: the target's query string (after `?`), as sent.
        headers: the header fields.
        remote: the client's address, if known.
        version: `(major, minor)` of the request line.
        answered: whether the head of an answer went out.
    """

    __slots__ = (
        "_body",
        "_body_error",
        "_chunks",
        "_closes",
        "_connection",
        "_received",
        "_waiter",
        "answered",
        "head",
        "headers",
        "method",
        "path",
        "query",
        "remote",
        "target",
        "version",
    )

    def __init__(self, connection: ClientConnection, head: RequestHead, remote: str | None):
        self._connection = connection
        self.head = head
        self.method = head.method
        self.version = head.version
        self.target = _origin_form(head.target)
        path, _, self.query = self.target.partition("?")
        self.path = unquote(path)
        self.headers = head.headers
        self.remote = remote
        self.answered = False
        self._closes = not head.keep_alive
        self._body: list[bytes] = []
        self._received = 0
        self._chunks = ChunkedBody() if head.chunked else None
        self._body_error: HeadRefused | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_length(self) -> int | None:
        """The `Content-Length` the client sent, if any."""
        return self.head.length

    @property
    def body_exists(self) -> bool:
        """Whether the request has a body (of any length, chunked included)."""
        return self.head.has_body

    @property
    def transport(self) -> asyncio.Transport | None:
        """The client's transport, None once the connection is closed."""
        return self._connection.transport

    @property
    def body_complete(self) -> bool:
        """Whether the whole body has arrived."""
        if self._chunks is not None:
            return self._chunks.ended
        return self._received >= (self.head.length or 0)

    async def read_body(self, limit: int, seconds: float) -> bytes:
        """The whole body, within `limit` bytes and `seconds` from now.

        Raises:
            BodyTooLarge: it is (or grew) over `limit`.
            TimeoutError: it did not all arrive in time.
            HeadRefused: a chunked body is malformed.
        """
        if (self.head.length or 0) > limit:
            raise BodyTooLarge
        if not self.body_complete and self.head.expects_continue and self.version >= (1, 1):
            transport = self.transport
            if transport is not None and not self._received:
                transport.write(_CONTINUE)
        # Most bodies arrive with their head: then no deadline is set at all.
        if not self.body_complete and self._body_error is None:
            async with asyncio.timeout(seconds):
                while not self.body_complete and self._body_error is None:
                    if self._received > limit:
                        raise BodyTooLarge
                    self._waiter = asyncio.get_running_loop().create_future()
                    try:
                        await self._waiter
                    finally:
                        self._waiter = None
        if self._body_error is not None:
            raise self._body_error
        if self._received > limit:
            raise BodyTooLarge
        # Kept as one piece, and handed out as it is: a waiting request holds its body once.
        if len(self._body) != 1:
            self._body = [b"".join(self._body)]
        return self._body[0]

    def respond(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        body: bytes,
        *,
        reason: str | None = None,
        close: bool = False,
        length: int | None = None,
    ) -> None:
        """Send a whole answer in one write: `headers` (without framing), then `body` with its
        `Content-Length` (or `length`'s, for a HEAD, whose answer has no body). `close`: the
        connection closes after it."""
        if close:
            self._closes = True
        size = len(body) if length is None else length
        head = self._head_lines(status, reason, headers)
        head.append(f"Content-Length: {size}\r\n\r\n")
        data = "".join(head).encode("latin-1", "replace")
        transport = self.transport
        if transport is not None:
            transport.write(data if self.method == "HEAD" else data + body)
        self.answered = True

    def start(
        self,
        status: int,
        headers: Iterable[tuple[str, str]],
        *,
        reason: str | None = None,
        chunked: bool,
    ) -> asyncio.Transport:
        """Send the head of an answer whose body the caller writes to the transport returned:
        in chunks when `chunked` (end it with `end`), else until the connection closes.

        Raises:
            ConnectionResetError: the client is gone.
        """
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("the client's connection is closed")
        if not chunked:
            self._closes = True
        head = self._head_lines(status, reason, headers)
        head.append("Transfer-Encoding: chunked\r\n\r\n" if chunked else "\r\n")
        transport.write("".join(head).encode("latin-1", "replace"))
        self.answered = True
        return transport

    def end(self, *, chunked: bool) -> None:
        """End an answer sent with `start`."""
        transport = self.transport
        if transport is not None and chunked:
            transport.write(b"0\r\n\r\n")

    def abort(self) -> None:
        """Cut the connection: the answer under way cannot be completed."""
        self._closes = True
        transport = self.transport
        if transport is not None:
            transport.close()

    async def drain(self) -> None:
        """Wait until the client's transport takes more (it buffers what the client is slow to
        read)."""
        await self._connection.drain()

    def _head_lines(
        self, status: int, reason: str | None, headers: Iterable[tuple[str, str]]
    ) -> list[str]:
        minor = 0 if self.version == (1, 0) else 1
        lines = [f"HTTP/1.{minor} {status} {reason or REASONS.get(status, 'Unknown')}\r\n"]
        lines.extend(f"{name}: {value}\r\n" for name, value in headers)
        if self._closes:
            lines.append("Connection: close\r\n")
        elif minor == 0:
            lines.append("Connection: keep-alive\r\n")
        return lines

    # The connection's side.

    def feed_body(self, data: bytes, limit: int) -> bytes:
        """Take the body's bytes from `data`; returns what follows the body."""
        rest = b""
        if self._chunks is not None:
            try:
                pieces, rest = self._chunks.feed(data)
            except HeadRefused as error:
                self._body_error = error
                pieces = []
            for piece in pieces:
                self._keep(piece, limit)
        else:
            wanted = (self.head.length or 0) - self._received
            if len(data) > wanted:
                data, rest = data[:wanted], data[wanted:]
            self._keep(data, limit)
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
        return rest

    def _keep(self, data: bytes, limit: int) -> None:
        self._received += len(data)
        if self._received <= limit:
            self._body.append(data)

    @property
    def body_failed(self) -> bool:
        """Whether the body is malformed (a chunked one)."""
        return self._body_error is not None

    @property
    def closes(self) -> bool:
        """Whether the connection closes after this answer."""
        return self._closes


def _origin_form(target: str) -> str:
    """The path and query of `target` (`http://host/v1/models?x` -> `/v1/models?x`)."""
    if target.startswith("/"):
        return target
    scheme_end = target.find("://")
    slash = target.find("/", scheme_end + 3) if scheme_end >= 0 else -1
    if slash < 0:
        query = target.find("?", scheme_end + 3) if scheme_end >= 0 else -1
        return "/" + (target[query:] if query >= 0 else "")
    return target[slash:]
