"""Oversized input gets a clear 4xx and the balancer lives on; the proxy cannot be steered."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp

from tests.chaos.invariants import settled
from tests.integration.fleet import Fleet
from tests.processes import free_port

STATUS = {
    "external_llamacpp_addr": "127.0.0.1:9",
    "slots_idle": 1,
    "slots_total": 1,
    "monitoring_interval_ms": 60000,
}


async def raw(port: int, request: bytes) -> tuple[int, bytes]:
    """Send raw bytes; returns the answer's status and body (connection closed after)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        body = await asyncio.wait_for(reader.readexactly(length), 5)
        return int(head.split(b" ", 2)[1]), body
    finally:
        writer.close()


def error_of(body: bytes) -> dict[str, object]:
    error = json.loads(body)["error"]
    assert set(error) == {"code", "message", "type"}
    return dict(error)


async def test_limits_answer_clear_4xx_and_the_process_lives_on(fleet: Fleet) -> None:
    fleet.balancer(
        "--max-request-body-bytes",
        "1000",
        "--max-header-bytes",
        "2000",
        "--max-status-line-bytes",
        "5000",
        "--max-agents",
        "1",
    )
    sim = fleet.sim(slots=1)
    fleet.agent(sim)
    fleet.wait_agents(1)
    proxy, management = fleet.proxy_port, fleet.management_port
    async with aiohttp.ClientSession() as session:
        # Body: Content-Length over the limit, and chunked bodies that grow past it.
        big = {"prompt": "x" * 2000}
        async with session.post(fleet.proxy + "/completion", json=big) as answer:
            assert answer.status == 413
            assert error_of(await answer.read())["code"] == 413

        async def chunks(total: int) -> AsyncIterator[bytes]:
            yield b'{"prompt": "'
            for _ in range(total // 100):
                yield b"y" * 100
            yield b'", "n_predict": 2}'

        async with session.post(fleet.proxy + "/completion", data=chunks(3000)) as answer:
            assert answer.status == 413
        async with session.post(fleet.proxy + "/completion", data=chunks(300)) as answer:
            assert answer.status == 200, await answer.text()
            assert (await answer.json())["tokens_predicted"] == 2
        assert sim.counters()["requests_total"] == 1

        # Agents: a line over the limit, and one agent too many.
        line = json.dumps({**STATUS, "agent_name": "z" * 4000, "model": "z" * 4000})
        async with session.post(
            fleet.management + "/api/v1/agent_status_update/too-long", data=line + "\n"
        ) as answer:
            assert answer.status == 413
        async with session.post(
            fleet.management + "/api/v1/agent_status_update/one-too-many",
            data=json.dumps(STATUS) + "\n",
        ) as answer:
            assert answer.status == 429
            assert "--max-agents" in error_of(await answer.read())["message"]  # type: ignore[operator]
        assert len(fleet.agents_view()["agents"]) == 1

    # Header field, request line, and header count limits, on both listeners.
    long_header = b"X-Big: " + b"h" * 3000 + b"\r\n"
    for port in (proxy, management):
        status, body = await raw(
            port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + long_header + b"\r\n"
        )
        assert status == 431
        assert error_of(body)["code"] == 431
        status, body = await raw(port, b"GET /" + b"u" * 3000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status == 431
        many = b"".join(b"X-H%d: v\r\n" % i for i in range(200))
        status, _ = await raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
        assert status == 431

    async with aiohttp.ClientSession() as session:
        async with session.get(fleet.management + "/health") as answer:
            assert answer.status == 200
        async with session.post(fleet.proxy + "/completion", json={"prompt": "ok"}) as answer:
            assert answer.status == 200
    await settled(fleet)


async def test_the_proxy_only_connects_to_reported_servers(fleet: Fleet) -> None:
    canary_hits = 0

    async def canary(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal canary_hits
        canary_hits += 1
        writer.close()

    canary_port = free_port()
    server = await asyncio.start_server(canary, "127.0.0.1", canary_port)
    try:
        fleet.balancer()
        sim = fleet.sim(slots=1)
        fleet.agent(sim)
        fleet.wait_agents(1)
        target = f"127.0.0.1:{canary_port}".encode()
        attempts = [
            b"GET http://" + target + b"/v1/models HTTP/1.1\r\nHost: " + target + b"\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: " + target + b"\r\n\r\n",
            b"GET //" + target + b"/v1/models HTTP/1.1\r\nHost: x\r\n\r\n",
            b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: " + target + b"\r\n\r\n",
        ]
        for attempt in attempts:
            status, _ = await raw(fleet.proxy_port, attempt)
            assert status in (200, 404), attempt
        # /slots in every spelling stays blocked.
        spellings = (b"/slots", b"/slots/0?action=save", b"//slots", b"/%73lots", b"/./slots")
        for path in (*spellings, b"/x/../slots", b"/v1/%2e%2e/slots", b"/slots/."):
            status, body = await raw(
                fleet.proxy_port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            assert status == 403, path
            assert error_of(body)["code"] == 403
        assert canary_hits == 0
    finally:
        server.close()
        await server.wait_closed()
    await settled(fleet)
