"""The public side: every request is relayed to a llama-server chosen by the fleet core.

A handler reads like: read the whole body (bounded in size and time) -> turn it into what the
request needs (`request_needs`) -> ask the slot gate for an upstream -> relay the answer as it
arrives -> give the slot back. The body is read before a slot is asked for, so a client that
stalls mid-body holds nothing; it goes upstream unchanged.

Every request has an id (`request_ids`): the client's `X-Request-Id` when it is fit, else a new
one. It goes upstream, comes back in the response headers (also on the errors the balancer
answers itself), and keys the request's `ProxyOutcome`, reported exactly once per request on
every path to the listeners (metrics, access log). W3C `traceparent` and `tracestate` pass through
untouched, as every header that is not hop-by-hop.

Upstream connections are Rower's own protocol (`upstream_connection`), pooled by
`upstream_client`: kept alive only where llama-server keeps them too (after answers with a
`Content-Length`, idle for under 2 s), and a request that meets a kept-alive connection the
server had closed is sent again, once, on a new one to the same server, on the same slot: the
client never sees "Server disconnected" for it. A request that asks for a stream gets a
connection of its own, and llama-server's chunks are written to the client's socket from that
connection's own callback: one system call per token and no task woken (docs/performance.md).

The listener runs with `handler_cancellation=True`, so a client that goes away cancels the
handler: the `finally` that hands the upstream connection back then closes it (an answer not
read to its end is never pooled). llama-server then
stops a streamed generation at its next token; a non-streamed one runs to its end, which is why
such a slot is given back as "abandoned". A client that leaves is counted as what it is
(`client_disconnected`), not as a failure of the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from aiohttp import web
from multidict import CIMultiDict, MultiMapping

from rower.balancer.answer_timings import (
    AnswerTimings,
    from_body,
    from_stream_tail,
)
from rower.balancer.fleet import Dispatch
from rower.balancer.model_listing import MODELS_PATHS, listing
from rower.balancer.outcome import (
    CLIENT_CLOSED_REQUEST,
    Failure,
    OutcomeListener,
    ProxyOutcome,
)
from rower.balancer.paths import is_slots_endpoint, normalize
from rower.balancer.request_ids import HEADER as REQUEST_ID
from rower.balancer.request_ids import request_id
from rower.balancer.request_needs import BadRequest, RequestNeeds, read_needs, with_model
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate, SlotUnavailable
from rower.balancer.upstream_client import UpstreamClient
from rower.balancer.upstream_connection import (
    ClientLeft,
    UpstreamConnection,
    UpstreamCut,
    request_head,
)
from rower.balancer.upstream_framing import AnswerHead, BadAnswer, Framing
from rower.http_errors import error_response, openai_error_response
from rower.logs import log_throttled

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

_NEEDS = web.RequestKey("rower.needs", RequestNeeds)
_DISPATCH = web.RequestKey("rower.dispatch", Dispatch)
_EXCHANGE: web.RequestKey[_Exchange] = web.RequestKey("rower.exchange")
"""Where a request keeps what it needs, where it went and how far it got, for its outcome."""

MAX_ATTEMPTS = 3
"""Upstreams tried for one request when they refuse connections."""

SMALL_BODY = 64 * 1024
"""Answers of known length up to this size are relayed whole: headers and body go out in one
write, where relaying them as a stream costs three (headers, body, end) plus the stream's
machinery; most of the proxy's CPU per small request is those writes."""


_UNAVAILABLE = {
    429: Failure.BUFFER_FULL,
    504: Failure.BUFFER_TIMEOUT,
    503: Failure.SHUTTING_DOWN,
    400: Failure.MODEL_MISSING,
    404: Failure.MODEL_UNKNOWN,
}
"""The slot gate's refusals, by the status it chose."""


class ReverseProxy:
    """aiohttp handler for every method and path of the public listener."""

    def __init__(
        self,
        gate: SlotGate,
        upstream: UpstreamClient,
        settings: BalancerSettings,
        *,
        on_outcome: OutcomeListener | None = None,
    ) -> None:
        self.gate = gate
        self.upstream = upstream
        self.settings = settings
        self.on_outcome = on_outcome

    async def __call__(self, request: web.Request) -> web.StreamResponse:
        """Relay one request."""
        exchange = request[_EXCHANGE] = _Exchange(
            request_id(request.headers.get(REQUEST_ID)), time.perf_counter()
        )
        try:
            response = await self._relay(request)
        except asyncio.CancelledError:
            self._report(
                request,
                exchange.status or CLIENT_CLOSED_REQUEST,
                Failure.CLIENT_DISCONNECTED,
                "the client closed the connection",
            )
            raise
        if not response.prepared:
            response.headers[REQUEST_ID] = exchange.request_id
        return response

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        if is_slots_endpoint(request.path) and not self.settings.slots_endpoint_enable:
            message = (
                "The /slots endpoint is not exposed through the balancer; "
                "start it with --slots-endpoint-enable to allow it"
            )
            return self._refuse(request, 403, Failure.SLOTS_FORBIDDEN, message)
        limit = self.settings.max_request_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._body_too_large(request)
        if self.gate.closing:
            message = "The balancer is shutting down; retry on another balancer or in a moment"
            return self._refuse(
                request, 503, Failure.SHUTTING_DOWN, message, headers={"Retry-After": "1"}
            )
        if request.method == "GET" and normalize(request.path) in MODELS_PATHS:
            # The fleet's models, not one server's.
            answer = listing(self.gate.fleet, self.gate.clock(), self.gate.wall_clock())
            response = web.json_response(answer)
            self._report(request, 200)
            return response
        try:
            body = await self._read_body(request)
        except BodyTooLarge:
            return self._body_too_large(request)
        except TimeoutError:
            return self._body_too_slow(request)
        request[_EXCHANGE].bytes_received = len(body)
        try:
            needs = request[_NEEDS] = read_needs(request.path, body, request.query.get("model"))
        except BadRequest as error:
            return self._refuse(
                request,
                400,
                Failure.BAD_REQUEST,
                error.message,
                error_type="invalid_request_error",
            )
        if needs.takes_slot:
            return await self._relay_on_slot(request, body, needs)
        return await self._relay_anywhere(request, body, needs)

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
        self, request: web.Request, body: bytes, needs: RequestNeeds
    ) -> web.StreamResponse:
        exchange: _Exchange = request[_EXCHANGE]
        slot_request = self.gate.new_request_id()
        retry = False
        for _ in range(MAX_ATTEMPTS):
            # Not a coroutine of its own: a waiting request keeps every frame of its wait.
            try:
                try:
                    dispatch = await self.gate.acquire(slot_request, needs=needs, retry=retry)
                finally:
                    # Granted, refused, or its client gone: the wait is over either way.
                    exchange.waited = time.perf_counter() - exchange.started
            except SlotUnavailable as error:
                headers = {"Retry-After": str(error.retry_after)} if error.retry_after else None
                failure = _UNAVAILABLE.get(error.status, Failure.BUFFER_FULL)
                return self._refuse(
                    request,
                    error.status,
                    failure,
                    error.message,
                    headers=headers,
                    openai_code=error.openai_code,
                )
            request[_DISPATCH] = dispatch
            sent = with_model(body, dispatch.rename_to) if dispatch.rename_to else body
            try:
                return await self._forward(request, sent, dispatch.upstream)
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", dispatch.upstream)
                self.gate.refused(slot_request)
                retry = True
            except asyncio.CancelledError:
                # The client left. A stream already flowing stops at llama-server's next write;
                # anything else may run on there, so the slot is not trusted to be free.
                self.gate.release(slot_request, abandoned=not exchange.streaming)
                raise
            finally:
                self.gate.release(slot_request)
        return self._unreachable(request)

    async def _relay_anywhere(
        self, request: web.Request, body: bytes, needs: RequestNeeds
    ) -> web.StreamResponse:
        for _ in range(MAX_ATTEMPTS):
            upstream = self.gate.any_upstream(needs.model)
            if upstream is None:
                message = "No llama.cpp server is registered and healthy; start an agent"
                return self._refuse(request, 503, Failure.NO_UPSTREAM, message)
            try:
                return await self._forward(request, body, upstream.address)
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", upstream.address)
                self.gate.quarantine(upstream.agent_id)
        return self._unreachable(request)

    def _unreachable(self, request: web.Request) -> web.Response:
        message = "llama.cpp servers refused the connection; check that they are running"
        return self._refuse(request, 502, Failure.UPSTREAMS_REFUSED, message)

    async def _forward(
        self, request: web.Request, body: bytes, upstream: str
    ) -> web.StreamResponse:
        exchange: _Exchange = request[_EXCHANGE]
        exchange.upstream = upstream
        needs: RequestNeeds | None = request.get(_NEEDS)
        streaming = needs is not None and needs.streaming
        headers = self._upstream_headers(request, upstream)
        self._body_headers(request, headers, body)
        if streaming:
            # llama-server closes the connection after a stream anyway (`upstream_client`).
            headers["Connection"] = "close"
        head = request_head(request.method, str(request.rel_url), headers)
        try:
            answer = await self.upstream.request(
                upstream, head + body, head_request=request.method == "HEAD", closing=streaming
            )
        except ConnectionRefusedError as error:
            raise UpstreamRefused from error
        except (BadAnswer, OSError, TimeoutError) as error:
            return self._upstream_failed(request, upstream, error)
        exchange.connection_reused, exchange.retried = answer.reused, answer.retried
        exchange.first_byte = time.perf_counter() - exchange.started
        try:
            if request.method == "HEAD":
                return await self._relay_head(request, answer.head)
            if answer.head.framing is Framing.EMPTY or (
                answer.head.framing is Framing.LENGTH and answer.head.length <= SMALL_BODY
            ):
                return await self._relay_whole(request, answer.connection, answer.head, upstream)
            return await self._relay_body(request, answer.connection, answer.head, upstream)
        finally:
            self.upstream.release(upstream, answer.connection)

    async def _relay_body(
        self,
        request: web.Request,
        connection: UpstreamConnection,
        answer: AnswerHead,
        upstream: str,
    ) -> web.StreamResponse:
        """An answer relayed as it arrives (a stream, or a long or unframed body)."""
        exchange: _Exchange = request[_EXCHANGE]
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        for name, value in end_to_end(CIMultiDict(answer.headers)):
            if name.lower() != "content-length":
                response.headers.add(name, value)
        response.headers[REQUEST_ID] = exchange.request_id
        # llama-server's chunks pass as they are to a client that takes chunks (HTTP/1.1).
        chunked = request.version >= (1, 1)
        if chunked:
            response.enable_chunked_encoding()
        await response.prepare(request)
        exchange.status = answer.status
        exchange.streaming = response.content_type == "text/event-stream"
        try:
            await _send(response, b"")  # the head, before the relayed body
            transport = request.transport
            if transport is None:
                raise ClientLeft("the client's connection is closed")
            try:
                await connection.relay(transport, request.writer, chunked=chunked)
            finally:
                exchange.bytes_sent = connection.payload_bytes
            # The last event carries the answer's timings.
            self._count_prompt(request, from_stream_tail(b"".join(connection.tail)))
            await _send(response, None)
        except ClientLeft as left:
            # Not the upstream's fault: the client closed its connection mid-answer.
            self._report(
                request,
                answer.status,
                Failure.CLIENT_DISCONNECTED,
                f"the client left mid-response: {left}",
            )
            return response
        except UpstreamCut as error:
            # Headers are gone already: all that is left is to end the client's answer.
            log.warning("llama-server at %s failed mid-response: %s", upstream, error)
            self._report(
                request,
                answer.status,
                Failure.UPSTREAM_CUT,
                f"upstream failed mid-response: {error}",
            )
            if request.transport is not None:
                request.transport.close()
            return response
        self._report(request, answer.status)
        return response

    async def _relay_whole(
        self,
        request: web.Request,
        connection: UpstreamConnection,
        answer: AnswerHead,
        upstream: str,
    ) -> web.StreamResponse:
        """A short answer of known length, read whole and sent in one write."""
        try:
            body = await connection.whole()
        except UpstreamCut as error:
            return self._upstream_failed(request, upstream, error)
        self._count_prompt(request, from_body(body))
        headers = CIMultiDict(
            (name, value)
            for name, value in end_to_end(CIMultiDict(answer.headers))
            if name.lower() != "content-length"
        )
        response = web.Response(
            status=answer.status, reason=answer.reason, body=body, headers=headers
        )
        request[_EXCHANGE].bytes_sent = len(body)
        self._report(request, answer.status)
        return response

    async def _relay_head(self, request: web.Request, answer: AnswerHead) -> web.StreamResponse:
        """The answer to a HEAD: the headers, `Content-Length` included, and no body."""
        response = web.StreamResponse(status=answer.status, reason=answer.reason)
        for name, value in end_to_end(CIMultiDict(answer.headers)):
            response.headers.add(name, value)
        response.headers[REQUEST_ID] = request[_EXCHANGE].request_id
        self._report(request, answer.status)
        return response

    def _upstream_failed(
        self, request: web.Request, upstream: str, error: BaseException
    ) -> web.Response:
        message = (
            f"Request to llama.cpp server at {upstream} failed: {error or type(error).__name__}"
        )
        log.warning("%s", message)
        return self._refuse(request, 502, Failure.UPSTREAM_FAILED, message)

    def _body_too_slow(self, request: web.Request) -> web.Response:
        timeout = self.settings.request_body_timeout
        message = (
            f"The request body did not arrive within {timeout:g} s; send it at once, "
            "or raise --request-body-timeout"
        )
        log_throttled(
            log,
            logging.WARNING,
            "body too slow",
            "refused a %s %s from %s: body too slow",
            request.method,
            request.path,
            request.remote,
        )
        response = self._refuse(
            request, 408, Failure.BODY_TIMEOUT, message, error_type="invalid_request_error"
        )
        # The rest of the body may still come: the connection cannot carry another request.
        response.force_close()
        return response

    def _body_too_large(self, request: web.Request) -> web.Response:
        limit = self.settings.max_request_body_bytes
        message = (
            f"The request body is over {limit} bytes; send less, or raise --max-request-body-bytes"
        )
        log_throttled(
            log,
            logging.WARNING,
            "body too large",
            "refused a %s %s from %s: body over %d bytes",
            request.method,
            request.path,
            request.remote,
            limit,
        )
        response = self._refuse(request, 413, Failure.BODY_TOO_LARGE, message)
        # The rest of the body is not read: the connection cannot carry another request.
        response.force_close()
        return response

    def _upstream_headers(self, request: web.Request, upstream: str) -> CIMultiDict[str]:
        headers = CIMultiDict(end_to_end(request.headers))
        if self.settings.rewrite_host_header or "Host" not in headers:
            headers["Host"] = upstream
        peer = request.remote
        if peer:
            previous = request.headers.get("X-Forwarded-For")
            headers["X-Forwarded-For"] = f"{previous}, {peer}" if previous else peer
        headers[REQUEST_ID] = request[_EXCHANGE].request_id
        return headers

    def _body_headers(self, request: web.Request, headers: CIMultiDict[str], body: bytes) -> None:
        # The body was read whole (and a router's model may have been renamed in it:
        # `Dispatch.rename_to`): it goes with its length, and needs no `100 Continue`.
        headers.popall("Expect", None)
        if body or request.body_exists or request.method in ("POST", "PUT", "PATCH"):
            headers["Content-Length"] = str(len(body))
        else:
            headers.popall("Content-Length", None)

    def _count_prompt(self, request: web.Request, tokens: AnswerTimings | None) -> None:
        dispatch: Dispatch | None = request.get(_DISPATCH)
        if tokens is not None and dispatch is not None:
            needs: RequestNeeds | None = request.get(_NEEDS)
            head_bytes = needs.head_bytes if needs is not None else 0
            self.gate.answered(
                dispatch.agent_id,
                tokens,
                dispatch.model,
                head_bytes=head_bytes,
                matched_blocks=dispatch.matched_blocks,
                newer_blocks=dispatch.newer_blocks,
            )

    def _refuse(
        self,
        request: web.Request,
        status: int,
        failure: Failure,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
        openai_code: str | None = None,
    ) -> web.Response:
        """An error answered by the balancer itself, reported as `failure` (in OpenAI's shape
        when it has an `openai_code`, else llama.cpp's)."""
        if openai_code is not None:
            response = openai_error_response(status, message, code=openai_code, param="model")
        else:
            response = error_response(status, message, headers=headers, error_type=error_type)
        assert isinstance(response.body, bytes)
        request[_EXCHANGE].bytes_sent = len(response.body)
        self._report(request, status, failure, message)
        return response

    def _report(
        self,
        request: web.Request,
        status: int,
        failure: Failure | None = None,
        error: str | None = None,
    ) -> None:
        exchange: _Exchange = request[_EXCHANGE]
        if self.on_outcome is None or exchange.reported:
            return
        exchange.reported = True
        self.on_outcome(
            ProxyOutcome(
                request_id=exchange.request_id,
                client=request.remote,
                method=request.method,
                path=request.path,
                status=status,
                upstream=exchange.upstream,
                seconds_waiting=exchange.waited,
                seconds_to_first_byte=exchange.first_byte,
                seconds_total=time.perf_counter() - exchange.started,
                bytes_received=exchange.bytes_received,
                bytes_sent=exchange.bytes_sent,
                connection_reused=exchange.connection_reused,
                retried=exchange.retried,
                failure=failure,
                error=error,
                needs=request.get(_NEEDS),
                dispatch=request.get(_DISPATCH),
            )
        )


async def _send(response: web.StreamResponse, chunk: bytes | None) -> None:
    """Write `chunk` to the client (None: end the answer); `ClientLeft` if it is gone."""
    try:
        if chunk is None:
            await response.write_eof()
        else:
            await response.write(chunk)
    except ConnectionError as error:
        # aiohttp's "Cannot write to closing transport" is a ConnectionResetError.
        raise ClientLeft(str(error) or type(error).__name__) from error


def end_to_end(headers: MultiMapping[str]) -> list[tuple[str, str]]:
    """The headers a proxy passes on: not the hop-by-hop ones, nor those the `Connection`
    header names as hop-by-hop for this connection (RFC 9110, 7.6.1)."""
    named = {
        token.strip().lower()
        for value in headers.getall("Connection", ())
        for token in value.split(",")
    }
    return [
        (name, value)
        for name, value in headers.items()
        if (lowered := name.lower()) not in HOP_BY_HOP and lowered not in named
    ]


class BodyTooLarge(Exception):
    """The request body grew past `--max-request-body-bytes` while it was read."""


@dataclass(slots=True)
class _Exchange:
    """One request as the proxy handles it: what its outcome will say, filled in as it goes.

    Attributes:
        request_id: its id (`X-Request-Id`).
        started: when it arrived (`time.perf_counter`: the event loop's clock is in whole
            milliseconds under uvloop, too coarse for a proxy's own cost).
        bytes_received: the request body's size, once read.
        upstream: the llama-server it was last sent to.
        waited: seconds in the buffer before its slot.
        first_byte: seconds from arrival to the upstream's response headers.
        status: the status sent to the client, once the headers are gone.
        bytes_sent: response body bytes written to the client.
        streaming: whether an event stream is flowing to the client.
        connection_reused: whether the upstream answered on a kept-alive connection.
        retried: whether a kept-alive connection failed first and it was sent again.
        reported: whether its outcome was reported (it is, exactly once).
    """

    request_id: str
    started: float
    bytes_received: int = 0
    upstream: str | None = None
    waited: float = 0.0
    first_byte: float | None = None
    status: int | None = None
    bytes_sent: int = 0
    streaming: bool = False
    connection_reused: bool = False
    retried: bool = False
    reported: bool = False


class UpstreamRefused(Exception):
    """The upstream refused the TCP connection: nothing was sent, so trying elsewhere is safe."""


def proxy_app(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.Application:
    """An application that sends every method and path to `handler`."""
    app = web.Application(client_max_size=0)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app
