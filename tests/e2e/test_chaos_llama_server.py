"""Faults with real llama-servers behind the balancer: killed mid-stream, frozen, refusing.

Each test ends with the chaos invariants: nothing in flight at the balancer, every surviving
server's slots idle, exactly the expected agents listed.
"""

from __future__ import annotations

import asyncio
import signal

import aiohttp
import pytest

from tests.chaos.invariants import bounded, freeze, settled, thaw
from tests.e2e.real_llama_server import LlamaServer, LlamaServerFactory
from tests.integration.fleet import Fleet, Sim, until

LONG = {"prompt": "Once upon a time", "n_predict": 1900, "ignore_eos": True, "stream": True}
SHORT = {"prompt": "Hello", "n_predict": 8}


def as_sim(server: LlamaServer) -> Sim:
    """A real llama-server where the fleet harness expects a sim (same /slots, /health)."""
    return Sim(server.process, server.port)


async def first_event(answer: aiohttp.ClientResponse) -> None:
    assert answer.status == 200
    assert (await answer.content.readline()).startswith(b"data: ")


async def test_killed_mid_stream_ends_the_stream_and_work_moves_on(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    doomed, survivor = as_sim(llama_server(slots=1)), as_sim(llama_server(slots=1))
    fleet.agent(doomed)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        answer = await session.post(fleet.proxy + "/completion", json=LONG)
        await first_event(answer)
        fleet.agent(survivor)
        fleet.wait_agents(2)
        doomed.process.signal(signal.SIGKILL)
        # The chunked body stops without its last chunk: the client sees a cut, not an end.
        with pytest.raises(aiohttp.ClientPayloadError):
            await bounded(answer.content.read(), "the cut stream")
        answer.close()
        await until(lambda: fleet.agents_view()["requests_in_flight"] == 0, what="released")
        async with session.post(fleet.proxy + "/completion", json=SHORT) as again:
            assert again.status == 200
            assert (await again.json())["tokens_predicted"] == 8
    # The dead server's agent stays, reporting the connection error, and is not used.
    await settled(fleet, sims=[survivor], agents=2)


async def test_frozen_server_with_requests_in_flight(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    frozen, other = as_sim(llama_server(slots=2)), as_sim(llama_server(slots=1))
    fleet.agent(frozen)
    fleet.wait_agents(1)
    body = {**LONG, "n_predict": 600}
    async with aiohttp.ClientSession() as session:
        answers = [await session.post(fleet.proxy + "/completion", json=body) for _ in range(2)]
        for answer in answers:
            await first_event(answer)
        freeze(frozen.process)
        fleet.agent(other)

        def frozen_unusable() -> bool:
            agents = fleet.agents_by_addr()
            return frozen.addr in agents and not agents[frozen.addr]["is_usable"]

        await until(frozen_unusable, within=8, what="frozen server reported unusable")
        async with session.post(fleet.proxy + "/completion", json=SHORT) as meanwhile:
            assert meanwhile.status == 200
        thaw(frozen.process)
        rest = await bounded(asyncio.gather(*(a.content.read() for a in answers)), "thawed")
        assert all(b'"stop":true' in part for part in rest)
        for answer in answers:
            answer.close()
    await settled(fleet, sims=[frozen, other], within=10)


async def test_refused_connection_is_retried_on_another_server(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    gone, alive = as_sim(llama_server(slots=4)), as_sim(llama_server(slots=1))
    # Slow reports: the balancer learns of the death from the refused connection.
    fleet.agent(gone, interval_ms=5000)
    fleet.agent(alive, interval_ms=5000)
    fleet.wait_agents(2)
    gone.process.kill()
    async with (
        aiohttp.ClientSession() as session,
        session.post(fleet.proxy + "/completion", json=SHORT) as answer,
    ):
        assert answer.status == 200
        assert (await answer.json())["tokens_predicted"] == 8
    entry = fleet.agents_by_addr()
    assert entry[gone.addr]["quarantined_until"] is not None
    await settled(fleet, sims=[alive], agents=2)
