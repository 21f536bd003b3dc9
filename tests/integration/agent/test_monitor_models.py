"""The monitor and what a server serves: names and aliases of `rower sim` processes, and a
router-mode server (answered by the fake llama-server of peers.py in router mode; the real
router is in tests/e2e/test_router_agent.py)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

import aiohttp
import pytest

from rower.addresses import Address
from rower.agent.latest_status import LatestStatus
from rower.agent.llamacpp_probe import AgentIdentity
from rower.agent.monitor import Monitor
from rower.status import checked_status
from tests.integration.agent.peers import FakeLlama
from tests.integration.fleet import Fleet, Sim, eventually, get_json
from tests.processes import rower


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def monitor_for(session: aiohttp.ClientSession, addr: str) -> Monitor:
    return Monitor(
        session=session,
        local_addr=Address.parse(addr),
        identity=AgentIdentity("10.1.2.3:8080", agent_name="a", monitoring_interval_ms=50),
        board=LatestStatus(),
    )


# --- single-model servers: `rower sim --model NAME --alias ...` ------------------------------


async def test_a_sim_is_named_by_its_model_and_aliases(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    named = fleet.sim(slots=2, flags=["--model", "chat", "--alias", "chat-fast", "--alias", "c"])
    plain = fleet.sim(slots=1)
    status = await monitor_for(session, named.addr).poll_once()
    assert (status.error, status.model, status.model_aliases) == (None, "chat", ["chat-fast", "c"])
    assert (status.is_router, status.models, status.slots_idle) == (False, [], 2)
    status = await monitor_for(session, plain.addr).poll_once()
    assert (status.model, status.model_aliases, status.slots_idle) == ("sim", [], 1)


async def test_a_server_restarted_with_another_model_is_reported_with_its_new_names(
    fleet: Fleet, session: aiohttp.ClientSession
) -> None:
    first = fleet.sim(slots=1, flags=["--model", "chat", "--alias", "c"])
    monitor = monitor_for(session, first.addr)
    assert (await monitor.poll_once()).model_aliases == ["c"]
    first.process.stop()
    assert (await monitor.poll_once()).error is not None
    # Same port, same slot count, another model: read again after the failed poll.
    again = rower("sim", "--addr", first.addr, "--slots", "1", "--model", "coder", "--alias", "k")
    fleet.processes.append(again)
    again.wait_http(first.url + "/health")
    status = await monitor.poll_once()
    assert (status.error, status.model, status.model_aliases) == (None, "coder", ["k"])


def test_a_two_model_fleet_of_sims_lists_each_agents_model(fleet: Fleet) -> None:
    fleet.balancer()
    chat: Sim = fleet.sim(slots=2, flags=["--model", "chat", "--alias", "chat-fast"])
    coder: Sim = fleet.sim(slots=1, flags=["--model", "coder"])
    fleet.agent(chat, name="chat-1")
    fleet.agent(coder, name="coder-1")
    fleet.wait_agents(2)

    def served() -> dict[str, tuple[str, list[str], bool]]:
        agents = get_json(fleet.management + "/api/v1/agents")["agents"]
        return {
            a["status"]["agent_name"]: (
                a["status"]["model"],
                a["status"]["model_aliases"],
                a["status"]["is_router"],
            )
            for a in agents
        }

    eventually(lambda: len(served()) == 2, what="both agents listed")
    assert served() == {
        "chat-1": ("chat", ["chat-fast"], False),
        "coder-1": ("coder", [], False),
    }


# --- router mode --------------------------------------------------------------------------------


async def test_a_router_reports_each_loaded_model_and_never_loads_one(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.router = {"tiny-a": "loaded", "tiny-b": "unloaded", "tiny-c": "sleeping"}
    llama.state.slots[1]["is_processing"] = True
    monitor = monitor_for(session, llama.addr)
    for poll in range(1, 4):
        status = await monitor.poll_once()
        assert checked_status(status, max_slots=64) == status
        assert (status.error, status.is_router, status.model, status.slots) == (
            None,
            True,
            None,
            [],
        )
        a, b, c = status.models
        assert (a.model, a.is_loaded, a.slots_idle, a.slots_processing) == ("tiny-a", True, 1, 1)
        assert (b.model, b.is_loaded, b.slots_total, c.is_loaded) == ("tiny-b", False, 0, False)
        assert (status.slots_idle, status.slots_processing, status.slots_total) == (1, 1, 2)
        # /v1/models at every poll (load states change), /props once.
        assert (llama.state.models_requests, llama.state.props_requests) == (poll, 1)
    assert llama.state.slots_queries == [{"model": "tiny-a", "autoload": "false"}] * 3
    assert llama.state.loads == []
    assert llama.state.router == {"tiny-a": "loaded", "tiny-b": "unloaded", "tiny-c": "sleeping"}


async def test_a_router_with_no_model_loaded_is_healthy_with_no_slots(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.router = {"tiny-a": "unloaded", "tiny-b": "loading"}
    status = await monitor_for(session, llama.addr).poll_once()
    assert (status.error, status.slots_idle, status.slots_total) == (None, 0, 0)
    assert [(m.model, m.is_loaded) for m in status.models] == [
        ("tiny-a", False),
        ("tiny-b", False),
    ]
    assert llama.state.slots_queries == []


async def test_a_model_loaded_by_a_client_shows_up_at_the_next_poll(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.router = {"tiny-a": "loaded", "tiny-b": "unloaded"}
    monitor = monitor_for(session, llama.addr)
    assert [m.is_loaded for m in (await monitor.poll_once()).models] == [True, False]
    llama.state.router["tiny-b"] = "loaded"
    status = await monitor.poll_once()
    assert [m.slots_idle for m in status.models] == [2, 2]
    assert status.slots_idle == 4
    llama.state.router["tiny-a"] = "unloaded"
    status = await monitor.poll_once()
    assert [(m.is_loaded, m.slots_total) for m in status.models] == [(False, 0), (True, 2)]
    assert llama.state.loads == []


async def test_a_model_unloaded_between_the_list_and_its_slots_stays_unloaded(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    # What /v1/models says is loaded can be unloaded by the time its /slots is asked for:
    # autoload=false makes the router refuse instead of loading it again.
    llama.state.router = {"tiny-a": "loaded"}
    monitor = monitor_for(session, llama.addr)
    await monitor.poll_once()

    original = llama.state.router

    class UnloadedOnRead(dict[str, str]):
        def __getitem__(self, name: str) -> str:
            return "unloaded" if name == "tiny-a" else super().__getitem__(name)

    llama.state.router = UnloadedOnRead(original)
    (model,) = (await monitor.poll_once()).models
    assert model.is_loaded is True
    assert model.error is not None
    assert model.error.endswith(": model is not loaded")
    assert (model.slots_idle, model.slots_total) == (0, 2)  # its size, from the last poll
    assert llama.state.loads == []


async def test_loaded_models_are_polled_at_the_same_time(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    # Each /slots waits until all three are in progress: asked one after the other, the first
    # would wait 2 s and fail.
    llama.state.router = {"a": "loaded", "b": "loaded", "c": "loaded", "d": "unloaded"}
    llama.state.slots_barrier = 3
    began = time.monotonic()
    status = await monitor_for(session, llama.addr).poll_once()
    took = time.monotonic() - began
    assert [m.error for m in status.models] == [None, None, None, None]
    assert status.slots_idle == 6
    print(f"a poll of a router with 3 loaded models took {took * 1000:.0f} ms")


async def test_a_router_whose_model_list_fails_has_an_issue_then_recovers(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.router = {"tiny-a": "loaded"}
    monitor = monitor_for(session, llama.addr)
    await monitor.poll_once()
    llama.state.models_status = 500
    status = await monitor.poll_once()
    assert (status.error, status.is_router, status.models) == (
        "Unexpected response status 500",
        True,
        [],
    )
    assert status.slots_idle == 0
    llama.state.models_status = None
    status = await monitor.poll_once()
    assert (status.error, status.slots_idle) == (None, 2)
    # After the failed poll, what the server is was read again.
    assert llama.state.props_requests == 2


async def test_a_server_restarted_as_a_router_is_polled_as_one_at_once(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    monitor = monitor_for(session, llama.addr)
    assert (await monitor.poll_once()).is_router is False
    # A router answers /slots without a model with 400: the same poll reads /props again.
    llama.state.router = {"tiny-a": "loaded"}
    status = await monitor.poll_once()
    assert (status.error, status.is_router, status.slots_idle) == (None, True, 2)
    # And back: a single-model list (no load states) has the same poll read /props again.
    llama.state.router = None
    llama.state.model_alias = "tiny"
    status = await monitor.poll_once()
    assert (status.error, status.is_router, status.model, status.slots_idle) == (
        None,
        False,
        "tiny",
        2,
    )
    assert llama.state.loads == []


async def test_without_a_model_list_the_name_comes_from_props(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.models_status = 404
    llama.state.model_alias = "qwen-7b"
    status = await monitor_for(session, llama.addr).poll_once()
    assert (status.error, status.model, status.model_aliases) == (None, "qwen-7b", [])
