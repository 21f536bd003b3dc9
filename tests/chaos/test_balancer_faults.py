"""The balancer stopped gracefully, or killed and restarted under load."""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp

from tests.chaos.invariants import (
    Outcomes,
    bounded,
    settled,
    stream_completion,
)
from tests.integration.fleet import Fleet, until


async def test_sigterm_finishes_streams_answers_the_buffer_and_refuses_new_work(
    fleet: Fleet,
) -> None:
    balancer = fleet.balancer("--shutdown-grace-period", "5000")
    sim = fleet.sim(slots=1, speed=40)
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=40))
        await until(lambda: sim.slots_processing() == 1, what="request running")
        waiting = asyncio.create_task(
            session.post(fleet.proxy + "/completion", json={"prompt": "w"})
        )
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="one waits")
        balancer.signal(signal.SIGTERM)
        answer = await bounded(waiting)
        assert answer.status == 503
        error = (await answer.json())["error"]
        assert error["code"] == 503
        assert error["type"] == "unavailable_error"
        assert "shutting down" in error["message"]
        # The listener is closed: new clients are refused at once and can fail over.
        await asyncio.sleep(0.2)
        try:
            async with session.post(
                fleet.proxy + "/completion", json={"prompt": "x"}, headers={"Connection": "close"}
            ) as late:
                assert late.status == 503
        except aiohttp.ClientConnectionError:
            pass
        status, body = await bounded(running)
    assert status == 200
    assert b'"stop":true' in body
    assert balancer.popen.wait(5) == 0
    await until(lambda: sim.slots_processing() == 0, what="sim idle")


async def test_grace_period_cuts_streams_that_run_too_long(fleet: Fleet) -> None:
    balancer = fleet.balancer("--shutdown-grace-period", "300")
    sim = fleet.sim(slots=1, speed=20)
    fleet.agent(sim)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(stream_completion(session, fleet.proxy, n_predict=200))
        await until(lambda: sim.slots_processing() == 1, what="request running")
        stopped = time.monotonic()
        balancer.signal(signal.SIGTERM)
        status, body = await bounded(running)
    # The client's stream ended (headers were sent, so only the end is possible), not hung.
    assert status in (0, 200)
    assert b'"stop":true' not in body
    assert balancer.popen.wait(5) == 0
    assert time.monotonic() - stopped < 3
    # The upstream connection closed with it: the sim freed the slot.
    await until(lambda: sim.slots_processing() == 0, within=2, what="sim idle")


async def test_balancer_killed_under_load_comes_back_and_agents_re_register(
    fleet: Fleet,
) -> None:
    balancer = fleet.balancer()
    sims = [fleet.sim(slots=2, speed=100), fleet.sim(slots=2, speed=100)]
    for sim in sims:
        fleet.agent(sim, interval_ms=200)
    fleet.wait_agents(2)
    outcomes = Outcomes()
    stop = asyncio.Event()

    async def client(session: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            await bounded(stream_completion(session, fleet.proxy, n_predict=15, outcomes=outcomes))
            await asyncio.sleep(0.01)

    async with aiohttp.ClientSession() as session:
        clients = [asyncio.create_task(client(session)) for _ in range(6)]
        await asyncio.sleep(1.0)
        balancer.kill()
        killed = time.monotonic()
        await asyncio.sleep(0.3)
        fleet.balancer()
        await until(lambda: len(fleet.agents_view()["agents"]) == 2, within=3, what="agents back")
        assert time.monotonic() - killed < 2.5
        served_before = outcomes.statuses.get(200, 0)
        await until(
            lambda: outcomes.statuses.get(200, 0) > served_before + 6,
            within=5,
            what="requests served again",
        )
        stop.set()
        await bounded(asyncio.gather(*clients), "clients")
    # Only clean outcomes: answers, or connection errors while no balancer listened.
    assert set(outcomes.statuses) <= {200}, outcomes
    assert set(outcomes.errors) <= {
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientOSError",
        "ClientPayloadError",
    }, outcomes
    # The sims freed the slots of the requests cut by the kill: nothing had to be restarted.
    await settled(fleet, sims=sims)
