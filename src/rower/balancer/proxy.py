"""The public side: every request is relayed to a llama-server chosen by the fleet core.

A handler reads like: read the whole body (bounded in size and time) -> turn it into what the
request needs (`request_needs`) -> ask the slot gate for an upstream -> relay the answer as it
arrives -> give the slot back. The body is read before a slot is asked for, so a client that
stalls mid-body holds nothing; it goes upstream unchanged.

The listener runs with `handler_cancellation=True`, so a client that goes away cancels the
handler: leaving the upstream `async with` then closes the upstream connection. llama-server then
stops a streamed generation at its next token; a non-streamed one runs to its end, which is why
such a slot is given back as "abandoned".
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from rower.balancer.answer_timings import (
    STREAM_TAIL_READS,
    AnswerTimings,
    from_body,
    from_stream_tail,
)
from rower.balancer.fleet import Dispatch
from rower.balancer.paths import is_slots_endpoint
from rower.balancer.request_needs import BadRequest, RequestNeeds, read_needs
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate, SlotUnavailable
from rower.http_errors import error_response

log = logging.getLogger(__name__)

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)

_NEEDS = "rower.needs"
_DISPATCH = "rower.dispatch"
"""Where a request keeps what it needs and where it went, for its outcome."""

MAX_ATTEMPTS = 3
"""Upstreams tried for one request when they refuse connections."""

SMALL_BODY = 64 * 1024
"""Answers of known length up to this size are relayed whole: headers and body go out in one
write, where relaying them as a stream costs three (headers, body, end) plus the stream's
machinery; most of the proxy's CPU per small request is those writes."""


@dataclass(frozen=True, slots=True)
class ProxyOutcome:
    """What happened to one proxied request, for metrics."""

    path: str
    status: int
    upstream: str | None
    seconds_waiting: float
    seconds_to_first_byte: float | None
    seconds_total: float
    error: str | None = None
    needs: RequestNeeds | None = None
    dispatch: Dispatch | None = None


OutcomeListener = Callable[[ProxyOutcome], None]


def upstream_session() -> aiohttp.ClientSession:
    """The client for upstream llama-servers.

    No total timeout (a generation may run for minutes), no pool limit (the slot count is the
    limit), no decompression (bytes pass through as the server sent them), and a new connection
    for every request: reusing kept-alive connections to llama-server made about one request
    in 40 fail with "Server disconnected" (the server had closed the connection as it was
    reused), and an idle kept-alive connection holds one of llama-server's HTTP threads. A
    loopback or LAN connect costs a fraction of a millisecond; a generation, seconds.
    """
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=True)
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
    )


class ReverseProxy:
    """aiohttp handler for every method and path of the public listener."""

    def __init__(
        self,
        gate: SlotGate,
        session: aiohttp.ClientSession,
        settings: BalancerSettings,
        *,
        on_outcome: OutcomeListener | None = None,
    ) -> None:
        self.gate = gate
        self.session = session
        self.settings = settings
        self.on_outcome = on_outcome

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """Relay one request."""
        if is_slots_endpoint(request.path) and not self.settings.slots_endpoint_enable:
            return error_response(
                403,
                "The /slots endpoint is not exposed through the balancer; "
                "start it with --slots-endpoint-enable to allow it",
            )
        limit = self.settings.max_request_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._body_too_large(request)
        if self.gate.closing:
            message = "The balancer is shutting down; retry on another balancer or in a moment"
            return error_response(503, message, headers={"Retry-After": "1"})
        started = asyncio.get_running_loop().time()
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return self._body_too_large(request)
        except TimeoutError:
            return self._body_too_slow(request, started)
        try:
            needs = request[_NEEDS] = read_needs(request.path, body)
        except BadRequest as error:
            self._report(request, 400, None, started, None, error.message)
            return error_response(400, error.message, error_type="invalid_request_error")
        if needs.takes_slot:
            return await self._relay_on_slot(request, body, needs, started)
        return await self._relay_anywhere(request, body, needs, started)

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole request body, within `--max-request-body-bytes` and the read deadline."""
        if not request.body_exists:
            return b""
        limit = self.settings.max_request_body_bytes
        async with asyncio.timeout(self.settings.request_body_timeout):
            if request.content_length is not None:
                return await request.read()
            # Chunked: the size is known only once it has all arrived.
            chunks: list[bytes] = []
            seen = 0
            async for chunk in request.content.iter_any():
                seen += len(chunk)
                if seen > limit:
                    raise BodyTooLarge
                chunks.append(chunk)
            return b"".join(chunks)

    async def _relay_on_slot(
        self, request: web.Request, body: bytes, needs: RequestNeeds, started: float
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        request_id = self.gate.new_request_id()
        retry = False
        for _ in range(MAX_ATTEMPTS):
            try:
                dispatch = await self.gate.acquire(request_id, needs=needs, retry=retry)
            except SlotUnavailable as error:
                headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
                self._report(request, error.status, None, started, None, error.message)
                return error_response(error.status, error.message, headers=headers)
            request[_DISPATCH] = dispatch
            waited = loop.time() - started
            progress = _Progress()
            try:
                return await self._forward(
                    request, body, dispatch.upstream, started, waited, progress
                )
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", dispatch.upstream)
                self.gate.refused(request_id)
                retry = True
            except asyncio.CancelledError:
                # The client left. A stream already flowing stops at llama-server's next write;
                # anything else may run on there, so the slot is not trusted to be free.
                self.gate.release(request_id, abandoned=not progress.streaming)
                raise
            finally:
                self.gate.release(request_id)
        return self._unreachable(request, started)

    async def _relay_anywhere(
        self, request: web.Request, body: bytes, needs: RequestNeeds, started: float
    ) -> web.StreamResponse:
        for _ in range(MAX_ATTEMPTS):
            upstream = self.gate.any_upstream()
            if upstream is None:
                message = "No llama.cpp server is registered and healthy; start an agent"
                self._report(request, 503, None, started, None, message)
                return error_response(503, message)
            try:
                return await self._forward(request, body, upstream.address, started, 0.0)
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", upstream.address)
                self.gate.quarantine(upstream.agent_id)
        return self._unreachable(request, started)

    def _unreachable(self, request: web.Request, started: float) -> web.Response:
        message = "llama.cpp servers refused the connection; check that they are running"
        self._report(request, 502, None, started, None, message)
        return error_response(502, message)

    async def _forward(
        self,
        request: web.Request,
        body: bytes,
        upstream: str,
        started: float,
        waited: float,
        progress: _Progress | None = None,
    ) -> web.StreamResponse:
        loop = asyncio.get_running_loop()
        url = f"http://{upstream}{request.rel_url}"
        headers = self._upstream_headers(request, upstream)
        try:
            upstream_response = await self.session.request(
                request.method,
                url,
                headers=headers,
                data=body if request.body_exists else None,
                allow_redirects=False,
            )
        except Exception as error:
            if isinstance(error, aiohttp.ClientConnectorError):
                if isinstance(error.os_error, ConnectionRefusedError):
                    raise UpstreamRefused from error
                return self._upstream_failed(request, upstream, started, waited, error)
            if isinstance(error, aiohttp.ClientError | TimeoutError):
                return self._upstream_failed(request, upstream, started, waited, error)
            raise
        async with upstream_response:
            first_byte = loop.time() - started
            if _is_small(request, upstream_response):
                return await self._relay_whole(
                    request, upstream_response, upstream, started, first_byte, waited
                )
            response = web.StreamResponse(
                status=upstream_response.status, reason=upstream_response.reason
            )
            for name, value in upstream_response.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            if progress is not None:
                progress.streaming = upstream_response.content_type == "text/event-stream"
            # The last event carries the answer's timings: keep the stream's last few reads.
            tail: deque[bytes] = deque(maxlen=STREAM_TAIL_READS)
            try:
                async for chunk in upstream_response.content.iter_any():
                    await response.write(chunk)
                    tail.append(chunk)
                self._count_prompt(request, from_stream_tail(b"".join(tail)))
            except (aiohttp.ClientError, TimeoutError) as error:
                # Headers are gone already: all that is left is to end the client's stream.
                log.warning("llama-server at %s failed mid-response: %s", upstream, error)
                self._report(
                    request,
                    upstream_response.status,
                    upstream,
                    started,
                    first_byte,
                    f"upstream failed mid-response: {error}",
                    waited,
                )
                if request.transport is not None:
                    request.transport.close()
                return response
            await response.write_eof()
        self._report(request, upstream_response.status, upstream, started, first_byte, None, waited)
        return response

    async def _relay_whole(
        self,
        request: web.Request,
        upstream_response: aiohttp.ClientResponse,
        upstream: str,
        started: float,
        first_byte: float,
        waited: float,
    ) -> web.StreamResponse:
        try:
            body = await upstream_response.read()
        except (aiohttp.ClientError, TimeoutError) as error:
            return self._upstream_failed(request, upstream, started, waited, error)
        self._count_prompt(request, from_body(body))
        headers = CIMultiDict(
            (name, value)
            for name, value in upstream_response.headers.items()
            if name.lower() not in HOP_BY_HOP and name.lower() != "content-length"
        )
        response = web.Response(
            status=upstream_response.status,
            reason=upstream_response.reason,
            body=body,
            headers=headers,
        )
        self._report(request, upstream_response.status, upstream, started, first_byte, None, waited)
        return response

    def _upstream_failed(
        self,
        request: web.Request,
        upstream: str,
        started: float,
        waited: float,
        error: BaseException,
    ) -> web.Response:
        message = (
            f"Request to llama.cpp server at {upstream} failed: {error or type(error).__name__}"
        )
        log.warning("%s", message)
        self._report(request, 502, upstream, started, None, message, waited)
        return error_response(502, message)

    def _body_too_slow(self, request: web.Request, started: float) -> web.Response:
        timeout = self.settings.request_body_timeout
        message = (
            f"The request body did not arrive within {timeout:g} s; send it at once, "
            "or raise --request-body-timeout"
        )
        log.warning(
            "refused a %s %s from %s: body too slow", request.method, request.path, request.remote
        )
        self._report(request, 408, None, started, None, message)
        response = error_response(408, message, error_type="invalid_request_error")
        # The rest of the body may still come: the connection cannot carry another request.
        response.force_close()
        return response

    def _body_too_large(self, request: web.Request) -> web.Response:
        limit = self.settings.max_request_body_bytes
        message = (
            f"The request body is over {limit} bytes; send less, or raise --max-request-body-bytes"
        )
        log.warning("refused a %s %s: body over %d bytes", request.method, request.path, limit)
        response = error_response(413, message)
        # The rest of the body is not read: the connection cannot carry another request.
        response.force_close()
        return response

    def _upstream_headers(self, request: web.Request, upstream: str) -> CIMultiDict[str]:
        headers = CIMultiDict(
            (name, value)
            for name, value in request.headers.items()
            if name.lower() not in HOP_BY_HOP
        )
        if self.settings.rewrite_host_header:
            headers["Host"] = upstream
        peer = request.remote
        if peer:
            previous = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        return headers

    def _count_prompt(self, request: web.Request, tokens: AnswerTimings | None) -> None:
        dispatch: Dispatch | None = request.get(_DISPATCH)
        if tokens is not None and dispatch is not None:
            self.gate.answered(dispatch.agent_id, tokens)

    def _report(
        self,
        request: web.Request,
        status: int,
        upstream: str | None,
        started: float,
        first_byte: float | None,
        error: str | None,
        waited: float = 0.0,
    ) -> None:
        if self.on_outcome is None:
            return
        total = asyncio.get_running_loop().time() - started
        self.on_outcome(
            ProxyOutcome(
                request.path,
                status,
                upstream,
                waited,
                first_byte,
                total,
                error,
                request.get(_NEEDS),
                request.get(_DISPATCH),
            )
        )


def _is_small(request: web.Request, upstream_response: aiohttp.ClientResponse) -> bool:
    """Whether the answer is short and not a stream, so it can be read whole and sent at once."""
    length = upstream_response.content_length
    return (
        length is not None
        and length <= SMALL_BODY
        and request.method != "HEAD"
        and upstream_response.content_type != "text/event-stream"
    )


class BodyTooLarge(Exception):
    """The request body grew past `--max-request-body-bytes` while it was read."""


@dataclass(slots=True)
class _Progress:
    """How far a relay got: whether an event stream is flowing to the client."""

    streaming: bool = False


class UpstreamRefused(Exception):
    """The upstream refused the TCP connection: nothing was sent, so trying elsewhere is safe."""


def proxy_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """An application that sends every method and path to `handler`."""
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
