"""Cache-aware routing in front of real llama-servers: a second turn finds its prefix cached.

llama-server's own `timings.cache_n` is the judge: the prompt tokens it did not have to
evaluate because a slot (or its host-RAM prompt cache) already held them.
"""

from __future__ import annotations

import random
from typing import Any

import aiohttp
import pytest

from tests.e2e.real_llama_server import LlamaServerFactory
from tests.integration.fleet import Fleet

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

WORDS = ["river", "stone", "lantern", "meadow", "copper", "harbor", "willow", "ember", "quartz"]


def words(seed: int, count: int) -> str:
    pick = random.Random(seed).choice
    return " ".join(pick(WORDS) for _ in range(count))


def first_turn(path: str, seed: int) -> dict[str, Any]:
    # ~1,200 words: ~1,500 tokens of the tiny model's vocabulary, well inside a 4096 slot.
    opening = words(seed, 1200)
    if path == "/completion":
        return {"prompt": f"User: {opening}\nAssistant:", "n_predict": 8, "ignore_eos": True}
    return {
        "messages": [
            {"role": "system", "content": "You are a patient assistant."},
            {"role": "user", "content": opening},
        ],
        "max_tokens": 8,
        "ignore_eos": True,
    }


def next_turn(path: str, body: dict[str, Any], answer: dict[str, Any], seed: int) -> None:
    question = words(seed + 1000, 20)
    if path == "/completion":
        body["prompt"] += f"{answer['content']}\nUser: {question}\nAssistant:"
    else:
        reply = answer["choices"][0]["message"]["content"]
        body["messages"] += [
            {"role": "assistant", "content": reply},
            {"role": "user", "content": question},
        ]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/completion"])
async def test_second_turn_through_the_balancer_finds_its_prefix_cached(
    fleet: Fleet, llama_server: LlamaServerFactory, path: str
) -> None:
    servers = [llama_server(slots=2, ctx=4096) for _ in range(2)]
    fleet.balancer("--routing", "cache-aware", "--buffered-request-timeout", "120000")
    for server in servers:
        fleet.agent(server)
    fleet.wait_agents(2)
    # Three conversations over two servers, one request at a time: least-busy routing would
    # send every second turn to the other server (the least recently used one).
    bodies = {seed: first_turn(path, seed) for seed in (1, 2, 3)}
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for turn in (1, 2):
            for seed, body in bodies.items():
                async with session.post(fleet.proxy + path, json=body) as answer:
                    result = await answer.json()
                    assert answer.status == 200, result
                timings = result["timings"]
                prompt_tokens = timings["cache_n"] + timings["prompt_n"]
                if turn == 2:
                    print(f"{path} turn 2: cache_n {timings['cache_n']} of {prompt_tokens}")
                    assert timings["cache_n"] >= 0.9 * prompt_tokens, (seed, timings)
                next_turn(path, body, result, seed)
