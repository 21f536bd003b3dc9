"""llama-servers that freeze, answer `/slots` slowly or never, or are still loading.

Servers killed outright are in `test_balancer_failures.py` (sim) and the real llama-server
chaos tests; here are the faults where the server is alive but not itself.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from tests.chaos.invariants import (
    bounded,
    freeze,
    settled,
    stream_completion,
    thaw,
)
from tests.integration.fleet import Fleet, until


async def test_frozen_server_is_avoided_and_its_streams_finish_when_it_thaws(
    fleet: Fleet,
) -> None:
    fleet.balancer()
    frozen = fleet.sim(slots=2, speed=40)
    fleet.agent(frozen)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        streams = [
            asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=40))
            for _ in range(2)
        ]
        await until(lambda: frozen.slots_processing() == 2, what="both slots busy")
        freeze(frozen.process)
        # The agent's poll times out (3 s): the server is reported broken and not used.
        other = fleet.sim(slots=1)
        fleet.agent(other)

        def frozen_unusable() -> bool:
            agents = fleet.agents_by_addr()
            return frozen.addr in agents and not agents[frozen.addr]["is_usable"]

        await until(frozen_unusable, within=6, what="frozen server marked unusable")
        status, _ = await bounded(stream_completion(session, fleet.proxy, n_predict=5))
        assert status == 200
        assert other.counters()["requests_total"] == 1
        thaw(frozen.process)
        results = await bounded(asyncio.gather(*streams), "streams of the thawed server")
    assert [status for status, _ in results] == [200, 200]
    assert all(b'"stop":true' in body for _, body in results)
    await settled(fleet)


async def test_slow_and_hanging_slots_endpoints_never_stall_the_proxy(fleet: Fleet) -> None:
    fleet.balancer()
    # /slots answers after 2.5 s (inside the agent's 3 s timeout): reports are late, not wrong.
    slow = fleet.sim(slots=2, speed=100, flags=["--slots-delay-ms", "2500"])
    # /slots never answers in time: the agent reports a timeout and the server is not used.
    hanging = fleet.sim(slots=2, flags=["--slots-delay-ms", "60000"])
    fleet.agent(slow, interval_ms=1000)
    fleet.agent(hanging, interval_ms=1000)

    def registered() -> bool:
        agents = fleet.agents_by_addr()
        return (
            agents.get(slow.addr, {}).get("is_usable", False)
            and hanging.addr in agents
            and "timed out" in (agents[hanging.addr]["status"]["error"] or "")
        )

    await until(registered, within=10, what="slow usable, hanging reported broken")
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        results = await bounded(
            asyncio.gather(
                *(stream_completion(session, fleet.proxy, n_predict=10) for _ in range(6))
            )
        )
        elapsed = time.monotonic() - started
    assert [status for status, _ in results] == [200] * 6
    # 6 requests on 2 slots at 100 tokens/s: about 0.3 s of work; slow polls add no waiting.
    assert elapsed < 3.0, elapsed
    assert hanging.counters()["requests_total"] == 0
    await settled(fleet, sims=[slow], agents=2)


async def test_loading_server_is_used_once_ready_without_any_restart(fleet: Fleet) -> None:
    fleet.balancer()
    loading = fleet.sim(flags=["--loading-ms", "3000"], ready=(503,))
    fleet.agent(loading)
    fleet.wait_agents(1, usable=False)
    agent = fleet.agents_view()["agents"][0]
    assert agent["status"]["error"] == "Llama.cpp is loading the model"
    assert not agent["is_usable"]
    async with aiohttp.ClientSession() as session:
        # Sent while loading: it waits in the buffer, then runs once the model is loaded.
        status, body = await bounded(stream_completion(session, fleet.proxy, n_predict=3))
    assert status == 200
    assert b'"stop":true' in body
    assert loading.counters()["requests_total"] == 1
    await settled(fleet)
