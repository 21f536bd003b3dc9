"""`--stream-flush-interval`: a stream's tokens are read from llama-server at most once per
interval and go to the client together; the first token after a quiet interval and the end of
the answer never wait (`stream_pacing`).

The upstream here is scripted step by step from the test, so what the client must (or must
not) have received at each step does not depend on how fast this machine is: the interval is
far longer than any step, or the upstream waits for the client before it goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator
from pathlib import Path

from rower.balancer import stream_pacing
from tests.integration.test_proxy_in_process import (
    STREAM_HEAD,
    Proxy,
    running_proxy,
    sse_chunk,
)

EVENTS = [sse_chunk(f'{{"content":"t{index}","stop":false}}') for index in range(4)]
END = b"0\r\n\r\n"


class SteppedUpstream:
    """One streamed answer, written when the test says: `write(data)` puts bytes on the wire."""

    def __init__(self) -> None:
        self._writer: asyncio.StreamWriter | None = None
        self.connected = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = re.search(rb"Content-Length: (\d+)", head)
        await reader.readexactly(int(length.group(1)) if length else 0)
        self._writer = writer
        self.connected.set()
        await reader.read()  # until the balancer closes its side

    async def write(self, data: bytes) -> None:
        assert self._writer is not None, "the balancer never connected"
        self._writer.write(data)
        await self._writer.drain()

    async def close(self) -> None:
        """As llama-server does after a stream."""
        assert self._writer is not None, "the balancer never connected"
        self._writer.close()


@contextlib.asynccontextmanager
async def stepped(tmp_path: Path, flush_ms: int) -> AsyncIterator[tuple[Proxy, SteppedUpstream]]:
    upstream = SteppedUpstream()
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", 0)
    async with running_proxy(tmp_path, stream_flush_interval=flush_ms / 1000) as proxy:
        proxy.register(f"127.0.0.1:{server.sockets[0].getsockname()[1]}", slots=1)
        try:
            yield proxy, upstream
        finally:
            server.close()


async def open_stream(proxy: Proxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(*proxy.url[7:].split(":"))
    body = b'{"prompt": "x", "stream": true}'
    writer.write(
        b"POST /completion HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    return reader, writer


async def start_answer(
    upstream: SteppedUpstream, reader: asyncio.StreamReader, first: bytes
) -> None:
    """The upstream's head and first event; the client reads the balancer's head."""
    try:
        await asyncio.wait_for(upstream.connected.wait(), 10)
    except TimeoutError:
        raise AssertionError("the balancer did not connect to the upstream within 10 s") from None
    await upstream.write(STREAM_HEAD + first)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 200"), head


async def read_exactly(reader: asyncio.StreamReader, expected: bytes, what: str) -> None:
    try:
        got = await asyncio.wait_for(reader.readexactly(len(expected)), 10)
    except TimeoutError:
        raise AssertionError(f"{what}: not received within 10 s") from None
    assert got == expected, what


async def nothing_arrives(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        await asyncio.wait_for(reader.read(1), seconds)
    except TimeoutError:
        return True
    return False


def test_this_kernel_lets_reads_wait() -> None:
    # Where it does not, the flag is ignored (with a warning): the tests below would not run.
    assert stream_pacing.reads_can_wait(), "SO_RCVLOWAT is not woken by lowering it here"


async def test_tokens_close_together_wait_and_go_out_with_the_end(tmp_path: Path) -> None:
    async with stepped(tmp_path, flush_ms=60_000) as (proxy, upstream):
        reader, writer = await open_stream(proxy)
        await start_answer(upstream, reader, EVENTS[0])
        await read_exactly(reader, EVENTS[0], "the first token, at once")
        for event in EVENTS[1:]:
            await upstream.write(event)
            await asyncio.sleep(0.02)
        assert await nothing_arrives(reader, 0.3), "tokens within the interval went out early"
        await upstream.write(END)
        await upstream.close()
        # The end does not wait for the interval: llama-server closes the connection after a
        # stream, and the close wakes the balancer; what waited goes out with the end.
        await read_exactly(reader, b"".join(EVENTS[1:]) + END, "the held tokens and the end")
        writer.close()
    assert proxy.lines()[-1]["failure"] is None


async def test_a_token_after_a_quiet_interval_goes_out_at_once(tmp_path: Path) -> None:
    async with stepped(tmp_path, flush_ms=50) as (proxy, upstream):
        reader, writer = await open_stream(proxy)
        await start_answer(upstream, reader, EVENTS[0])
        await read_exactly(reader, EVENTS[0], "the first token")
        await asyncio.sleep(0.2)
        # The upstream waits for the client here: a token held until the end never comes.
        await upstream.write(EVENTS[1])
        await read_exactly(reader, EVENTS[1], "a token after a quiet interval")
        await upstream.write(EVENTS[2])
        await upstream.write(EVENTS[3])
        # Inside the interval: held, then read at its end without waiting for the answer's.
        await read_exactly(reader, EVENTS[2] + EVENTS[3], "tokens held for the interval")
        await upstream.write(END)
        await upstream.close()
        await read_exactly(reader, END, "the end")
        writer.close()
    assert proxy.lines()[-1]["failure"] is None
