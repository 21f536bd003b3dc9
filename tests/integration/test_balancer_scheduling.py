"""Slot-aware scheduling through a real balancer, real agents and `rower sim` servers."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp

from tests.integration.fleet import Fleet, until


async def complete(
    session: aiohttp.ClientSession, url: str, *, tokens: int = 20, prompt: str = "hello"
) -> tuple[int, dict[str, object]]:
    async with session.post(
        url + "/completion", json={"prompt": prompt, "n_predict": tokens}
    ) as answer:
        return answer.status, await answer.json()


async def test_requests_spread_over_servers_with_free_slots(fleet: Fleet) -> None:
    fleet.balancer()
    sims = [fleet.sim(slots=2, speed=100), fleet.sim(slots=2, speed=100)]
    for sim in sims:
        fleet.agent(sim)
    fleet.wait_agents(2)
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(*(complete(session, fleet.proxy) for _ in range(4)))
    assert [status for status, _ in results] == [200] * 4
    assert [sim.counters()["requests_total"] for sim in sims] == [2, 2]
    assert all(sim.counters()["requests_deferred"] == 0 for sim in sims)


async def test_never_sends_to_a_server_without_a_free_slot(fleet: Fleet) -> None:
    fleet.balancer()
    sims = [fleet.sim(slots=1, speed=100), fleet.sim(slots=1, speed=100)]
    for sim in sims:
        fleet.agent(sim, interval_ms=1000)
    fleet.wait_agents(2)
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        results = await asyncio.gather(
            *(complete(session, fleet.proxy, tokens=30) for _ in range(6))
        )
        elapsed = time.monotonic() - started
    assert [status for status, _ in results] == [200] * 6
    counters = [sim.counters() for sim in sims]
    assert sum(c["requests_total"] for c in counters) == 6
    # The sims count requests that had to wait inside them for a slot: none may.
    assert [c["requests_deferred"] for c in counters] == [0, 0]
    # Slots free up on completion, not on the next (1 s) report: 3 rounds of 0.3 s each.
    assert elapsed < 2.0, elapsed
    assert fleet.in_flight() == 0


async def test_buffered_request_is_dispatched_when_a_slot_frees(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, speed=50)
    fleet.agent(sim, interval_ms=1000)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(complete(session, fleet.proxy, tokens=25))
        await asyncio.sleep(0.1)
        second = asyncio.create_task(complete(session, fleet.proxy, tokens=1))
        await asyncio.sleep(0.1)
        assert fleet.agents_view()["requests_buffered"] == 1
        (status1, _), (status2, _) = await asyncio.gather(first, second)
        first_done = time.monotonic()
    assert (status1, status2) == (200, 200)
    assert sim.counters()["requests_deferred"] == 0
    assert time.monotonic() - first_done < 0.5


async def test_scale_from_zero_serves_a_request_sent_before_any_agent(fleet: Fleet) -> None:
    fleet.balancer("--buffered-request-timeout", "15000")
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(complete(session, fleet.proxy))
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        sim = fleet.sim(slots=1)
        fleet.agent(sim)
        status, body = await asyncio.wait_for(waiting, 15)
    assert status == 200
    assert body["content"]
    assert sim.counters()["requests_total"] == 1


async def test_full_buffer_answers_429_with_retry_after(fleet: Fleet) -> None:
    fleet.balancer("--max-buffered-requests", "1")
    sim = fleet.sim(slots=1, speed=20)
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(complete(session, fleet.proxy, tokens=20))
        await asyncio.sleep(0.2)
        waiting = asyncio.create_task(complete(session, fleet.proxy, tokens=1))
        await asyncio.sleep(0.2)
        async with session.post(fleet.proxy + "/v1/completions", json={"prompt": "x"}) as answer:
            assert answer.status == 429
            assert int(answer.headers["Retry-After"]) >= 1
            error = (await answer.json())["error"]
        assert error["code"] == 429
        assert "buffer is full" in error["message"]
        assert error["type"]
        assert [s for s, _ in await asyncio.gather(running, waiting)] == [200, 200]


async def test_no_buffer_answers_429_at_once(fleet: Fleet) -> None:
    fleet.balancer("--max-buffered-requests", "0")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(fleet.proxy + "/completion", json={"prompt": "x"}) as answer:
            assert answer.status == 429
            assert "--max-buffered-requests 0" in (await answer.json())["error"]["message"]
    assert time.monotonic() - started < 1.0


async def test_wait_longer_than_the_timeout_answers_504(fleet: Fleet) -> None:
    fleet.balancer("--buffered-request-timeout", "300")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        async with session.post(fleet.proxy + "/completion", json={"prompt": "x"}) as answer:
            assert answer.status == 504
            error = (await answer.json())["error"]
    waited = time.monotonic() - started
    assert 0.25 < waited < 2.0
    assert "--buffered-request-timeout" in error["message"]
    assert fleet.agents_view()["requests_buffered"] == 0


async def test_client_leaving_the_buffer_leaves_the_queue(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(complete(session, fleet.proxy))
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        waiting.cancel()
        await until(lambda: fleet.agents_view()["requests_buffered"] == 0, what="left the queue")


async def test_paths_without_slots_do_not_wait(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, speed=10)
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        busy = asyncio.create_task(complete(session, fleet.proxy, tokens=10))
        await until(lambda: sim.slots_processing() == 1, what="slot busy")
        started = time.monotonic()
        async with session.get(fleet.proxy + "/v1/models") as answer:
            assert answer.status == 200
            assert (await answer.json())["data"][0]["id"] == "sim"
        assert time.monotonic() - started < 0.5
        async with session.get(fleet.proxy + "/slots") as answer:
            assert answer.status == 403
            assert "--slots-endpoint-enable" in (await answer.json())["error"]["message"]
        assert (await busy)[0] == 200


async def test_slots_endpoint_when_enabled(fleet: Fleet) -> None:
    fleet.balancer("--slots-endpoint-enable")
    sim = fleet.sim(slots=3)
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet.proxy + "/slots") as answer,
    ):
        assert answer.status == 200
        assert len(await answer.json()) == 3


async def test_streamed_chat_arrives_chunk_by_chunk(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, speed=20)
    fleet.agent(sim)
    fleet.wait_agents(1)
    arrivals: list[float] = []
    chunks: list[str] = []
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True, "max_tokens": 8}
    async with (
        aiohttp.ClientSession() as session,
        session.post(fleet.proxy + "/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        async for line in answer.content:
            if line.startswith(b"data: "):
                arrivals.append(time.monotonic())
                chunks.append(line[6:].decode().strip())
    assert chunks[-1] == "[DONE]"
    deltas = [json.loads(c)["choices"][0]["delta"] for c in chunks[:-1]]
    assert sum(1 for d in deltas if d.get("content")) == 8
    # 8 tokens at 20 tokens/s: the chunks must be spread over ~0.4 s, not arrive at once.
    assert arrivals[-2] - arrivals[1] > 0.25
