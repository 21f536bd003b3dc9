"""Clients that leave, servers that die or refuse: no hang, no leaked slot, anywhere."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.integration.fleet import Fleet, until


async def test_client_leaving_before_the_first_byte_frees_the_server_slot(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, flags=["--hang"])
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        request = asyncio.create_task(
            session.post(fleet.proxy + "/completion", json={"prompt": "x"})
        )
        await until(lambda: sim.slots_processing() == 1, what="the sim's slot is busy")
        assert fleet.in_flight() == 1
        request.cancel()
        left = time.monotonic()
        await until(lambda: sim.slots_processing() == 0, within=2, what="slot freed")
        freed_after = time.monotonic() - left
    assert freed_after < 1.0
    assert sim.counters()["requests_cancelled"] == 1
    await until(lambda: fleet.in_flight() == 0, within=2, what="balancer released the slot")


async def test_client_leaving_mid_stream_frees_the_server_slot(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, speed=20)
    fleet.agent(sim)
    fleet.wait_agents(1)
    body = {"prompt": "x", "n_predict": 200, "stream": True}
    async with aiohttp.ClientSession() as session:
        answer = await session.post(fleet.proxy + "/completion", json=body)
        assert answer.status == 200
        assert (await answer.content.readline()).startswith(b"data: ")
        assert sim.slots_processing() == 1
        answer.close()
        left = time.monotonic()
        await until(lambda: sim.slots_processing() == 0, within=2, what="slot freed")
        assert time.monotonic() - left < 1.0
        await until(lambda: fleet.in_flight() == 0, within=2, what="balancer released")
        # The freed slot is usable again at once.
        async with session.post(fleet.proxy + "/completion", json={"prompt": "y"}) as again:
            assert again.status == 200


async def test_refused_connection_quarantines_and_retries_elsewhere(fleet: Fleet) -> None:
    fleet.balancer()
    doomed, healthy = fleet.sim(slots=2), fleet.sim(slots=1)
    # Slow reports: the balancer learns of the death from the refused connection first.
    fleet.agent(doomed, interval_ms=5000)
    fleet.agent(healthy, interval_ms=5000)
    fleet.wait_agents(2)
    doomed.process.kill()
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            async with session.post(fleet.proxy + "/completion", json={"prompt": "x"}) as answer:
                assert answer.status == 200
    assert healthy.counters()["requests_total"] == 3
    agents = fleet.agents_by_addr()
    assert agents[doomed.addr]["quarantined_until"] is not None
    assert not agents[doomed.addr]["is_usable"]
    assert agents[healthy.addr]["is_usable"]


async def test_server_dying_mid_stream_ends_the_client_stream(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=1, speed=20)
    fleet.agent(sim, interval_ms=200)
    fleet.wait_agents(1)
    body = {"prompt": "x", "n_predict": 400, "stream": True}
    async with aiohttp.ClientSession() as session:
        answer = await session.post(fleet.proxy + "/completion", json=body)
        assert (await answer.content.readline()).startswith(b"data: ")
        sim.process.kill()

        async def drain() -> None:
            try:
                async for _ in answer.content:
                    pass
            except aiohttp.ClientPayloadError:
                pass  # a truncated stream is the honest ending

        await asyncio.wait_for(drain(), 5)
        answer.close()
    await until(lambda: fleet.in_flight() == 0, within=2, what="balancer released")
    # The agent reports the dead server and the balancer stops using it.
    await until(
        lambda: bool(fleet.agents_view()["agents"][0]["status"]["error"]),
        what="agent reports the error",
    )
    assert not fleet.agents_view()["agents"][0]["is_usable"]


async def test_killed_server_is_reported_and_avoided(fleet: Fleet) -> None:
    fleet.balancer()
    doomed, healthy = fleet.sim(slots=4), fleet.sim(slots=1)
    fleet.agent(doomed)
    fleet.agent(healthy)
    fleet.wait_agents(2)
    doomed.process.kill()

    def doomed_reported() -> bool:
        for agent in fleet.agents_view()["agents"]:
            if agent["status"]["external_llamacpp_addr"] == doomed.addr:
                return bool(agent["status"]["is_connect_error"])
        return False

    await until(doomed_reported, what="connect error reported")
    agent = next(
        a
        for a in fleet.agents_view()["agents"]
        if a["status"]["external_llamacpp_addr"] == doomed.addr
    )
    assert "failed" in agent["status"]["error"]
    assert agent["status"]["slots_idle"] == 0
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(fleet.proxy + "/completion", json={"prompt": "x"}) as answer:
                assert answer.status == 200
    assert healthy.counters()["requests_total"] == 2


async def test_stopping_an_agent_removes_it(fleet: Fleet) -> None:
    fleet.balancer()
    sims = [fleet.sim(), fleet.sim()]
    agents = [fleet.agent(sim) for sim in sims]
    fleet.wait_agents(2)
    agents[0].signal(signal.SIGTERM)
    await until(lambda: len(fleet.agents_view()["agents"]) == 1, what="agent removed")
    remaining = fleet.agents_view()["agents"][0]
    assert remaining["status"]["external_llamacpp_addr"] == sims[1].addr
    agents[1].kill()
    await until(lambda: fleet.agents_view()["agents"] == [], what="killed agent removed")
