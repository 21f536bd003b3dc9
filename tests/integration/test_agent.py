"""`rower agent` and `rower sim` as real processes; the balancer's side of the status stream is
a real NDJSON receiver in this test (tests/integration/agent/peers.py)."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
import pytest

from rower.status import MAX_POLL_AGE_MS, StatusUpdate
from tests.integration.agent.peers import Receiver, eventually
from tests.processes import Process, free_port, rower

INTERVAL_MS = 100


class AgentRig:
    """`rower sim` and `rower agent` processes reporting to test receivers; stopped at the end.

    Not `tests.integration.fleet.Fleet`: no balancer here, the agent reports to `Receiver`s.
    """

    def __init__(self) -> None:
        self.processes: list[Process] = []

    def sim(
        self, *args: str, ready: tuple[int, ...] = (200,), addr: str | None = None
    ) -> tuple[Process, str]:
        addr = addr or f"127.0.0.1:{free_port()}"
        process = rower("sim", "--addr", addr, "--slots", "2", "--model", "sim-7b", *args)
        self.processes.append(process)
        process.wait_http(f"http://{addr}/health", statuses=ready)
        return process, addr

    def agent(self, llama: str, *receivers: str, extra: tuple[str, ...] = ()) -> Process:
        management = [arg for addr in receivers for arg in ("--management-addr", addr)]
        process = rower(
            "agent",
            *management,
            "--local-llamacpp-addr",
            llama,
            "--monitoring-interval",
            str(INTERVAL_MS),
            *extra,
        )
        self.processes.append(process)
        return process

    async def stop(self) -> None:
        """SIGTERM all, and wait without blocking the loop: receivers still read the last lines."""
        for process in self.processes:
            process.signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for process in self.processes:
            while process.popen.poll() is None and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        """Stop all and delete their logs."""
        await self.stop()
        for process in self.processes:
            process.close()


@pytest.fixture
async def rig() -> AsyncIterator[AgentRig]:
    started = AgentRig()
    try:
        yield started
    except BaseException:
        for process in started.processes:
            print(f"--- {' '.join(process.argv)} ---\n{process.output}")
        raise
    finally:
        await started.close()


def latest_where(receiver: Receiver, check: Callable[[StatusUpdate], bool]) -> Callable[[], bool]:
    return lambda: receiver.latest is not None and check(receiver.latest)


async def test_healthy_sim_reports_its_idle_slots(rig: AgentRig, receiver: Receiver) -> None:
    _, sim = rig.sim()
    rig.agent(sim, receiver.addr, extra=("--name", "gpu-1"))
    await eventually(lambda: len(receiver.lines) >= 1, timeout=10)
    status = receiver.statuses[0]
    assert status.error is None
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (2, 0, 2)
    assert status.model == "sim-7b"
    assert status.agent_name == "gpu-1"
    assert status.external_llamacpp_addr == sim
    assert status.is_authorized is True
    assert [slot.id for slot in status.slots] == [0, 1]
    # How old its poll was when sent: a balancer takes every line (MAX_POLL_AGE_MS).
    ages = [s.poll_age_ms for s in receiver.statuses]
    assert all(age is not None and 0 <= age <= MAX_POLL_AGE_MS for age in ages), ages


async def test_processing_is_reported_while_a_request_runs(
    rig: AgentRig, receiver: Receiver
) -> None:
    _, sim = rig.sim("--decode-tokens-per-second", "50")
    rig.agent(sim, receiver.addr)
    await eventually(latest_where(receiver, lambda s: s.slots_idle == 2), timeout=10)
    async with aiohttp.ClientSession() as client:
        started = time.monotonic()
        request = asyncio.create_task(
            client.post(f"http://{sim}/completion", json={"prompt": "hi", "n_predict": 200})
        )
        await eventually(
            latest_where(receiver, lambda s: (s.slots_processing, s.slots_idle) == (1, 1)),
            timeout=3,
        )
        # Seen at the next poll; the reporter adds no delay of its own (test_reporting.py
        # measures that part alone). The margin is for a busy test machine.
        assert time.monotonic() - started < INTERVAL_MS / 1000 + 0.5
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await request
    # The client went away, so the sim freed the slot.
    await eventually(latest_where(receiver, lambda s: s.slots_idle == 2), timeout=3)


async def test_no_slots_endpoint(rig: AgentRig, receiver: Receiver) -> None:
    _, sim = rig.sim("--no-slots")
    rig.agent(sim, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 1, timeout=10)
    status = receiver.statuses[0]
    assert status.is_slots_endpoint_enabled is False
    assert status.error == "Not implemented"
    assert (status.slots_idle, status.slots_processing) == (0, 0)


async def test_api_key(rig: AgentRig, receiver: Receiver) -> None:
    _, sim = rig.sim("--api-key", "right")
    wrong = Receiver()
    await wrong.start()
    try:
        rig.agent(sim, wrong.addr, extra=("--llamacpp-api-key", "wrong"))
        rig.agent(sim, receiver.addr, extra=("--local-llamacpp-api-key", "right"))
        await eventually(lambda: wrong.lines and receiver.lines, timeout=10)
        assert wrong.statuses[0].is_authorized is False
        assert wrong.statuses[0].error == "Unauthorized"
        assert wrong.statuses[0].slots_idle == 0
        assert receiver.statuses[0].is_authorized is True
        assert receiver.statuses[0].slots_idle == 2
        assert receiver.statuses[0].model == "sim-7b"
    finally:
        await rig.stop()
        await wrong.stop()


async def test_killed_server_is_a_connect_error(rig: AgentRig, receiver: Receiver) -> None:
    process, sim = rig.sim()
    rig.agent(sim, receiver.addr)
    await eventually(latest_where(receiver, lambda s: s.slots_idle == 2), timeout=10)
    process.kill()
    await eventually(latest_where(receiver, lambda s: bool(s.is_connect_error)), timeout=3)
    assert receiver.latest is not None
    assert receiver.latest.error == f"Request to http://{sim}/slots failed: connection refused"
    assert receiver.latest.slots_idle == 0


async def test_loading_model(rig: AgentRig, receiver: Receiver) -> None:
    # The agent polls first, so it sees the sim's whole loading phase however slow starts are.
    sim = f"127.0.0.1:{free_port()}"
    rig.agent(sim, receiver.addr)
    await eventually(latest_where(receiver, lambda s: bool(s.is_connect_error)), timeout=15)
    rig.sim("--loading-ms", "1500", ready=(200, 503), addr=sim)
    await eventually(
        latest_where(receiver, lambda s: s.error == "Llama.cpp is loading the model"), timeout=5
    )
    assert receiver.latest is not None
    assert receiver.latest.slots_idle == 0
    await eventually(latest_where(receiver, lambda s: s.slots_idle == 2), timeout=8)
    assert receiver.latest.model == "sim-7b"


async def test_two_balancers_both_receive(rig: AgentRig, receiver: Receiver) -> None:
    _, sim = rig.sim()
    other = Receiver()
    await other.start()
    try:
        rig.agent(sim, receiver.addr, other.addr)
        await eventually(lambda: len(receiver.lines) >= 3 and len(other.lines) >= 3, timeout=10)
        assert receiver.lines[0].agent_id == other.lines[0].agent_id
    finally:
        await rig.stop()
        await other.stop()


async def test_receiver_down_then_up(rig: AgentRig) -> None:
    _, sim = rig.sim()
    receiver = Receiver()
    await receiver.start()
    rig.agent(sim, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 2, timeout=10)
    await receiver.stop()
    await asyncio.sleep(1.5)
    back = Receiver(port=receiver.port)
    await back.start()
    try:
        up = time.monotonic()
        await eventually(lambda: len(back.lines) >= 1, timeout=5)
        assert time.monotonic() - up < 1.5
        assert back.lines[0].agent_id == receiver.lines[0].agent_id
        assert back.statuses[0].slots_idle == 2
    finally:
        await rig.stop()
        await back.stop()


async def test_rejected_token_is_logged_and_retried(rig: AgentRig) -> None:
    _, sim = rig.sim()
    receiver = Receiver(token="balancer-secret")
    await receiver.start()
    agent = rig.agent(sim, receiver.addr, extra=("--management-token", "agent-secret"))
    try:
        await eventually(lambda: receiver.rejected >= 3, timeout=5)
        await rig.stop()
        assert "the balancer rejected the management token" in agent.output
        assert not receiver.lines
    finally:
        await receiver.stop()


async def test_management_addr_from_environment(receiver: Receiver, rig: AgentRig) -> None:
    _, sim = rig.sim()
    agent = rower(
        "agent",
        env={
            "ROWER_MANAGEMENT_ADDR": receiver.addr,
            "ROWER_LOCAL_LLAMACPP_ADDR": sim,
            "ROWER_MONITORING_INTERVAL": str(INTERVAL_MS),
        },
    )
    rig.processes.append(agent)
    await eventually(lambda: len(receiver.lines) >= 2, timeout=10)
    assert receiver.statuses[-1].monitoring_interval_ms == INTERVAL_MS
