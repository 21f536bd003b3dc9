"""Kept-alive connections to a real llama-server: when it closes them, and Rower never failing.

llama-server (this build) says `Keep-Alive: timeout=5, max=100` but closes the connection after
every streamed answer, and closes one idle for 5 s: a client that sends on such a connection
gets no answer ("Server disconnected"). The first test pins that with raw sockets; the second
sends mixed streamed and non-streamed requests with idle gaps around those 5 s through the
balancer, which keeps connections alive where it can, and sees every request answered.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from typing import Any

import aiohttp

from tests.e2e.real_llama_server import LlamaServerFactory
from tests.integration.fleet import Fleet

PLAIN = {"prompt": "Hello", "n_predict": 8}
STREAMED = {**PLAIN, "stream": True}


def raw_request(body: dict[str, Any]) -> bytes:
    payload = json.dumps(body).encode()
    return (
        b"POST /completion HTTP/1.1\r\nHost: llama\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload)
    )


def read_answer(sock: socket.socket) -> bytes:
    """One whole HTTP answer (by its length or its last chunk), or what came before EOF."""
    data = b""
    while True:
        head, _, body = data.partition(b"\r\n\r\n")
        lowered = head.lower()
        if b"transfer-encoding: chunked" in lowered and body.endswith(b"0\r\n\r\n"):
            return data
        if b"content-length:" in lowered:
            length = int(lowered.split(b"content-length:")[1].split(b"\r\n")[0])
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


def answered_again(sock: socket.socket) -> bool:
    """Whether a second request on `sock` gets an answer (False: closed, as it arrived)."""
    try:
        sock.sendall(raw_request(PLAIN))
        return read_answer(sock).startswith(b"HTTP/1.1 200")
    except ConnectionError:
        return False


def test_llama_server_closes_after_a_stream_and_after_5_s_idle(
    llama_server: LlamaServerFactory,
) -> None:
    server = llama_server(slots=1)
    address = ("127.0.0.1", server.port)
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw_request(STREAMED))
        answer = read_answer(sock)
        assert b"Keep-Alive: timeout=5, max=100" in answer
        assert not answered_again(sock), "a reuse after a stream was answered"
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(raw_request(PLAIN))
        assert b"Keep-Alive: timeout=5" in read_answer(sock)
        assert answered_again(sock), "a reuse after an answer with a length was refused"
        idle_since = time.monotonic()
        sock.settimeout(2.5)
        try:
            closed_early = sock.recv(1) == b""
        except TimeoutError:
            closed_early = False
        assert not closed_early, "closed before 2.5 s idle"
        sock.settimeout(10)
        assert sock.recv(1) == b"", "still open after idling"
        assert 4.5 < time.monotonic() - idle_since < 7.0


async def test_mixed_requests_with_idle_gaps_through_rower_never_fail(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer("--metrics-endpoint-enable", "--buffered-request-timeout", "60000")
    server = llama_server(slots=2)
    fleet.agent(server)
    fleet.wait_agents(1)
    rounds = [[PLAIN, PLAIN, STREAMED, PLAIN, STREAMED, STREAMED, PLAIN]] * 4
    concurrently = [PLAIN, STREAMED, PLAIN, PLAIN]
    gaps = [0.0, 2.5, 5.3, 5.3]  # under Rower's 2 s expiry, between it and 5 s, past 5 s
    answers: list[tuple[int, bytes]] = []
    async with aiohttp.ClientSession() as session:

        async def send(body: dict[str, Any]) -> tuple[int, bytes]:
            async with session.post(fleet.proxy + "/completion", json=body) as answer:
                return answer.status, await answer.read()

        for gap, requests in zip(gaps, rounds, strict=True):
            await asyncio.sleep(gap)
            for body in requests:
                answers.append(await send(body))
            answers.extend(await asyncio.gather(*(send(body) for body in concurrently)))
    assert [status for status, _ in answers] == [200] * len(answers), answers
    for _, body in answers:
        assert b'"stop":true' in body or b'"stop": true' in body, body[-300:]
    metrics = {
        line.split()[0]: float(line.split()[1])
        for line in get_text(fleet.management + "/metrics").splitlines()
        if line.startswith("rower_upstream_")
    }
    assert metrics["rower_upstream_errors_total"] == 0
    # Connections were kept and reused after the answers with a length.
    assert metrics["rower_upstream_connections_reused_total"] > 0


def get_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.read().decode())
