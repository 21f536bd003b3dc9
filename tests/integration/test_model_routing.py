"""Routing by model through a real balancer, real agents and `rower sim` servers of two models.

Which server answered is read from the sims' own request counters, never from the balancer.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.integration.fleet import Fleet, Sim, get_json, until

pytestmark = pytest.mark.timeout(90)

LONG = {"prompt": "hold the slot", "n_predict": 100_000, "stream": True}


def two_models(fleet: Fleet, *flags: str) -> tuple[Sim, Sim]:
    fleet.balancer("--max-buffered-requests", "2", *flags)
    alpha = fleet.sim(slots=1, speed=200, flags=("--model", "alpha"))
    beta = fleet.sim(slots=1, speed=2000, flags=("--model", "beta", "--alias", "b-chat"))
    fleet.agent(alpha)
    fleet.agent(beta)
    fleet.wait_agents(2)
    return alpha, beta


async def post(
    session: aiohttp.ClientSession, fleet: Fleet, body: dict[str, Any], path: str = "/completion"
) -> tuple[int, Any]:
    async with session.post(fleet.proxy + path, json=body) as answer:
        return answer.status, await answer.json(content_type=None)


async def test_a_burst_for_one_model_never_blocks_another(fleet: Fleet) -> None:
    alpha, beta = two_models(fleet)
    async with aiohttp.ClientSession() as session:
        # alpha: its slot busy, its buffer full (2 waiting), the next one refused.
        holder = await session.post(fleet.proxy + "/completion", json={**LONG, "model": "alpha"})
        assert holder.status == 200
        await holder.content.readuntil(b"\n\n")
        waiting = [
            asyncio.create_task(
                post(session, fleet, {"model": "alpha", "prompt": "w", "n_predict": 4})
            )
            for _ in range(2)
        ]
        await until(lambda: fleet.agents_view()["requests_buffered"] == 2, what="2 alpha waiting")
        status, body = await post(session, fleet, {"model": "alpha", "prompt": "x", "n_predict": 1})
        assert status == 429, body
        # beta, named by its alias, is served at once by the beta server.
        before = beta.counters()["requests_total"]
        started = time.monotonic()
        status, body = await post(
            session, fleet, {"model": "b-chat", "prompt": "y", "n_predict": 8}
        )
        assert status == 200, body
        assert time.monotonic() - started < 2.0
        assert beta.counters()["requests_total"] == before + 1
        assert fleet.agents_view()["requests_buffered"] == 2
        holder.close()
        results = await asyncio.gather(*waiting)
        assert [status for status, _ in results] == [200, 200]
    assert alpha.counters()["requests_total"] >= 3


async def test_wrong_models_get_clear_errors_listing_the_fleets_models(fleet: Fleet) -> None:
    two_models(fleet)
    async with aiohttp.ClientSession() as session:
        status, body = await post(session, fleet, {"model": "gpt-4o", "prompt": "x"})
        assert status == 404
        assert body["error"]["code"] == "model_not_found"
        assert "'gpt-4o'" in body["error"]["message"]
        assert "alpha, beta" in body["error"]["message"]
        status, body = await post(session, fleet, {"prompt": "x"})
        assert status == 400
        assert "alpha, beta" in body["error"]["message"]
        assert "--default-model" in body["error"]["message"]
    assert fleet.in_flight() == 0


async def test_default_model_and_renames(fleet: Fleet) -> None:
    alpha, beta = two_models(fleet, "--default-model", "beta", "--model-alias", "gpt-4o=alpha")
    async with aiohttp.ClientSession() as session:
        before = alpha.counters()["requests_total"], beta.counters()["requests_total"]
        assert (await post(session, fleet, {"prompt": "x", "n_predict": 1}))[0] == 200
        assert (await post(session, fleet, {"model": "gpt-4o", "prompt": "x", "n_predict": 1}))[
            0
        ] == 200
        after = alpha.counters()["requests_total"], beta.counters()["requests_total"]
        assert (after[0] - before[0], after[1] - before[1]) == (1, 1)


async def test_v1_models_is_the_union_of_the_fleet(fleet: Fleet) -> None:
    two_models(fleet, "--model", "gamma")
    listed = get_json(fleet.proxy + "/v1/models")
    assert [m["id"] for m in listed["data"]] == ["alpha", "beta", "gamma"]
    beta = listed["data"][1]
    assert beta["aliases"] == ["b-chat"]
    assert beta["owned_by"] == "llamacpp"
    assert beta["rower"]["servers"] == 1
    assert listed["data"][2]["rower"]["state"] == "declared"


async def test_a_declared_model_waits_for_its_first_server(fleet: Fleet) -> None:
    fleet.balancer("--model", "alpha", "--model", "gamma", "--buffered-request-timeout", "30000")
    alpha = fleet.sim(slots=1, flags=("--model", "alpha"))
    fleet.agent(alpha)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(
            post(session, fleet, {"model": "gamma", "prompt": "z", "n_predict": 2})
        )
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="gamma waiting")
        # alpha is free and unaffected.
        assert (await post(session, fleet, {"model": "alpha", "prompt": "a", "n_predict": 1}))[
            0
        ] == 200
        gamma = fleet.sim(slots=1, flags=("--model", "gamma"))
        fleet.agent(gamma)
        status, body = await asyncio.wait_for(waiting, 20)
        assert status == 200, body
        assert gamma.counters()["requests_total"] == 1
