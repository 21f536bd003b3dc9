"""Agents that die, freeze, restart with a new id, stop gracefully, or are drained."""

from __future__ import annotations

import asyncio
import signal

import aiohttp

from tests.chaos.invariants import bounded, freeze, settled, stream_completion, thaw
from tests.integration.fleet import Fleet, until


async def test_killed_agent_leaves_and_its_replacement_counts_the_running_request(
    fleet: Fleet,
) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=2, speed=40)
    agent = fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=60))
        await until(lambda: sim.slots_processing() == 1, what="request running")
        agent.kill()
        await until(lambda: not fleet.agents_view()["agents"], within=3, what="agent removed")
        assert fleet.agents_view()["requests_in_flight"] == 1
        fleet.agent(sim)
        fleet.wait_agents(1)
        # The new agent inherits the request: one slot taken, one free, not two free.
        (entry,) = fleet.agents_view()["agents"]
        assert entry["slots_taken"] == 1
        assert entry["slots_free"] == 1
        status, body = await bounded(stream)
    assert status == 200
    assert b'"stop":true' in body
    await settled(fleet)


async def test_frozen_agent_goes_stale_and_a_new_agent_supersedes_it(fleet: Fleet) -> None:
    fleet.balancer()
    sim = fleet.sim(slots=2)
    old = fleet.agent(sim, interval_ms=100)
    fleet.wait_agents(1)
    (first,) = fleet.agents_view()["agents"]
    freeze(old)
    # Its TCP stream stays open: only the missed intervals (3 x 100 ms) give it away.
    await until(lambda: fleet.agents_view()["agents"][0]["is_stale"], within=3, what="stale")
    assert not fleet.agents_view()["agents"][0]["is_usable"]
    fleet.agent(sim, interval_ms=100)
    await until(
        lambda: [a["agent_id"] for a in fleet.agents_view()["agents"]] != [first["agent_id"]],
        within=5,
        what="new agent took over",
    )
    (entry,) = fleet.agents_view()["agents"]
    assert entry["is_usable"]
    assert entry["status"]["slots_total"] == 2
    # The old agent wakes up and reports again: still one entry, the newest agent's.
    thaw(old)
    await asyncio.sleep(0.5)
    assert [a["agent_id"] for a in fleet.agents_view()["agents"]] == [entry["agent_id"]]
    async with aiohttp.ClientSession() as session:
        results = await bounded(
            asyncio.gather(*(stream_completion(session, fleet.proxy) for _ in range(4)))
        )
    assert [status for status, _ in results] == [200] * 4
    # The old agent leaves: the newer one stays.
    old.stop()
    await asyncio.sleep(0.3)
    assert [a["agent_id"] for a in fleet.agents_view()["agents"]] == [entry["agent_id"]]
    await settled(fleet)


async def test_sigterm_drains_the_agent_then_it_leaves(fleet: Fleet) -> None:
    fleet.balancer()
    draining, other = fleet.sim(slots=2, speed=30), fleet.sim(slots=2)
    agent = fleet.agent(draining)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=45))
        await until(lambda: draining.slots_processing() == 1, what="request running")
        fleet.agent(other)
        fleet.wait_agents(2, usable=False)
        agent.signal(signal.SIGTERM)

        def reported_draining() -> bool:
            entry = fleet.agents_by_addr().get(draining.addr)
            return entry is not None and bool(entry["status"]["is_draining"])  # type: ignore[index]

        await until(reported_draining, within=3, what="agent reports draining")
        entry = fleet.agents_by_addr()[draining.addr]
        assert not entry["is_usable"]
        # New work goes elsewhere while the running request finishes.
        status, _ = await bounded(stream_completion(session, fleet.proxy, n_predict=3))
        assert status == 200
        assert draining.counters()["requests_total"] == 1
        assert agent.popen.poll() is None, "the agent left before its request finished"
        status, body = await bounded(stream)
        assert status == 200
        assert b'"stop":true' in body
    await until(lambda: agent.popen.poll() is not None, within=3, what="agent exits")
    assert agent.popen.returncode == 0
    await until(lambda: draining.addr not in fleet.agents_by_addr(), within=2, what="unregistered")
    await settled(fleet, sims=[other])


async def test_drain_endpoint_needs_the_token_and_stops_new_work(fleet: Fleet) -> None:
    fleet.balancer("--management-token", "s3cret")
    drained, other = fleet.sim(slots=2, speed=30), fleet.sim(slots=2)
    fleet.agent(drained, flags=["--management-token", "s3cret"])
    fleet.wait_agents(1)
    agent_id = fleet.agents_view()["agents"][0]["agent_id"]
    url = f"{fleet.management}/api/v1/agents/{agent_id}/drain"
    async with aiohttp.ClientSession() as session:
        stream = asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=40))
        await until(lambda: drained.slots_processing() == 1, what="request running")
        fleet.agent(other, flags=["--management-token", "s3cret"])
        fleet.wait_agents(2)
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            async with session.post(url, headers=headers) as answer:
                assert answer.status == 401
                assert (await answer.json())["error"]["code"] == 401
        assert fleet.agents_by_addr()[drained.addr]["is_usable"]
        auth = {"Authorization": "Bearer s3cret"}
        async with session.post(
            f"{fleet.management}/api/v1/agents/nobody/drain", headers=auth
        ) as answer:
            assert answer.status == 404
        async with session.post(url, headers=auth) as answer:
            assert answer.status == 200
            assert await answer.json() == {"agent_id": agent_id, "is_draining": True}
        entry = fleet.agents_by_addr()[drained.addr]
        assert entry["status"]["is_draining"]  # type: ignore[index]
        assert not entry["is_usable"]
        results = await bounded(
            asyncio.gather(
                *(stream_completion(session, fleet.proxy, n_predict=3) for _ in range(3))
            )
        )
        assert [status for status, _ in results] == [200] * 3
        assert drained.counters()["requests_total"] == 1
        status, _ = await bounded(stream)
        assert status == 200
    await settled(fleet)
