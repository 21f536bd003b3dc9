"""The reverse proxy in this process, in front of a fake llama-server that records what it got.

A whole `Balancer` (both listeners, metrics, the access log in a file) runs in the test's event
loop; the upstream is registered straight into the gate, as an agent's report would. What is
checked: request ids (kept, made, replaced; sent upstream; returned on every answer, the
balancer's own errors included), W3C trace headers passed through, one access log line per
request with its reason, and a client that leaves counted as itself, not as an upstream error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDictProxy

from rower.addresses import Address
from rower.balancer.service import Balancer
from rower.balancer.settings import BalancerSettings
from rower.status import StatusUpdate
from tests.integration.fleet import until
from tests.processes import free_port

NEW_ID = re.compile(r"[0-9a-f]{32}")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
TRACESTATE = "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE"


@dataclass
class FakeLlamaServer:
    """Answers `/completion` as llama-server does (a stream when asked); keeps the headers."""

    port: int = field(default_factory=free_port)
    seen: list[CIMultiDictProxy[str]] = field(default_factory=list)
    events: int = 5
    event_gap: float = 0.0

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def completion(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(request.headers)
        body = await request.json()
        if not body.get("stream"):
            return web.json_response({"content": "hi", "tokens_predicted": 1})
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for index in range(self.events):
            await response.write(f'data: {{"content": "t{index}"}}\n\n'.encode())
            await asyncio.sleep(self.event_gap)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response


@dataclass
class Proxy:
    """The balancer under test, and where its access log goes."""

    balancer: Balancer
    upstream: FakeLlamaServer
    access_log: Path

    @property
    def url(self) -> str:
        return f"http://{self.balancer.settings.reverseproxy_addr}"

    @property
    def management(self) -> str:
        return f"http://{self.balancer.settings.management_addr}"

    def register(self, addr: str, *, slots: int = 2) -> None:
        """What an agent's report for the server at `addr` would do."""
        status = StatusUpdate(
            external_llamacpp_addr=addr,
            slots_idle=slots,
            slots_total=slots,
            monitoring_interval_ms=60_000,
        )
        self.balancer.gate.report(f"agent-{addr}", status)

    def lines(self) -> list[dict[str, Any]]:
        """The access log so far, one JSON object a line."""
        text = self.access_log.read_text() if self.access_log.exists() else ""
        return [json.loads(line) for line in text.splitlines()]

    async def metric(self, name: str) -> float:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.management + "/metrics") as answer,
        ):
            text = await answer.text()
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise AssertionError(f"no {name} in the balancer's metrics:\n{text}")


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    """A balancer and a fake llama-server, with the default settings."""
    async with running_proxy(tmp_path) as started:
        yield started


@contextlib.asynccontextmanager
async def running_proxy(tmp_path: Path, **options: Any) -> AsyncIterator[Proxy]:
    """A balancer with `options` as settings, and a fake llama-server."""
    upstream = FakeLlamaServer()
    app = web.Application()
    app.router.add_post("/completion", upstream.completion)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", upstream.port).start()
    access_log = tmp_path / "access.log"
    settings = BalancerSettings(
        management_addr=Address.parse(f"127.0.0.1:{free_port()}"),
        reverseproxy_addr=Address.parse(f"127.0.0.1:{free_port()}"),
        metrics_endpoint_enable=True,
        access_log=str(access_log),
        log_format="json",
        **options,
    )
    balancer = Balancer(settings)
    await balancer.start()
    try:
        yield Proxy(balancer, upstream, access_log)
    finally:
        await balancer.stop()
        await runner.cleanup()


async def post(
    proxy: Proxy, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/completion", json=body, headers=headers) as answer,
    ):
        return answer.status, answer.headers, await answer.read()


async def test_a_clients_request_id_goes_upstream_and_comes_back(proxy: Proxy) -> None:
    proxy.register(proxy.upstream.addr)
    status, headers, _ = await post(proxy, {"prompt": "x"}, {"X-Request-Id": "client-id 42"})
    assert status == 200
    assert headers["X-Request-Id"] == "client-id 42"
    assert proxy.upstream.seen[-1]["X-Request-Id"] == "client-id 42"
    assert proxy.lines()[-1]["request_id"] == "client-id 42"


@pytest.mark.parametrize("sent", [None, "x" * 129, "caf\u00e9"])
async def test_a_missing_or_unfit_request_id_is_replaced(proxy: Proxy, sent: str | None) -> None:
    proxy.register(proxy.upstream.addr)
    headers = None if sent is None else {"X-Request-Id": sent}
    status, answer_headers, _ = await post(proxy, {"prompt": "x"}, headers)
    assert status == 200
    made = answer_headers["X-Request-Id"]
    assert NEW_ID.fullmatch(made)
    assert proxy.upstream.seen[-1].getall("X-Request-Id") == [made]
    assert proxy.lines()[-1]["request_id"] == made


async def test_streams_carry_the_request_id_too(proxy: Proxy) -> None:
    proxy.register(proxy.upstream.addr)
    status, headers, body = await post(
        proxy, {"prompt": "x", "stream": True}, {"X-Request-Id": "s1"}
    )
    assert status == 200
    assert headers["X-Request-Id"] == "s1"
    assert body.endswith(b"data: [DONE]\n\n")
    line = proxy.lines()[-1]
    assert (line["request_id"], line["status"], line["failure"]) == ("s1", 200, None)
    assert line["bytes_out"] == len(body)


async def test_w3c_trace_headers_pass_through_untouched(proxy: Proxy) -> None:
    proxy.register(proxy.upstream.addr)
    sent = {"traceparent": TRACEPARENT, "tracestate": TRACESTATE}
    status, _, _ = await post(proxy, {"prompt": "x"}, sent)
    assert status == 200
    seen = proxy.upstream.seen[-1]
    assert (seen["traceparent"], seen["tracestate"]) == (TRACEPARENT, TRACESTATE)


async def test_headers_the_connection_header_names_stay_on_this_hop(proxy: Proxy) -> None:
    # RFC 9110 7.6.1: a proxy drops the headers `Connection` lists, as well as the hop-by-hop
    # ones it knows.
    proxy.register(proxy.upstream.addr)
    sent = {"Connection": "keep-alive, X-Hop", "X-Hop": "secret", "X-End": "kept"}
    status, _, _ = await post(proxy, {"prompt": "x"}, sent)
    assert status == 200
    seen = proxy.upstream.seen[-1]
    assert "X-Hop" not in seen
    assert seen["X-End"] == "kept"


async def test_a_served_request_is_one_access_log_line_with_every_field(proxy: Proxy) -> None:
    proxy.register(proxy.upstream.addr)
    body = {"prompt": "x", "model": "tiny"}
    status, _, answer = await post(proxy, body, {"X-Request-Id": "r1"})
    assert status == 200
    [line] = proxy.lines()
    assert line["logger"] == "rower.access"
    assert line["message"] == "POST /completion 200"
    assert line["client"] == "127.0.0.1"
    assert (line["method"], line["path"], line["status"]) == ("POST", "/completion", 200)
    assert line["model"] == "tiny"
    assert line["upstream"] == proxy.upstream.addr
    assert line["bytes_in"] == len(json.dumps(body))
    assert line["bytes_out"] == len(answer)
    assert 0 <= line["wait_ms"] <= line["ttfb_ms"] <= line["duration_ms"]
    assert line["failure"] is None


async def test_429_carries_the_request_id_and_is_logged_as_buffer_full(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, max_buffered_requests=0) as proxy:
        status, headers, _ = await post(proxy, {"prompt": "x"}, {"X-Request-Id": "busy"})
        assert status == 429
        assert headers["X-Request-Id"] == "busy"
        line = proxy.lines()[-1]
        assert (line["status"], line["failure"], line["request_id"]) == (429, "buffer_full", "busy")
        assert line["upstream"] is None


async def test_504_carries_the_request_id_and_is_logged_as_buffer_timeout(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, buffered_request_timeout=0.2) as proxy:
        status, headers, _ = await post(proxy, {"prompt": "x"})
        assert status == 504
        assert NEW_ID.fullmatch(headers["X-Request-Id"])
        line = proxy.lines()[-1]
        assert (line["status"], line["failure"]) == (504, "buffer_timeout")
        assert line["request_id"] == headers["X-Request-Id"]
        assert 200 <= line["wait_ms"] <= line["duration_ms"]
        assert line["upstream"] is None


async def test_502_carries_the_request_id_and_is_logged_as_refused(proxy: Proxy) -> None:
    for _ in range(3):  # each refuses, is quarantined, and the next is tried
        proxy.register(f"127.0.0.1:{free_port()}")
    status, headers, _ = await post(proxy, {"prompt": "x"}, {"X-Request-Id": "gone"})
    assert status == 502
    assert headers["X-Request-Id"] == "gone"
    line = proxy.lines()[-1]
    assert (line["status"], line["failure"]) == (502, "upstreams_refused")
    assert await proxy.metric("rower_upstream_errors_total") == 1


async def test_413_carries_the_request_id_and_is_logged(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, max_request_body_bytes=100) as proxy:
        proxy.register(proxy.upstream.addr)
        status, headers, _ = await post(proxy, {"prompt": "x" * 200}, {"X-Request-Id": "big"})
        assert status == 413
        assert headers["X-Request-Id"] == "big"
        line = proxy.lines()[-1]
        assert (line["status"], line["failure"], line["upstream"]) == (413, "body_too_large", None)


async def test_slots_refusal_carries_the_request_id(proxy: Proxy) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.url + "/slots", headers={"X-Request-Id": "peek"}) as answer,
    ):
        assert answer.status == 403
        assert answer.headers["X-Request-Id"] == "peek"
    assert proxy.lines()[-1]["failure"] == "slots_forbidden"


async def test_a_client_leaving_mid_stream_is_a_client_disconnect(proxy: Proxy) -> None:
    proxy.upstream.events, proxy.upstream.event_gap = 200, 0.01
    proxy.register(proxy.upstream.addr)
    async with aiohttp.ClientSession() as session:
        answer = await session.post(proxy.url + "/completion", json={"prompt": "x", "stream": True})
        assert (await answer.content.readline()).startswith(b"data: ")
        answer.close()
        await until(lambda: len(proxy.lines()) == 1, what="the access log line")
    [line] = proxy.lines()
    assert (line["status"], line["failure"]) == (200, "client_disconnected")
    assert await proxy.metric("rower_client_disconnects_total") == 1
    assert await proxy.metric("rower_upstream_errors_total") == 0
    await until(lambda: proxy.balancer.fleet.requests_in_flight == 0, what="slot given back")


async def test_a_client_leaving_the_buffer_is_logged_as_499(tmp_path: Path) -> None:
    async with running_proxy(tmp_path, buffered_request_timeout=30.0) as proxy:
        async with aiohttp.ClientSession() as session:
            waiting = asyncio.create_task(session.post(proxy.url + "/completion", json={"p": 1}))
            await until(lambda: proxy.balancer.fleet.requests_buffered == 1, what="buffered")
            waiting.cancel()
            await until(lambda: len(proxy.lines()) == 1, what="the access log line")
        [line] = proxy.lines()
        assert (line["status"], line["failure"]) == (499, "client_disconnected")
        assert line["wait_ms"] > 0
        assert await proxy.metric("rower_client_disconnects_total") == 1


@dataclass
class ClosingLlamaServer:
    """A raw HTTP server that closes connections as llama-server does, or worse.

    It answers a JSON body with `Content-Length` and keeps the connection; a request whose body
    asks for a stream gets a chunked event stream, after which the connection is closed a
    moment later whatever came in meanwhile (llama-server closes after every stream, without
    saying `Connection: close`, unless the request said it). With `close_on_reuse`, a second
    request on a connection is never answered: the connection closes as it arrives (a server's
    idle close racing with it). With `close_always`, no request is answered.
    """

    close_on_reuse: bool = False
    close_always: bool = False
    port: int = field(default_factory=free_port)
    connections: int = 0
    requests: list[dict[str, str]] = field(default_factory=list)
    server: asyncio.Server | None = None
    handlers: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        for handler in self.handlers:
            handler.cancel()
        await asyncio.gather(*self.handlers, return_exceptions=True)
        await self.server.wait_closed()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        handler = asyncio.current_task()
        assert handler is not None
        self.handlers.add(handler)
        served = 0
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                lines = head.decode().split("\r\n")
                headers = dict(line.split(": ", 1) for line in lines[1:] if ": " in line)
                body = await reader.readexactly(int(headers.get("Content-Length", "0")))
                self.requests.append(headers)
                if self.close_always or (self.close_on_reuse and served):
                    return
                served += 1
                # As llama-server (cpp-httplib): a request's `Connection: close` is answered.
                closing = headers.get("Connection") == "close"
                keep = b"Connection: close" if closing else b"Keep-Alive: timeout=5, max=100"
                if b'"stream": true' in body or b'"stream":true' in body:
                    event = b'data: {"content":"a"}\n\n'
                    writer.write(
                        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                        b"Transfer-Encoding: chunked\r\n%s\r\n\r\n"
                        b"%x\r\n%s\r\n0\r\n\r\n" % (keep, len(event), event)
                    )
                    await writer.drain()
                    if not closing:
                        await asyncio.sleep(0.2)
                    return
                answer = b'{"content":"hi"}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"%s\r\nContent-Length: %d\r\n\r\n%s" % (keep, len(answer), answer)
                )
                await writer.drain()
                if closing:
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def closing_upstream(proxy: Proxy, **behaviour: bool) -> AsyncIterator[ClosingLlamaServer]:
    """A `ClosingLlamaServer` registered with the proxy's balancer as its only server."""
    upstream = ClosingLlamaServer(**behaviour)
    await upstream.start()
    proxy.register(upstream.addr, slots=1)
    try:
        yield upstream
    finally:
        await upstream.stop()


async def test_a_pool_that_reuses_a_connection_after_a_stream_fails(proxy: Proxy) -> None:
    # The failure kept-alive connections bring, without the proxy's care: aiohttp's own pool.
    async with closing_upstream(proxy) as upstream, aiohttp.ClientSession() as session:
        url = f"http://{upstream.addr}/completion"
        async with session.post(url, json={"stream": True}) as streamed:
            await streamed.read()
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(url, json={"prompt": "x"}) as answer:
                await answer.read()
    assert upstream.connections == 1


async def test_answers_with_a_length_reuse_one_connection(proxy: Proxy) -> None:
    async with closing_upstream(proxy) as upstream:
        for _ in range(3):
            status, _, body = await post(proxy, {"prompt": "x"})
            assert (status, body) == (200, b'{"content":"hi"}')
    assert upstream.connections == 1
    assert await proxy.metric("rower_upstream_connections_reused_total") == 2


async def test_a_stream_is_not_followed_on_its_connection(proxy: Proxy) -> None:
    async with closing_upstream(proxy) as upstream:
        for body in ({"prompt": "x"}, {"stream": True}, {"prompt": "x"}, {"stream": True}):
            status, _, _ = await post(proxy, body)
            assert status == 200
    # Each stream had a connection of its own (the stream relay's), closed after it; the
    # answers with a length shared the pooled one.
    assert upstream.connections == 3
    assert [r.get("Connection") for r in upstream.requests] == [None, "close", None, "close"]
    assert await proxy.metric("rower_upstream_retries_total") == 0
    assert await proxy.metric("rower_upstream_errors_total") == 0


async def test_a_kept_alive_connection_closed_under_a_request_is_retried_once(
    proxy: Proxy,
) -> None:
    async with closing_upstream(proxy, close_on_reuse=True) as upstream:
        for request_id in ("first", "second"):
            status, headers, body = await post(proxy, {"prompt": "x"}, {"X-Request-Id": request_id})
            assert (status, body) == (200, b'{"content":"hi"}')
            assert headers["X-Request-Id"] == request_id
    # The second went out on the kept-alive connection, was closed unanswered, went again.
    assert upstream.connections == 2
    assert [r["X-Request-Id"] for r in upstream.requests] == ["first", "second", "second"]
    assert await proxy.metric("rower_upstream_retries_total") == 1
    assert await proxy.metric("rower_upstream_errors_total") == 0
    assert [line["failure"] for line in proxy.lines()] == [None, None]
    # The slot was held across the retry and given back once.
    assert proxy.balancer.fleet.requests_in_flight == 0


async def test_a_new_connection_that_fails_is_not_retried(proxy: Proxy) -> None:
    async with closing_upstream(proxy, close_always=True) as upstream:
        status, _, body = await post(proxy, {"prompt": "x"})
    assert status == 502
    assert b"failed" in body
    assert len(upstream.requests) == 1  # it may have run there: never sent twice
    assert await proxy.metric("rower_upstream_retries_total") == 0
    assert proxy.lines()[-1]["failure"] == "upstream_failed"


@contextlib.asynccontextmanager
async def scripted_upstream(proxy: Proxy, answer: bytes) -> AsyncIterator[str]:
    """A server that reads one request head and body, writes `answer` whole and closes."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"Content-Length: (\d+)", head)
            await reader.readexactly(int(length.group(1)) if length else 0)
            writer.write(answer)
            await writer.drain()
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    addr = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"
    proxy.register(addr, slots=1)
    try:
        yield addr
    finally:
        server.close()


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def sse_chunk(text: str) -> bytes:
    event = f"data: {text}\n\n".encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


async def test_a_stream_passes_through_with_its_timings(proxy: Proxy) -> None:
    last = json.dumps({"stop": True, "timings": {"prompt_n": 3, "cache_n": 7, "predicted_n": 2}})
    chunks = sse_chunk('{"content":"a","stop":false}') + sse_chunk(last)
    async with scripted_upstream(proxy, STREAM_HEAD + chunks + b"0\r\n\r\n"):
        status, headers, body = await post(proxy, {"prompt": "x", "stream": True})
    assert status == 200
    assert headers["Content-Type"] == "text/event-stream"
    assert body == f'data: {{"content":"a","stop":false}}\n\ndata: {last}\n\n'.encode()
    line = proxy.lines()[-1]
    assert line["failure"] is None
    assert line["bytes_out"] == len(body)
    async with (
        aiohttp.ClientSession() as session,
        session.get(proxy.management + "/metrics") as metrics,
    ):
        text = await metrics.text()
    assert re.search(r"^rower_agent_prompt_tokens_cached_total\{[^}]*\} 7\.0$", text, re.M)


@pytest.mark.parametrize(
    "tail",
    [b"zz\r\n", b"5\r\nabcXY", b""],
    ids=["bad chunk size", "no CRLF after the data", "closed before the last chunk"],
)
async def test_a_stream_that_breaks_is_cut_not_passed_on(proxy: Proxy, tail: bytes) -> None:
    good = sse_chunk('{"content":"a","stop":false}')
    async with (
        scripted_upstream(proxy, STREAM_HEAD + good + tail),
        aiohttp.ClientSession() as session,
        session.post(proxy.url + "/completion", json={"stream": True}) as answer,
    ):
        assert answer.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await answer.read()
    assert proxy.lines()[-1]["failure"] == "upstream_cut"
    assert proxy.balancer.fleet.requests_in_flight == 0


async def test_a_bad_answer_head_is_a_502(proxy: Proxy) -> None:
    async with scripted_upstream(proxy, b"HTTP/1.1 200 OK\r\nX: a\nInjected: b\r\n\r\n"):
        status, _, body = await post(proxy, {"stream": True})
    assert status == 502
    assert b"bad header line" in body or b"control characters" in body
    assert proxy.lines()[-1]["failure"] == "upstream_failed"


@pytest.mark.parametrize("flush_interval", [0.0, 0.005], ids=["token by token", "in batches"])
async def test_a_client_reading_slowly_gets_the_whole_stream(
    tmp_path: Path, flush_interval: float
) -> None:
    # Far more than the transports buffer: reading upstream pauses and resumes (and, in
    # batches, is held and let go by the pacer's ticks meanwhile).
    events = [sse_chunk(f'{{"content":"{index:06d}{"x" * 200}"}}') for index in range(20_000)]
    async with running_proxy(tmp_path, stream_flush_interval=flush_interval) as proxy:
        async with (
            scripted_upstream(proxy, STREAM_HEAD + b"".join(events) + b"0\r\n\r\n"),
            aiohttp.ClientSession() as session,
            session.post(proxy.url + "/completion", json={"stream": True}) as answer,
        ):
            await asyncio.sleep(0.5)
            body = await answer.read()
        assert body.count(b"data: ") == 20_000
        assert body.endswith(b'{"content":"019999' + b"x" * 200 + b'"}\n\n')
        assert proxy.lines()[-1]["failure"] is None


async def test_an_http_1_0_client_gets_the_stream_unchunked(proxy: Proxy) -> None:
    proxy.register(proxy.upstream.addr)
    reader, writer = await asyncio.open_connection(*proxy.url[7:].split(":"))
    body = b'{"prompt": "x", "stream": true}'
    writer.write(
        b"POST /completion HTTP/1.0\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200")
    assert b"chunked" not in head.lower()
    assert payload.startswith(b'data: {"content": "t0"}\n\n')
    assert payload.endswith(b"data: [DONE]\n\n")
