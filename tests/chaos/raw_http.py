"""HTTP as an attacker speaks it: raw bytes over loopback, answers read back without fixing up.

`exchange` sends bytes as given and reads what comes back; `RecordingRelay` sits between the
balancer and a server and keeps every byte the balancer sent through it, so a test sees exactly
what reached llama-server, request by request, on whatever connections the balancer used.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tests.processes import free_port

READ_WAIT = 5.0
"""Longest wait for an answer, in seconds, unless a test says otherwise."""


@dataclass
class Answer:
    """One HTTP response as it came off the wire."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    version: str

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)

    def error(self) -> dict[str, Any]:
        """The llama.cpp-shaped error object of the body; fails if the body is not one."""
        error = json.loads(self.body)["error"]
        assert set(error) == {"code", "message", "type"}, self.body
        assert error["code"] == self.status, self.body
        return dict(error)


@dataclass
class Exchange:
    """What one connection saw: the answers read, and whether the server closed it after."""

    answers: list[Answer] = field(default_factory=list)
    closed: bool = False
    """The server ended the connection (EOF or reset) after the last answer read."""
    trailing: bytes = b""
    """Bytes after the last answer that are not an answer (should be none)."""

    @property
    def first(self) -> Answer:
        assert self.answers, "no answer at all"
        return self.answers[0]


async def exchange(
    port: int,
    data: bytes | Iterable[bytes],
    *,
    answers: int = 1,
    wait: float = READ_WAIT,
    close_wait: float = 1.0,
    head_only: bool = False,
) -> Exchange:
    """Send `data` on a new connection to 127.0.0.1:`port`; read up to `answers` answers.

    Each answer may take `wait` seconds; after the last one, the server has `close_wait`
    seconds to close the connection for `closed` to be true. The client closes it at the end.
    `head_only`: the answers have no body whatever their headers say (answers to HEAD).
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    seen = Exchange()
    try:
        with contextlib.suppress(ConnectionError):
            for piece in [data] if isinstance(data, bytes) else data:
                writer.write(piece)
                await writer.drain()
        try:
            for _ in range(answers):
                answer = await asyncio.wait_for(read_answer(reader, head_only=head_only), wait)
                if answer is None:
                    seen.closed = True
                    return seen
                seen.answers.append(answer)
            seen.trailing = await asyncio.wait_for(reader.read(), close_wait)
            seen.closed = True
        except (TimeoutError, asyncio.IncompleteReadError):
            pass
        except ConnectionError:
            seen.closed = True
        return seen
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def read_answer(reader: asyncio.StreamReader, *, head_only: bool = False) -> Answer | None:
    """The next response on `reader`, or None if the connection ended before one began."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as error:
        if not error.partial:
            return None
        raise
    lines = head.decode("latin-1").split("\r\n")
    version, status, *_ = lines[0].split(" ", 2)
    headers = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in lines[1:] if line)
    ]
    answer = Answer(int(status), headers, b"", version)
    if head_only or answer.status in (204, 304) or 100 <= answer.status < 200:
        return answer
    length = answer.header("content-length")
    if length is not None:
        answer.body = await reader.readexactly(int(length))
    elif (answer.header("transfer-encoding") or "").lower() == "chunked":
        answer.body = await _read_chunked(reader)
    else:
        answer.body = await reader.read()
    return answer


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            while (await reader.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)


@dataclass(frozen=True)
class RelayedRequest:
    """One request head (and its body) that went through the relay to the server."""

    method: str
    target: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        return next((v for k, v in self.headers if k == name.lower()), None)


def split_requests(data: bytes) -> tuple[list[RelayedRequest], bytes]:
    """The requests in what one connection carried, and any bytes that are not one."""
    requests: list[RelayedRequest] = []
    rest = data
    while rest:
        end = rest.find(b"\r\n\r\n")
        if end < 0:
            break
        lines = rest[:end].decode("latin-1").split("\r\n")
        method, target, _ = [*lines[0].split(" ", 2), "", ""][:3]
        headers = [
            (name.strip().lower(), value.strip())
            for name, _, value in (line.partition(":") for line in lines[1:])
        ]
        fields = dict(headers)
        rest = rest[end + 4 :]
        if fields.get("transfer-encoding", "").lower() == "chunked":
            body, rest = _decode_chunked(rest)
        else:
            length = int(fields.get("content-length", "0"))
            body, rest = rest[:length], rest[length:]
        requests.append(RelayedRequest(method, target, headers, body))
    return requests, rest


def _decode_chunked(data: bytes) -> tuple[bytes, bytes]:
    body = bytearray()
    while True:
        line, _, data = data.partition(b"\r\n")
        size = int(line.split(b";")[0], 16)
        if size == 0:
            while True:
                trailer, _, data = data.partition(b"\r\n")
                if not trailer:
                    return bytes(body), data
        body += data[:size]
        data = data[size + 2 :]


class RecordingRelay:
    """A TCP relay to 127.0.0.1:`upstream_port` that records what clients send through it.

    It runs its own event loop in a thread, so it serves while tests block or start their own
    loops. Each accepted connection's client-to-server bytes are kept, in order of arrival.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._lock = threading.Lock()
        self._connections: list[bytearray] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._server = asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(5)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def connections(self) -> list[bytes]:
        """What each connection so far carried toward the server."""
        with self._lock:
            return [bytes(c) for c in self._connections]

    def requests(self) -> dict[tuple[int, int], RelayedRequest]:
        """Every request the server got, by (connection, position on it).

        Call it when nothing is in flight. Each one must be a request the balancer made: it
        adds `X-Forwarded-For` to all it relays, so a request without one was read out of
        bytes the balancer took for something else (a body): smuggled. Bytes that are no whole
        request are smuggled too.
        """
        found: dict[tuple[int, int], RelayedRequest] = {}
        for index, data in enumerate(self.connections()):
            requests, rest = split_requests(data)
            assert not rest, f"bytes that are no request on an upstream connection: {data!r}"
            for position, request in enumerate(requests):
                assert request.header("x-forwarded-for"), f"smuggled to the server: {request}"
                found[index, position] = request
        return found

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(TimeoutError, OSError):  # teardown only: the checks ran already
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _start(self) -> asyncio.Server:
        return await asyncio.start_server(self._relay, "127.0.0.1", self.port)

    async def _relay(self, client: asyncio.StreamReader, to_client: asyncio.StreamWriter) -> None:
        record = bytearray()
        with self._lock:
            self._connections.append(record)
        try:
            server, to_server = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            to_client.close()
            return

        async def pump(
            source: asyncio.StreamReader, sink: asyncio.StreamWriter, keep: bytearray | None
        ) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await source.read(65536):
                    if keep is not None:
                        with self._lock:
                            keep.extend(data)
                    sink.write(data)
                    await sink.drain()
            with contextlib.suppress(OSError):
                if sink.can_write_eof():
                    sink.write_eof()

        try:
            await asyncio.gather(pump(client, to_server, record), pump(server, to_client, None))
        finally:
            to_server.close()
            to_client.close()
