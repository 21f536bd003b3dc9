"""The public listener's own HTTP/1.1 server, spoken to with raw sockets over loopback.

What a client connection may do besides one request and one answer: pipeline requests, send
a chunked body and go on, wait for `100 Continue`, keep an HTTP/1.0 connection alive. The
balancer runs in this process (`test_proxy_in_process`'s rig) in front of its fake
llama-server.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.chaos.raw_http import Answer, read_answer
from tests.integration.test_proxy_in_process import Proxy, running_proxy

COMPLETION = b'{"prompt": "x"}'


@pytest.fixture
async def proxy(tmp_path: Path) -> AsyncIterator[Proxy]:
    async with running_proxy(tmp_path) as started:
        started.register(started.upstream.addr)
        yield started


async def connect(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = proxy.url[len("http://") :].rsplit(":", 1)
    return await asyncio.open_connection(host, int(port))


async def answer(reader: asyncio.StreamReader) -> Answer:
    read = await asyncio.wait_for(read_answer(reader), 5)
    assert read is not None, "the connection closed before an answer"
    return read


def post(body: bytes, *extra: bytes) -> bytes:
    return (
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + b"".join(line + b"\r\n" for line in extra)
        + b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )


MODELS = b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"


async def test_pipelined_requests_are_answered_in_order(proxy: Proxy) -> None:
    reader, writer = await connect(proxy)
    try:
        writer.write(post(COMPLETION, b"X-Request-Id: one") + MODELS + post(COMPLETION))
        first, second, third = [await answer(reader) for _ in range(3)]
    finally:
        writer.close()
    assert [first.status, second.status, third.status] == [200, 200, 200]
    assert first.header("x-request-id") == "one"
    assert json.loads(first.body)["content"] == "hi"
    assert "data" in json.loads(second.body)
    assert len(proxy.upstream.seen) == 2


async def test_a_chunked_body_is_decoded_and_the_connection_goes_on(proxy: Proxy) -> None:
    reader, writer = await connect(proxy)
    try:
        writer.write(
            b"POST /completion HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            b'5\r\n{"pro\r\n'
        )
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'9\r\nmpt": "x"\r\n1\r\n}\r\n0\r\n\r\n' + MODELS)
        first, second = await answer(reader), await answer(reader)
    finally:
        writer.close()
    assert (first.status, second.status) == (200, 200)
    [seen] = proxy.upstream.seen
    assert seen["Content-Length"] == str(len(COMPLETION))
    assert "Transfer-Encoding" not in seen


async def test_expect_100_continue_is_answered_before_the_body(proxy: Proxy) -> None:
    reader, writer = await connect(proxy)
    try:
        head, _, body = post(COMPLETION, b"Expect: 100-continue").partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        interim = await answer(reader)
        assert interim.status == 100
        writer.write(body)
        final = await answer(reader)
    finally:
        writer.close()
    assert final.status == 200
    assert "Expect" not in proxy.upstream.seen[0]


async def test_an_http_1_0_client_may_keep_its_connection(proxy: Proxy) -> None:
    reader, writer = await connect(proxy)
    try:
        for _ in range(2):
            writer.write(b"GET /v1/models HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            got = await answer(reader)
            assert got.version == "HTTP/1.0"
            assert got.status == 200
            assert got.header("connection") == "keep-alive"
        writer.write(b"GET /v1/models HTTP/1.0\r\n\r\n")
        last = await answer(reader)
        assert last.header("connection") == "close"
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
