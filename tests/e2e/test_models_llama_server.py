"""A fleet of several models, for real: the OpenAI client naming models against two
single-model llama-servers (the tiny model under the aliases `alpha` and `beta`) and a
router-mode llama-server (`tiny-a`, `tiny-b`, none loaded at start), through the balancer.

A single-model llama-server answers with its own alias whatever the request asked for, so the
`model` of each answer says which server it came from.
"""

from __future__ import annotations

import openai
import pytest

from tests.e2e.real_llama_server import LlamaRouter, LlamaServerFactory
from tests.integration.fleet import Fleet, get_json, until

pytestmark = pytest.mark.timeout(180)


def mixed_fleet(fleet: Fleet, llama_server: LlamaServerFactory, router: LlamaRouter) -> None:
    fleet.balancer("--buffered-request-timeout", "60000")
    for alias in ("alpha", "beta"):
        fleet.agent(llama_server(slots=1, extra_args=["--alias", alias]), interval_ms=200)
    fleet.agent(router, interval_ms=200)
    # Two single-model servers, and one cold upstream per model the router can load.
    fleet.wait_agents(4)


def client(fleet: Fleet) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=fleet.proxy + "/v1", api_key="unused", max_retries=0)


async def test_each_model_is_answered_by_its_own_servers(
    fleet: Fleet, llama_server: LlamaServerFactory, llama_router: LlamaRouter
) -> None:
    mixed_fleet(fleet, llama_server, llama_router)
    async with client(fleet) as api:
        listed = sorted(m.id for m in (await api.models.list()).data)
        assert listed == ["alpha", "beta", "tiny-a", "tiny-b"]
        for model in ("alpha", "beta", "alpha"):
            answer = await api.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
            assert answer.model == model
        # A model no server has loaded: the router loads it for this request.
        answer = await api.completions.create(model="tiny-a", prompt="Once", max_tokens=4)
        assert answer.choices[0].text is not None
        states = {
            m["id"]: m["status"]["value"] for m in get_json(llama_router.url + "/models")["data"]
        }
        assert states["tiny-a"] == "loaded"
        assert states["tiny-b"] != "loaded", "the balancer loaded a model nobody asked for"
        await until(
            lambda: any(
                a["status"]["model"] == "tiny-a"
                and a["status"]["slots_total"] == llama_router.slots
                for a in fleet.agents_view()["agents"]
            ),
            within=20,
            what="the router's tiny-a reported loaded with its slots",
        )
        streamed = await api.chat.completions.create(
            model="tiny-a",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=4,
            stream=True,
        )
        chunks = [chunk async for chunk in streamed]
        assert chunks
    assert fleet.in_flight() == 0


async def test_a_model_the_fleet_does_not_serve_is_a_404_naming_what_it_serves(
    fleet: Fleet, llama_server: LlamaServerFactory, llama_router: LlamaRouter
) -> None:
    mixed_fleet(fleet, llama_server, llama_router)
    async with client(fleet) as api:
        with pytest.raises(openai.NotFoundError) as missing:
            await api.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert "'gpt-4o'" in str(missing.value)
        assert "alpha, beta, tiny-a, tiny-b" in str(missing.value)
        with pytest.raises(openai.BadRequestError, match="--default-model"):
            await api.completions.create(model="", prompt="x", max_tokens=1)
    assert fleet.in_flight() == 0
