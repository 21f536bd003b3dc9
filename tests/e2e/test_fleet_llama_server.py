"""Rower in front of real llama-servers running the tiny model: the whole path, for real.

While these tests run, a watcher polls every server's `/slots` and `/metrics`: no server may
ever run more tasks than it has slots, or defer a request, while the balancer is its only
client.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.e2e.real_llama_server import LlamaServer, LlamaServerFactory
from tests.integration.fleet import Fleet, until

LONG = {"prompt": "Once upon a time", "n_predict": 300, "ignore_eos": True}
PATIENT = ("--buffered-request-timeout", "120000")  # a loaded 2-core machine is slow


class SlotWatch:
    """Polls servers' `/slots` and `/metrics`; remembers the most tasks and deferrals seen."""

    def __init__(self, servers: list[LlamaServer]) -> None:
        self.servers = servers
        self.most_processing = dict.fromkeys((s.addr for s in servers), 0)
        self.most_deferred = dict.fromkeys((s.addr for s in servers), 0)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            for server in self.servers:
                with contextlib.suppress(aiohttp.ClientError):
                    async with session.get(server.url + "/slots") as answer:
                        busy = sum(s["is_processing"] for s in await answer.json())
                    async with session.get(server.url + "/metrics") as answer:
                        deferred = deferred_requests(await answer.text())
                    addr = server.addr
                    self.most_processing[addr] = max(self.most_processing[addr], busy)
                    self.most_deferred[addr] = max(self.most_deferred[addr], deferred)
            await asyncio.sleep(0.02)


def deferred_requests(metrics: str) -> int:
    for line in metrics.splitlines():
        if line.startswith("llamacpp:requests_deferred"):
            return int(float(line.split()[-1]))
    raise AssertionError(f"no llamacpp:requests_deferred in /metrics:\n{metrics}")


@contextlib.asynccontextmanager
async def watching(servers: list[LlamaServer]) -> AsyncIterator[SlotWatch]:
    watch = SlotWatch(servers)
    async with aiohttp.ClientSession() as session:
        task = asyncio.create_task(watch.run(session))
        try:
            yield watch
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json()


def busy_slots(server: LlamaServer) -> int:
    import urllib.request

    with urllib.request.urlopen(server.url + "/slots", timeout=5) as answer:
        return sum(s["is_processing"] for s in json.load(answer))


async def test_two_servers_one_slot_each_never_over_dispatched(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer(*PATIENT)
    servers = [llama_server(slots=1, extra_args=["--metrics"]) for _ in range(2)]
    for server in servers:
        fleet.agent(server, interval_ms=1000)
    fleet.wait_agents(2)
    async with watching(servers) as watch, aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(post_json(session, fleet.proxy + "/completion", LONG) for _ in range(4))
        )
    assert [status for status, _ in results] == [200] * 4
    assert all(body["tokens_predicted"] == 300 for _, body in results)
    # Spread over both servers, never two tasks on one, never a deferred request.
    assert watch.most_processing == {s.addr: 1 for s in servers}
    assert watch.most_deferred == {s.addr: 0 for s in servers}
    assert fleet.in_flight() == 0


async def test_requests_spread_over_two_servers(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer(*PATIENT)
    servers = [llama_server(slots=2) for _ in range(2)]
    for server in servers:
        fleet.agent(server)
    fleet.wait_agents(2)
    async with aiohttp.ClientSession() as session:
        tasks = [post_json(session, fleet.proxy + "/completion", LONG) for _ in range(4)]
        running = asyncio.gather(*tasks)
        await until(lambda: sum(busy_slots(s) for s in servers) == 4, what="all slots busy")
        assert [busy_slots(s) for s in servers] == [2, 2]
        assert [status for status, _ in await running] == [200] * 4


async def test_buffer_full_429_and_timeout_504(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer("--max-buffered-requests", "1", "--buffered-request-timeout", "400")
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    long = {**LONG, "n_predict": 20000, "stream": True}
    async with aiohttp.ClientSession() as session:
        running = await session.post(fleet.proxy + "/completion", json=long)
        await until(lambda: busy_slots(server) == 1, what="slot busy")
        waiting = asyncio.create_task(post_json(session, fleet.proxy + "/completion", LONG))
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        status, body = await post_json(session, fleet.proxy + "/completion", LONG)
        assert status == 429
        assert body["error"]["code"] == 429
        status, body = await waiting
        assert status == 504
        assert body["error"]["code"] == 504
        assert not running.content.at_eof()
        running.close()
        await until(lambda: busy_slots(server) == 0, within=3, what="slot freed")


async def test_request_before_any_agent_is_served_when_one_registers(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer("--buffered-request-timeout", "30000")
    server = llama_server(slots=1)
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(
            post_json(session, fleet.proxy + "/completion", {"prompt": "hi", "n_predict": 8})
        )
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        fleet.agent(server)
        status, body = await asyncio.wait_for(waiting, 30)
    assert status == 200
    assert body["tokens_predicted"] == 8


async def test_streamed_chat_arrives_token_by_token(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        "max_tokens": 200,
    }
    arrivals: list[float] = []
    async with (
        aiohttp.ClientSession() as session,
        session.post(fleet.proxy + "/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status == 200
        async for line in answer.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                last = line
    assert last.strip() == b"data: [DONE]"
    assert len(arrivals) > 20
    # Token by token: the chunks arrived over time, not in one burst at the end.
    assert arrivals[-2] - arrivals[1] > 0.02


async def test_dropped_stream_frees_the_slot_within_a_second(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        answer = await session.post(
            fleet.proxy + "/completion", json={**LONG, "n_predict": 20000, "stream": True}
        )
        assert (await answer.content.readline()).startswith(b"data: ")
        assert busy_slots(server) == 1
        answer.close()
        dropped = time.monotonic()
        await until(lambda: busy_slots(server) == 0, within=3, what="slot freed")
        assert time.monotonic() - dropped < 1.0
    await until(lambda: fleet.in_flight() == 0, within=2, what="balancer released")


async def test_slots_is_403(fleet: Fleet, llama_server: LlamaServerFactory) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet.proxy + "/slots") as answer,
    ):
        assert answer.status == 403
        assert (await answer.json())["error"]["code"] == 403


async def test_killed_server_is_reported_and_avoided_and_stopped_agent_removed(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    doomed, healthy = llama_server(slots=2), llama_server(slots=1)
    doomed_agent = fleet.agent(doomed)
    fleet.agent(healthy)
    fleet.wait_agents(2)
    doomed.process.kill()

    def doomed_status() -> dict[str, Any]:
        agents = fleet.agents_view()["agents"]
        return next(a for a in agents if a["status"]["external_llamacpp_addr"] == doomed.addr)

    await until(lambda: bool(doomed_status()["status"]["error"]), what="error reported")
    assert doomed_status()["status"]["is_connect_error"] is True
    assert not doomed_status()["is_usable"]
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            status, _ = await post_json(
                session, fleet.proxy + "/completion", {"prompt": "x", "n_predict": 4}
            )
            assert status == 200
    doomed_agent.signal(signal.SIGTERM)
    await until(lambda: len(fleet.agents_view()["agents"]) == 1, what="agent removed")
    remaining = fleet.agents_view()["agents"][0]
    assert remaining["status"]["external_llamacpp_addr"] == healthy.addr


async def test_abandoned_non_streamed_request_still_holds_its_slot(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    # llama-server generates a non-streamed answer to its end even when the client left: the
    # balancer must not send the next request to that busy slot.
    fleet.balancer(*PATIENT)
    server = llama_server(slots=1, extra_args=["--metrics"])
    fleet.agent(server, interval_ms=200)
    fleet.wait_agents(1)
    async with watching([server]) as watch, aiohttp.ClientSession() as session:
        abandoned = asyncio.create_task(
            post_json(session, fleet.proxy + "/completion", {**LONG, "n_predict": 1500})
        )
        await until(lambda: busy_slots(server) == 1, what="slot busy")
        abandoned.cancel()
        await until(lambda: fleet.in_flight() == 0, what="balancer let go of the request")
        status, body = await post_json(
            session, fleet.proxy + "/completion", {"prompt": "next", "n_predict": 4}
        )
    assert status == 200
    assert body["tokens_predicted"] == 4
    assert watch.most_deferred == {server.addr: 0}
