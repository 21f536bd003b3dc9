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

The listener is Rower's own HTTP/1.1 server (`client_connection`); a client that goes away
cancels the handler: the `finally` that hands the upstream connection back then closes it (an
answer not read to its end is never pooled). llama-server then
stops a streamed generation at its next token; a non-streamed one runs to its end, which is why
such a slot is given back as "abandoned". A client that leaves is counted as what it is
(`client_disconnected`), not as a failure of the upstream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote_plus

import msgspec
from multidict import MultiMapping

from rower.balancer import stream_pacing
from rower.balancer.answer_timings import (
    AnswerTimings,
    from_body,
    from_stream_tail,
)
from rower.balancer.client_request import BodyTooLarge, ClientRequest
from rower.balancer.fleet import Dispatch
from rower.balancer.model_listing import MODELS_PATHS, listing
from rower.balancer.outcome import (
    CLIENT_CLOSED_REQUEST,
    Failure,
    OutcomeListener,
    ProxyOutcome,
)
from rower.balancer.paths import is_slots_endpoint, normalize
from rower.balancer.request_head import HeadRefused
from rower.balancer.request_ids import HEADER as REQUEST_ID
from rower.balancer.request_ids import request_id
from rower.balancer.request_needs import BadRequest, RequestNeeds, read_needs, with_model
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate, SlotUnavailable
from rower.balancer.upstream_client import UpstreamClient
from rower.balancer.upstream_connection import ClientLeft, UpstreamConnection, UpstreamCut
from rower.balancer.upstream_framing import AnswerHead, BadAnswer, Framing
from rower.llamacpp import error_body
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

MAX_ATTEMPTS = 3
"""Upstreams tried for one request when they refuse connections."""

SMALL_BODY = 64 * 1024
"""Answers of known length up to this size are relayed whole: headers and body go out in one
write, where relaying them as a stream costs three (headers, body, end) plus the stream's
machinery; most of the proxy's CPU per small request is those writes."""

JSON = ("Content-Type", "application/json; charset=utf-8")

_UNAVAILABLE = {
    429: Failure.BUFFER_FULL,
    504: Failure.BUFFER_TIMEOUT,
    503: Failure.SHUTTING_DOWN,
    400: Failure.MODEL_MISSING,
    404: Failure.MODEL_UNKNOWN,
}
"""The slot gate's refusals, by the status it chose."""


class Answer(msgspec.Struct, frozen=True):
    """A whole answer to send: status, headers (without framing), body; `close`: the
    connection closes after it; `length`: the `Content-Length` of a HEAD's answer."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes = b""
    reason: str | None = None
    close: bool = False
    length: int | None = None


class ReverseProxy:
    """The handler of every request on the public listener (`client_connection`)."""

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
        self.pacer: stream_pacing.Pacer | None = None
        """What lets streams' tokens wait to be read together (None: each read as it comes)."""
        if settings.stream_flush_interval:
            if stream_pacing.reads_can_wait():
                self.pacer = stream_pacing.Pacer(settings.stream_flush_interval)
            else:
                log.warning(
                    "--stream-flush-interval needs a Linux kernel that wakes a socket when its "
                    "SO_RCVLOWAT is lowered; this one does not: streams are relayed read by read"
                )

    async def __call__(self, request: ClientRequest) -> None:
        """Relay one request."""
        exchange = _Exchange(
            request, request_id(request.headers.get(REQUEST_ID)), time.perf_counter()
        )
        try:
            answer = await self._relay(exchange)
        except asyncio.CancelledError:
            self._report(
                exchange,
                exchange.status or CLIENT_CLOSED_REQUEST,
                Failure.CLIENT_DISCONNECTED,
                "the client closed the connection",
            )
            raise
        if answer is not None:
            answer.headers.append((REQUEST_ID, exchange.request_id))
            request.respond(
                answer.status,
                answer.headers,
                answer.body,
                reason=answer.reason,
                close=answer.close,
                length=answer.length,
            )

    async def _relay(self, exchange: _Exchange) -> Answer | None:
        request = exchange.request
        if is_slots_endpoint(request.path) and not self.settings.slots_endpoint_enable:
            message = (
                "The /slots endpoint is not exposed through the balancer; "
                "start it with --slots-endpoint-enable to allow it"
            )
            return self._refuse(exchange, 403, Failure.SLOTS_FORBIDDEN, message)
        limit = self.settings.max_request_body_bytes
        if request.content_length is not None and request.content_length > limit:
            return self._body_too_large(exchange)
        if self.gate.closing:
            message = "The balancer is shutting down; retry on another balancer or in a moment"
            return self._refuse(
                exchange, 503, Failure.SHUTTING_DOWN, message, headers={"Retry-After": "1"}
            )
        if request.method == "GET" and normalize(request.path) in MODELS_PATHS:
            # The fleet's models, not one server's.
            models = listing(self.gate.fleet, self.gate.clock(), self.gate.wall_clock())
            body = msgspec.json.encode(models)
            exchange.bytes_sent = len(body)
            self._report(exchange, 200)
            return Answer(200, [JSON], body)
        try:
            body = await request.read_body(limit, self.settings.request_body_timeout)
        except BodyTooLarge:
            return self._body_too_large(exchange)
        except TimeoutError:
            return self._body_too_slow(exchange)
        except HeadRefused as error:
            answer = self._refuse(
                exchange,
                error.status,
                Failure.BAD_REQUEST,
                error.message,
                error_type="invalid_request_error",
            )
            return Answer(answer.status, answer.headers, answer.body, close=True)
        exchange.bytes_received = len(body)
        try:
            needs = exchange.needs = read_needs(request.path, body, _query_model(request.query))
        except BadRequest as error:
            return self._refuse(
                exchange,
                400,
                Failure.BAD_REQUEST,
                error.message,
                error_type="invalid_request_error",
            )
        if needs.takes_slot:
            return await self._relay_on_slot(exchange, body, needs)
        return await self._relay_anywhere(exchange, body, needs)

    async def _relay_on_slot(
        self, exchange: _Exchange, body: bytes, needs: RequestNeeds
    ) -> Answer | None:
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
                    exchange,
                    error.status,
                    failure,
                    error.message,
                    headers=headers,
                    openai_code=error.openai_code,
                )
            exchange.dispatch = dispatch
            sent = with_model(body, dispatch.rename_to) if dispatch.rename_to else body
            try:
                return await self._forward(exchange, sent, dispatch.upstream)
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", dispatch.upstream)
                self.gate.refused(slot_request)
                retry = True
            except asyncio.CancelledError:
                # The client left. A stream already flowing stops at llama-server's next write;
                # anything else may run on there, so the slot is not trusted to be free.
                self.gate.release(slot_request, abandoned=not exchange.event_stream)
                raise
            finally:
                self.gate.release(slot_request)
        return self._unreachable(exchange)

    async def _relay_anywhere(
        self, exchange: _Exchange, body: bytes, needs: RequestNeeds
    ) -> Answer | None:
        for _ in range(MAX_ATTEMPTS):
            upstream = self.gate.any_upstream(needs.model)
            if upstream is None:
                message = "No llama.cpp server is registered and healthy; start an agent"
                return self._refuse(exchange, 503, Failure.NO_UPSTREAM, message)
            try:
                return await self._forward(exchange, body, upstream.address)
            except UpstreamRefused:
                log.warning("llama-server at %s refused the connection", upstream.address)
                self.gate.quarantine(upstream.agent_id)
        return self._unreachable(exchange)

    def _unreachable(self, exchange: _Exchange) -> Answer:
        message = "llama.cpp servers refused the connection; check that they are running"
        return self._refuse(exchange, 502, Failure.UPSTREAMS_REFUSED, message)

    async def _forward(self, exchange: _Exchange, body: bytes, upstream: str) -> Answer | None:
        request = exchange.request
        exchange.upstream = upstream
        streaming = exchange.asked_for_stream
        # llama-server closes the connection after a stream anyway (`upstream_client`).
        head = self._upstream_head(exchange, upstream, body, closing=streaming)
        try:
            answer = await self.upstream.request(
                upstream, head + body, head_request=request.method == "HEAD", closing=streaming
            )
        except ConnectionRefusedError as error:
            raise UpstreamRefused from error
        except (BadAnswer, OSError, TimeoutError) as error:
            return self._upstream_failed(exchange, upstream, error)
        exchange.connection_reused, exchange.retried = answer.reused, answer.retried
        exchange.first_byte = time.perf_counter() - exchange.started
        try:
            if request.method == "HEAD":
                return self._relay_head(exchange, answer.head)
            if answer.head.framing is Framing.EMPTY or (
                answer.head.framing is Framing.LENGTH and answer.head.length <= SMALL_BODY
            ):
                return await self._relay_whole(exchange, answer.connection, answer.head, upstream)
            await self._relay_body(exchange, answer.connection, answer.head, upstream)
            return None
        finally:
            self.upstream.release(upstream, answer.connection)

    async def _relay_body(
        self,
        exchange: _Exchange,
        connection: UpstreamConnection,
        answer: AnswerHead,
        upstream: str,
    ) -> None:
        """An answer relayed as it arrives (a stream, or a long or unframed body)."""
        request = exchange.request
        headers = end_to_end(answer.headers, without=CONTENT_LENGTH)
        headers.append((REQUEST_ID, exchange.request_id))
        # llama-server's chunks pass as they are to a client that takes chunks (HTTP/1.1).
        chunked = request.version >= (1, 1)
        exchange.status = answer.status
        exchange.event_stream = any(
            name.lower() == "content-type" and value.startswith("text/event-stream")
            for name, value in headers
        )
        try:
            try:
                transport = request.start(
                    answer.status, headers, reason=answer.reason, chunked=chunked
                )
            except ConnectionError as error:
                raise ClientLeft(str(error)) from error
            try:
                await connection.relay(
                    transport,
                    request,
                    chunked=chunked,
                    # Only where the request asked for a stream: it went with `Connection: close`,
                    # and llama-server's close is what ends a paced stream without a wait.
                    pacer=(
                        self.pacer if exchange.event_stream and exchange.asked_for_stream else None
                    ),
                )
            finally:
                exchange.bytes_sent = connection.payload_bytes
            # The last event carries the answer's timings.
            self._count_prompt(exchange, from_stream_tail(b"".join(connection.tail)))
            request.end(chunked=chunked)
        except ClientLeft as left:
            # Not the upstream's fault: the client closed its connection mid-answer.
            self._report(
                exchange,
                answer.status,
                Failure.CLIENT_DISCONNECTED,
                f"the client left mid-response: {left}",
            )
            request.abort()
            return
        except UpstreamCut as error:
            # Headers are gone already: all that is left is to end the client's answer.
            log.warning("llama-server at %s failed mid-response: %s", upstream, error)
            self._report(
                exchange,
                answer.status,
                Failure.UPSTREAM_CUT,
                f"upstream failed mid-response: {error}",
            )
            request.abort()
            return
        self._report(exchange, answer.status)

    async def _relay_whole(
        self,
        exchange: _Exchange,
        connection: UpstreamConnection,
        answer: AnswerHead,
        upstream: str,
    ) -> Answer:
        """A short answer of known length, read whole and sent in one write."""
        try:
            body = await connection.whole()
        except UpstreamCut as error:
            return self._upstream_failed(exchange, upstream, error)
        self._count_prompt(exchange, from_body(body))
        headers = end_to_end(answer.headers, without=CONTENT_LENGTH)
        exchange.bytes_sent = len(body)
        self._report(exchange, answer.status)
        return Answer(answer.status, headers, body, reason=answer.reason)

    def _relay_head(self, exchange: _Exchange, answer: AnswerHead) -> Answer:
        """The answer to a HEAD: the headers, `Content-Length` included, and no body."""
        headers = end_to_end(answer.headers)
        length = None
        for name, value in headers:
            if name.lower() == "content-length" and value.isdigit():
                length = int(value)
        headers = [(name, value) for name, value in headers if name.lower() != "content-length"]
        self._report(exchange, answer.status)
        return Answer(answer.status, headers, reason=answer.reason, length=length or 0)

    def _upstream_failed(self, exchange: _Exchange, upstream: str, error: BaseException) -> Answer:
        message = (
            f"Request to llama.cpp server at {upstream} failed: {error or type(error).__name__}"
        )
        log.warning("%s", message)
        return self._refuse(exchange, 502, Failure.UPSTREAM_FAILED, message)

    def _body_too_slow(self, exchange: _Exchange) -> Answer:
        request = exchange.request
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
        answer = self._refuse(
            exchange, 408, Failure.BODY_TIMEOUT, message, error_type="invalid_request_error"
        )
        # The rest of the body may still come: the connection cannot carry another request.
        return Answer(answer.status, answer.headers, answer.body, close=True)

    def _body_too_large(self, exchange: _Exchange) -> Answer:
        request = exchange.request
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
        answer = self._refuse(exchange, 413, Failure.BODY_TOO_LARGE, message)
        # The rest of the body is not read: the connection cannot carry another request.
        return Answer(answer.status, answer.headers, answer.body, close=True)

    def _upstream_head(
        self, exchange: _Exchange, upstream: str, body: bytes, *, closing: bool
    ) -> bytes:
        """The request line and headers sent to `upstream`, as bytes: the client's end-to-end
        headers (values as it sent them), with what the proxy sets itself (`SET_UPSTREAM`).

        The body was read whole (and a router's model may have been renamed in it:
        `Dispatch.rename_to`): it goes with its length, and needs no `100 Continue`.
        `closing`: the request says `Connection: close`.
        """
        request = exchange.request
        sent = request.headers
        lines = [f"{request.method} {request.target} HTTP/1.1"]
        lines.extend(f"{name}: {value}" for name, value in end_to_end(sent, without=SET_UPSTREAM))
        host = sent.get("Host")
        lines.append(
            f"Host: {upstream if self.settings.rewrite_host_header or host is None else host}"
        )
        previous, peer = sent.get("X-Forwarded-For"), request.remote
        if peer:
            lines.append(
                f"X-Forwarded-For: {previous}, {peer}" if previous else f"X-Forwarded-For: {peer}"
            )
        elif previous:
            lines.append(f"X-Forwarded-For: {previous}")
        lines.append(f"{REQUEST_ID}: {exchange.request_id}")
        if body or request.body_exists or request.method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body)}")
        if closing:
            lines.append("Connection: close")
        lines += ("", "")
        return "\r\n".join(lines).encode("utf-8", "surrogateescape")

    def _count_prompt(self, exchange: _Exchange, tokens: AnswerTimings | None) -> None:
        dispatch = exchange.dispatch
        if tokens is not None and dispatch is not None:
            needs = exchange.needs
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
        exchange: _Exchange,
        status: int,
        failure: Failure,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        error_type: str | None = None,
        openai_code: str | None = None,
    ) -> Answer:
        """An error answered by the balancer itself, reported as `failure` (in OpenAI's shape
        when it has an `openai_code`, else llama.cpp's)."""
        if openai_code is not None:
            error = {
                "message": message,
                "type": "invalid_request_error",
                "param": "model",
                "code": openai_code,
            }
            body = msgspec.json.encode({"error": error})
        else:
            body = error_body(status, message, error_type)
        exchange.bytes_sent = len(body)
        self._report(exchange, status, failure, message)
        return Answer(status, [JSON, *(headers or {}).items()], body)

    def _report(
        self,
        exchange: _Exchange,
        status: int,
        failure: Failure | None = None,
        error: str | None = None,
    ) -> None:
        if self.on_outcome is None or exchange.reported:
            return
        exchange.reported = True
        request = exchange.request
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
                needs=exchange.needs,
                dispatch=exchange.dispatch,
            )
        )


def _query_model(query: str) -> str | None:
    """The `model` of a query string (`model=X&...`), percent-decoded, if any."""
    if "model=" not in query:
        return None
    for field in query.split("&"):
        name, _, value = field.partition("=")
        if unquote_plus(name) == "model":
            return unquote_plus(value)
    return None


CONTENT_LENGTH = frozenset({"content-length"})
"""What an answer the proxy frames itself (`Answer`, or a relayed stream) does not pass on."""

SET_UPSTREAM = frozenset(
    {"host", "x-forwarded-for", REQUEST_ID.lower(), "content-length", "expect"}
)
"""Request headers the proxy sets itself on the way to llama-server (`Host` where it is
rewritten or missing, `X-Forwarded-For` with the client's address, the request id, the body's
length), or drops (`Expect`: the body is read already)."""


def end_to_end(
    headers: MultiMapping[str] | list[tuple[str, str]], *, without: frozenset[str] = frozenset()
) -> list[tuple[str, str]]:
    """The headers a proxy passes on: not the hop-by-hop ones, nor those the `Connection`
    header names as hop-by-hop for this connection (RFC 9110, 7.6.1), nor those (lowercase)
    in `without`."""
    kept: list[tuple[str, str]] = []
    named: set[str] = set()
    for name, value in headers if isinstance(headers, list) else headers.items():
        lowered = name.lower()
        if lowered in HOP_BY_HOP:
            if lowered == "connection":
                named.update(token.strip().lower() for token in value.split(","))
        elif lowered not in without:
            kept.append((name, value))
    named -= HOP_BY_HOP
    if named:
        # Rare: a header named in `Connection` that is not hop-by-hop by itself.
        kept = [(name, value) for name, value in kept if name.lower() not in named]
    return kept


@dataclass(slots=True)
class _Exchange:
    """One request as the proxy handles it: what its outcome will say, filled in as it goes.

    Attributes:
        request: the client's request.
        request_id: its id (`X-Request-Id`).
        started: when it arrived (`time.perf_counter`: the event loop's clock is in whole
            milliseconds under uvloop, too coarse for a proxy's own cost).
        needs: what it needs from the fleet, once its body is read.
        dispatch: where the fleet sent it, once it has a slot.
        bytes_received: the request body's size, once read.
        upstream: the llama-server it was last sent to.
        waited: seconds in the buffer before its slot.
        first_byte: seconds from arrival to the upstream's response headers.
        status: the status sent to the client, once the headers are gone.
        bytes_sent: response body bytes written to the client.
        event_stream: whether the answer is an event stream (its content type says so), once
            its head is in: what flows to the client token by token.
        connection_reused: whether the upstream answered on a kept-alive connection.
        retried: whether a kept-alive connection failed first and it was sent again.
        reported: whether its outcome was reported (it is, exactly once).
    """

    request: ClientRequest
    request_id: str
    started: float
    needs: RequestNeeds | None = None
    dispatch: Dispatch | None = None
    bytes_received: int = 0
    upstream: str | None = None
    waited: float = 0.0
    first_byte: float | None = None
    status: int | None = None
    bytes_sent: int = 0
    event_stream: bool = False
    connection_reused: bool = False
    retried: bool = False
    reported: bool = False

    @property
    def asked_for_stream(self) -> bool:
        """Whether the request asked for a stream (`"stream": true`): it goes upstream with
        `Connection: close`. Whether one came back is `event_stream`."""
        return self.needs is not None and self.needs.streaming


class UpstreamRefused(Exception):
    """The upstream refused the TCP connection: nothing was sent, so trying elsewhere is safe."""
