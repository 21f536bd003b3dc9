"""`rower agent` in front of a real router-mode llama-server (`--models-dir`, two models).

The agent must report each model's slots once that model is loaded, and must never load one
itself: a router loads a model it is asked about, so an agent that asked about every model
would keep them all loaded (and evict with `--models-max`). The router's own `/v1/models`
load states are the witness, read between the agent's polls. The agent is a real `rower agent`
process; what it streams is read by a status receiver in this test (what a balancer does
with a router's models is the balancer's tests' business).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
import pytest

from rower.status import ModelStatus, StatusUpdate
from tests.e2e.real_llama_server import LlamaRouter
from tests.integration.agent.peers import Receiver
from tests.integration.fleet import until
from tests.processes import rower, running

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

INTERVAL_MS = 100
BOTH_UNLOADED = {"tiny-a": "unloaded", "tiny-b": "unloaded"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


async def load_states(http: aiohttp.ClientSession, router: LlamaRouter) -> dict[str, str]:
    async with http.get(f"{router.url}/v1/models") as answer:
        assert answer.status == 200
        body = await answer.json()
    return {model["id"]: model["status"]["value"] for model in body["data"]}


def latest(receiver: Receiver) -> StatusUpdate:
    status = receiver.latest
    assert status is not None, "the agent sent no status yet"
    return status


def models_of(status: StatusUpdate) -> dict[str, ModelStatus]:
    return {model.model: model for model in status.models}


async def watch_polls(
    http: aiohttp.ClientSession,
    router: LlamaRouter,
    receiver: Receiver,
    polls: int,
    states: dict[str, str],
) -> None:
    """Wait for `polls` more agent polls; the router's load states must stay `states`."""
    first = latest(receiver).sequence
    deadline = time.monotonic() + 20
    while (seen := latest(receiver).sequence - first) < polls:
        assert await load_states(http, router) == states, f"after {seen} polls of the agent"
        assert time.monotonic() < deadline, f"only {seen} agent polls in 20 s"
        await asyncio.sleep(INTERVAL_MS / 1000 / 2)
    assert await load_states(http, router) == states


async def load(http: aiohttp.ClientSession, router: LlamaRouter, model: str) -> None:
    """Load `model` as a client does: by sending it a request."""
    body = {"model": model, "prompt": "Hi", "n_predict": 2}
    async with http.post(f"{router.url}/completion", json=body) as answer:
        assert answer.status == 200, await answer.text()


@asynccontextmanager
async def generating(
    http: aiohttp.ClientSession, router: LlamaRouter, model: str
) -> AsyncIterator[None]:
    """A long streamed generation on `model` while the block runs; dropped at its end."""
    body = {"model": model, "prompt": "Once", "n_predict": -1, "ignore_eos": True, "stream": True}
    async with http.post(f"{router.url}/completion", data=json.dumps(body)) as answer:
        assert answer.status == 200, await answer.text()
        await answer.content.readany()
        yield


async def test_agent_reports_each_loaded_models_slots_and_never_loads_one(
    llama_router: LlamaRouter, receiver: Receiver, http: aiohttp.ClientSession
) -> None:
    router = llama_router
    agent = rower(
        "agent",
        "--management-addr", receiver.addr,
        "--local-llamacpp-addr", router.addr,
        "--name", "router",
        "--monitoring-interval", str(INTERVAL_MS),
    )  # fmt: skip
    with running(agent):
        await until(lambda: receiver.latest is not None, within=15, what="a first status")

        # No model loaded: healthy, both models listed, no slots; polling loads nothing.
        status = latest(receiver)
        assert (status.error, status.is_router, status.model) == (None, True, None)
        assert (status.slots_total, status.slots) == (0, [])
        assert [(m.model, m.is_loaded, m.slots_total) for m in status.models] == [
            ("tiny-a", False, 0),
            ("tiny-b", False, 0),
        ]
        await watch_polls(http, router, receiver, 10, BOTH_UNLOADED)

        # A client loads tiny-a: the agent reports its slots; tiny-b stays unloaded.
        await load(http, router, "tiny-a")
        # The slot that served the loading request may still read busy in the first poll
        # that shows the model: wait for it to read idle too.
        await until(
            lambda: (
                (
                    models_of(latest(receiver))["tiny-a"].slots_total,
                    models_of(latest(receiver))["tiny-a"].slots_idle,
                )
                == (router.slots, router.slots)
            ),
            within=10,
            what="tiny-a's slots reported, all idle",
        )
        status = latest(receiver)
        a, b = models_of(status)["tiny-a"], models_of(status)["tiny-b"]
        assert (a.is_loaded, a.error, a.slots_idle, len(a.slots)) == (
            True,
            None,
            router.slots,
            router.slots,
        )
        assert all(slot.n_ctx == router.ctx for slot in a.slots)
        assert (b.is_loaded, b.slots_total, b.slots) == (False, 0, [])
        assert (status.slots_idle, status.slots_total, status.slots) == (
            router.slots,
            router.slots,
            [],
        )
        await watch_polls(http, router, receiver, 10, {"tiny-a": "loaded", "tiny-b": "unloaded"})

        # A busy slot of tiny-a is seen as tiny-a's, with its progress.
        async with generating(http, router, "tiny-a"):
            await until(
                lambda: models_of(latest(receiver))["tiny-a"].slots_processing == 1,
                within=10,
                what="tiny-a's busy slot reported",
            )
            (busy,) = [s for s in models_of(latest(receiver))["tiny-a"].slots if s.is_processing]
            assert busy.id_task is not None
            assert busy.n_remain == -1
            assert latest(receiver).slots_processing == 1

        # Once tiny-b is loaded too, both models' slots are reported, each on its own.
        await load(http, router, "tiny-b")
        await until(
            lambda: all(m.slots_total == router.slots for m in latest(receiver).models),
            within=10,
            what="both models' slots reported",
        )
        status = latest(receiver)
        assert status.slots_total == 2 * router.slots
        assert [(m.model, m.error) for m in status.models] == [("tiny-a", None), ("tiny-b", None)]
        assert await load_states(http, router) == {"tiny-a": "loaded", "tiny-b": "loaded"}
