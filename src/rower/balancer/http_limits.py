"""What each HTTP listener of the balancer allows a client connection, and how it says no.

`ListenerLimits` and `ListenerStats` are both listeners'. The reverse-proxy listener is Rower's
own server (`client_connection`), which keeps these rules itself; the management listener is
aiohttp's, which parses requests (llhttp) and runs the handlers, and this module customises its
request handler, the one place that sees every connection and every request head:

- **Header sizes**: a request line or header field over `--max-header-bytes`, or more than
  `MAX_HEADERS` fields, gets 431 (aiohttp enforces the sizes; it would answer a plain 400).
- **Malformed requests** (what the parser refuses) get 400 in llama.cpp's JSON shape, and
  **framing a proxy must not pass on** (`request_framing`) its 400, 405, 501 or 505.
- **Deadlines**: a request head must be complete within `header_timeout` of its first byte
  (else 408), and a connection with no request under way is closed after `idle_timeout`
  (aiohttp's keep-alive timeout, which also covers a connection that never sends a byte).
  Bodies are the handlers' business: the proxy reads them under its own deadline; what is
  left of a body after an answer is drained for `LINGER` seconds at most.
- **Connections**: at most `max_connections` are served at once; one more is answered 503
  with `Retry-After` at once, without reading its request, and closed.

Each of these answers closes the connection, is logged as one warning line (rate-limited,
with the client's address, never with a traceback) and is counted in `ListenerStats`.

aiohttp has no public hooks for these, so the handler leans on a few of its internals (the
per-connection protocol class, its loop, the request's cached version); aiohttp is pinned to
one minor version, and `tests/chaos/test_raw_sockets.py` checks every behaviour above on a
running balancer.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError, LineTooLong
from aiohttp.web_request import BaseRequest

from rower.balancer.request_framing import Refusal, refusal
from rower.http_errors import error_response
from rower.llamacpp import error_body
from rower.logs import log_throttled

log = logging.getLogger(__name__)

MAX_HEADERS = 128
"""Most header fields in one request (aiohttp's default)."""

LINGER = 1.0
"""After an answer that left the request body unread (413, 408, a refusal), how long the rest
of it is read and dropped before the connection is closed, in seconds: long enough for the
client to read the answer instead of a reset, short enough that a stalled client holds little
(aiohttp's default is 10 s)."""

OVER_CAPACITY_LINGER = 1.0
"""How long a connection answered 503 for being one too many is kept open, in seconds, so
that its request (unread) does not turn the close into a reset that loses the answer."""

Handler = Callable[[BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ListenerLimits:
    """What one listener allows a client connection; durations in seconds."""

    name: str
    """How logs and metrics call the listener: `reverse-proxy` or `management`."""
    max_header_bytes: int
    header_timeout: float
    idle_timeout: float
    max_connections: int


@dataclass(slots=True)
class ListenerStats:
    """What a listener saw, for metrics: open connections, and refusals by reason."""

    connections: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    """`malformed`, `framing`, `header_too_large`, `header_timeout`, `over_capacity`."""


class _LimitedRequestHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, with the listener's deadlines and connection cap."""

    # aiohttp's protocol has slots: without these, every connection would carry a dict too.
    __slots__ = ("_admitted", "_busy", "_head_deadline", "_over_capacity", "_server")

    def __init__(self, server: _LimitedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._server = server
        self._admitted = False
        self._over_capacity = False
        self._busy = 0
        self._head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        stats, limits = self._server.stats, self._server.limits
        if stats.connections < limits.max_connections:
            stats.connections += 1
            self._admitted = True
            return
        self._over_capacity = True
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        transport.write(refuse_over_capacity(limits, stats))
        if transport.can_write_eof():
            transport.write_eof()
        self._loop.call_later(OVER_CAPACITY_LINGER, self.force_close)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._server.stats.connections -= 1
        self._stop_head_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._over_capacity:
            return
        if data and not self._busy and self._head_deadline is None:
            self._head_deadline = self._loop.call_later(
                self._server.limits.header_timeout, self._head_too_slow
            )
        super().data_received(data)

    def request_started(self) -> None:
        """A handler runs: what arrives now is its body, or the next head, read in its turn."""
        self._busy += 1
        self._stop_head_deadline()

    def request_ended(self) -> None:
        """The handler is done; the idle deadline (keep-alive) runs until the next request."""
        self._busy -= 1

    def _stop_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self._busy or self.transport is None:
            return
        self.transport.write(
            refuse_slow_head(self._server.limits, self._server.stats, _peer(self.transport))
        )
        self.force_close()

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            # Part of an answer is out: aiohttp cuts the connection.
            return super().handle_error(request, status, exc, message)
        answer, reason, said = _error_answer(status, exc)
        name = self._server.limits.name
        if reason is None:
            log_throttled(
                log,
                logging.ERROR,
                f"{name} unexpected error",
                "unexpected error answering a request from %s on the %s listener",
                request.remote,
                name,
                exc_info=exc is not None,
            )
        else:
            self._server.stats.refused[reason] += 1
            log_throttled(
                log,
                logging.WARNING,
                f"{name} {reason}",
                "refused a request from %s on the %s listener: %s",
                request.remote,
                name,
                said,
            )
        answer.force_close()
        return answer


class _LimitedServer(web.Server):
    def __init__(
        self, handler: Handler, *, limits: ListenerLimits, stats: ListenerStats, **kwargs: Any
    ) -> None:
        super().__init__(self._checked(handler), **kwargs)
        self.limits = limits
        self.stats = stats

    def __call__(self) -> web.RequestHandler:
        # aiohttp makes one protocol per connection here; only the class differs from its own.
        return _LimitedRequestHandler(self, loop=self._loop, **self._kwargs)

    def _checked(self, handler: Handler) -> Handler:
        async def checked(request: BaseRequest) -> web.StreamResponse:
            protocol = request.protocol
            assert isinstance(protocol, _LimitedRequestHandler)
            protocol.request_started()
            try:
                refused = refusal(
                    request.method,
                    (request.version.major, request.version.minor),
                    request.raw_path,
                    request.headers.items(),
                )
                if refused is not None:
                    return self._refuse(request, refused)
                return await handler(request)
            finally:
                protocol.request_ended()

        return checked

    def _refuse(self, request: BaseRequest, refused: Refusal) -> web.Response:
        self.stats.refused["framing"] += 1
        log_throttled(
            log,
            logging.WARNING,
            f"{self.limits.name} framing",
            "refused a request from %s on the %s listener: %s",
            request.remote,
            self.limits.name,
            refused.message,
        )
        if request.version not in (HttpVersion10, HttpVersion11):
            # The answer's status line takes the request's version (cached on first read):
            # say HTTP/1.1 to an HTTP/0.9 or 2.0 request line, the version this server speaks.
            request._version = HttpVersion11
            request._cache.pop("version", None)
        # 501 keeps llama.cpp's not_supported_error; the others are the client's fault.
        error_type = None if refused.status == 501 else "invalid_request_error"
        answer = error_response(refused.status, refused.message, error_type=error_type)
        answer.force_close()
        return answer


class LimitedAppRunner(web.AppRunner):
    """An `AppRunner` whose connections live by `limits` (see the module docstring).

    Args:
        app: the application.
        limits: what the listener allows a connection.
        stats: where the listener counts its connections and refusals.
        kwargs: passed to `web.AppRunner`.
    """

    def __init__(
        self,
        app: web.Application,
        *,
        limits: ListenerLimits,
        stats: ListenerStats | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            app,
            max_line_size=limits.max_header_bytes,
            max_field_size=limits.max_header_bytes,
            max_headers=MAX_HEADERS,
            keepalive_timeout=limits.idle_timeout,
            lingering_time=LINGER,
            **kwargs,
        )
        self.limits = limits
        self.stats = stats if stats is not None else ListenerStats()

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _LimitedServer(
            server.request_handler,
            limits=self.limits,
            stats=self.stats,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def raise_open_file_limit(wanted: int) -> None:
    """Raise this process's open-file limit to `wanted` files if the hard limit allows it.

    Every client connection is a file: the listeners' connection caps mean nothing if the
    process runs out of files first (the common soft limit is 1024).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    if target < wanted:
        log.warning(
            "the open-file limit is %d, below the %d that the connection limits need: "
            "raise it (ulimit -n, LimitNOFILE=) or lower --max-client-connections",
            target,
            wanted,
        )


def _error_answer(status: int, exc: BaseException | None) -> tuple[web.Response, str | None, str]:
    """The JSON answer to an error aiohttp met, the refusal reason (None for a bug), and what
    the answer says."""
    if isinstance(exc, LineTooLong):
        # The parser reports the URL and header lines alike (in pieces), so one answer fits both.
        limit = exc.args[1] if len(exc.args) > 1 else "?"
        message = f"The request line or a header field is over {limit} bytes (--max-header-bytes)"
        return _invalid(431, message), "header_too_large", message
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        message = f"The request has more than {MAX_HEADERS} header fields"
        return _invalid(431, message), "header_too_large", message
    if isinstance(exc, HttpProcessingError):
        code = exc.code if 400 <= exc.code < 500 else 400
        message = f"Malformed request: {_summary(exc.message)}"
        return _invalid(code, message), "malformed", message
    if status == 504:
        message = "The request took too long to answer"
        return error_response(504, message), "timeout", message
    message = "Internal error in the balancer; its log has the details"
    return error_response(500, message), None, message


def _invalid(status: int, message: str) -> web.Response:
    return error_response(status, message, error_type="invalid_request_error")


def _summary(message: str) -> str:
    """The parser's description of what is wrong, without its excerpt of the bytes."""
    head = message.split("\n\n", 1)[0]
    return " ".join(head.replace(":\n", ": ").split()).rstrip(":") or "unreadable request"


def refuse_over_capacity(limits: ListenerLimits, stats: ListenerStats) -> bytes:
    """Count and log a connection beyond `--max-client-connections`; returns the 503 to send
    it before closing (both listeners: `LimitedAppRunner`'s and `client_connection`'s)."""
    stats.refused["over_capacity"] += 1
    log_throttled(
        log,
        logging.WARNING,
        f"{limits.name} over capacity",
        "refused a connection on the %s listener: %d open (--max-client-connections)",
        limits.name,
        stats.connections,
    )
    message = (
        f"The balancer has {stats.connections} client connections open, its limit "
        "(--max-client-connections); retry in a moment"
    )
    body = error_body(503, message, "unavailable_error")
    return raw_answer(503, body, extra=b"Retry-After: 1\r\n")


def refuse_slow_head(limits: ListenerLimits, stats: ListenerStats, remote: str) -> bytes:
    """Count and log a connection whose request head took longer than
    `--request-header-timeout`; returns the 408 to send it before closing."""
    stats.refused["header_timeout"] += 1
    log_throttled(
        log,
        logging.WARNING,
        f"{limits.name} header timeout",
        "closed a connection from %s on the %s listener: no complete request head "
        "within %g s (--request-header-timeout)",
        remote,
        limits.name,
        limits.header_timeout,
    )
    message = (
        f"The request line and headers did not arrive within {limits.header_timeout:g} s "
        "(--request-header-timeout)"
    )
    return raw_answer(408, error_body(408, message, "invalid_request_error"))


def raw_answer(status: int, body: bytes, *, extra: bytes = b"") -> bytes:
    """A whole HTTP/1.1 answer that closes the connection, for when no request is handled."""
    return (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n".encode()
        + b"Content-Type: application/json; charset=utf-8\r\n"
        + f"Content-Length: {len(body)}\r\n".encode()
        + b"Connection: close\r\n"
        + extra
        + b"\r\n"
        + body
    )


def _peer(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"
