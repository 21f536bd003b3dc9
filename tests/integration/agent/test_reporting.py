"""The agent's status streams against real NDJSON receivers on loopback."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from rower.addresses import Address
from rower.agent.agent import Agent, AgentConfig
from rower.agent.latest_status import LatestStatus
from rower.agent.reporter import Reporter
from rower.status import MAX_POLL_AGE_MS, StatusUpdate
from tests.integration.agent.peers import FakeLlama, Receiver, eventually
from tests.processes import free_port


class Running:
    """An `Agent` running in this event loop until `stop()`."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.stop_event = asyncio.Event()
        self.task = asyncio.create_task(agent.run(self.stop_event))

    async def stop(self) -> None:
        self.stop_event.set()
        await asyncio.wait_for(self.task, 5)


def start_agent(
    llama: FakeLlama,
    *receivers: str,
    interval_ms: int = 50,
    token: str | None = None,
    max_drain_time: float = 30.0,
) -> Running:
    return Running(
        Agent(
            AgentConfig(
                management_addrs=[Address.parse(addr) for addr in receivers],
                local_llamacpp_addr=Address.parse(llama.addr),
                external_llamacpp_addr=Address.parse("10.0.0.9:8080"),
                name="gpu-1",
                monitoring_interval_ms=interval_ms,
                management_token=token,
                max_drain_time=max_drain_time,
            )
        )
    )


async def test_streams_ndjson_statuses(llama: FakeLlama, receiver: Receiver) -> None:
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 3)
    await running.stop()
    first = receiver.lines[0]
    assert first.agent_id == running.agent.agent_id
    assert first.status.agent_name == "gpu-1"
    assert first.status.external_llamacpp_addr == "10.0.0.9:8080"
    assert (first.status.slots_idle, first.status.slots_total) == (2, 2)
    assert first.status.monitoring_interval_ms == 50
    sequences = [status.sequence for status in receiver.statuses]
    assert sequences == sorted(set(sequences))
    assert receiver.headers[0]["Content-Type"] == "application/x-ndjson"
    assert "Authorization" not in receiver.headers[0]


async def test_stop_sends_a_draining_line_and_ends_the_stream(
    llama: FakeLlama, receiver: Receiver
) -> None:
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 2)
    started = time.monotonic()
    await running.stop()
    assert time.monotonic() - started < 1
    # The receiver saw the body end (not a dropped connection).
    assert receiver.streams_ended == 1
    last = receiver.latest
    assert last is not None
    assert last.is_draining
    assert last.slots_idle == 0
    # Draining, once said, is said on every line after (the drain polls, then the last line).
    flags = [status.is_draining for status in receiver.statuses]
    assert not flags[0]
    assert flags == sorted(flags)


async def test_a_routers_last_line_leaves_no_model_idle(
    llama: FakeLlama, receiver: Receiver
) -> None:
    llama.state.router = {"tiny-a": "loaded", "tiny-b": "loaded", "tiny-c": "unloaded"}
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: receiver.latest is not None and receiver.latest.slots_idle == 4)
    await running.stop()
    last = receiver.latest
    assert last is not None
    assert (last.is_draining, last.is_router, last.slots_idle, last.slots_total) == (
        True,
        True,
        0,
        4,
    )
    assert [(m.model, m.slots_idle, m.slots_total) for m in last.models] == [
        ("tiny-a", 0, 2),
        ("tiny-b", 0, 2),
        ("tiny-c", 0, 0),
    ]
    assert llama.state.loads == []


async def test_a_change_reaches_the_balancer_at_the_next_poll(
    llama: FakeLlama, receiver: Receiver
) -> None:
    running = start_agent(llama, receiver.addr, interval_ms=200)
    await eventually(lambda: len(receiver.lines) >= 1)
    changed_at = time.monotonic()
    llama.state.slots[0]["is_processing"] = True
    await eventually(lambda: receiver.latest is not None and receiver.latest.slots_processing == 1)
    # At most one interval (200 ms) until the next poll, plus the delivery itself.
    assert time.monotonic() - changed_at < 0.3
    llama.state.slots[0]["is_processing"] = False  # else stopping drains for 30 s
    await running.stop()


async def test_stop_drains_until_no_slot_is_processing(
    llama: FakeLlama, receiver: Receiver
) -> None:
    llama.state.slots[0]["is_processing"] = True
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 2)
    running.stop_event.set()
    await eventually(lambda: receiver.latest is not None and receiver.latest.is_draining)
    # Still streaming: the balancer keeps the agent (and its request in flight) registered.
    lines = len(receiver.lines)
    await eventually(lambda: len(receiver.lines) >= lines + 3)
    assert not running.task.done()
    assert receiver.streams_ended == 0
    llama.state.slots[0]["is_processing"] = False
    await asyncio.wait_for(running.task, 2)
    assert receiver.streams_ended == 1
    assert receiver.latest is not None
    assert receiver.latest.is_draining


async def test_drain_gives_up_after_max_drain_time(llama: FakeLlama, receiver: Receiver) -> None:
    llama.state.slots[0]["is_processing"] = True
    running = start_agent(llama, receiver.addr, max_drain_time=0.3)
    await eventually(lambda: len(receiver.lines) >= 2)
    started = time.monotonic()
    await running.stop()
    assert 0.25 < time.monotonic() - started < 1.5
    assert receiver.streams_ended == 1


async def test_reporter_sends_a_new_status_at_once(receiver: Receiver) -> None:
    board = LatestStatus()
    reporter = Reporter(management_addr=Address.parse(receiver.addr), agent_id="a-1", board=board)
    task = asyncio.create_task(reporter.run())
    try:
        delays = []
        for sequence in range(1, 6):
            published = time.monotonic()
            board.publish(StatusUpdate(external_llamacpp_addr="h:1", sequence=sequence))
            await eventually(lambda: len(receiver.lines) == sequence, timeout=2)  # noqa: B023
            delays.append(receiver.lines[-1].at - published)
        assert max(delays) < 0.05, delays
        assert [line.agent_id for line in receiver.lines] == ["a-1"] * 5
    finally:
        board.close()
        await asyncio.wait_for(task, 3)
    assert receiver.streams_ended == 1


async def test_each_line_says_how_old_its_poll_is(llama: FakeLlama, receiver: Receiver) -> None:
    # Never older than the server's answer really is when the line arrives: a larger age
    # would free slots of requests that ended before the poll (docs/decisions.md).
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 5)
    await running.stop()
    answered = llama.state.slots_answered_at
    *polled, last = receiver.lines
    # Sequence n is the agent's n-th poll, so its `/slots` answer is the n-th one; the line a
    # stopping agent sends last repeats the last poll's counts (its sequence is one more).
    pairs = [(line, answered[line.status.sequence - 1]) for line in polled]
    pairs.append((last, answered[-1]))
    assert last.status.sequence == len(answered) + 1
    for line, answer in pairs:
        age = line.status.poll_age_ms
        assert age is not None
        assert 0 <= age / 1000 <= line.at - answer, line


@pytest.mark.parametrize(("polled_ago", "capped"), [(5.0, False), (1000.0, True)])
async def test_a_line_counts_its_age_from_the_poll(
    receiver: Receiver, polled_ago: float, capped: bool
) -> None:
    # As when a reconnecting reporter sends the newest status again: its poll is that old.
    board = LatestStatus()
    published = time.monotonic()
    board.publish(StatusUpdate(external_llamacpp_addr="h:1"), polled_at=published - polled_ago)
    reporter = Reporter(management_addr=Address.parse(receiver.addr), agent_id="a-1", board=board)
    task = asyncio.create_task(reporter.run())
    try:
        await eventually(lambda: len(receiver.lines) == 1, timeout=2)
    finally:
        board.close()
        await asyncio.wait_for(task, 3)
    age = receiver.lines[0].status.poll_age_ms
    if capped:
        # Still a line the balancer takes; a smaller age is the safe error.
        assert age == MAX_POLL_AGE_MS
    else:
        assert age is not None
        assert polled_ago <= age / 1000 <= polled_ago + receiver.lines[0].at - published


async def test_several_balancers_each_get_every_status(llama: FakeLlama) -> None:
    one, two = Receiver(), Receiver()
    await one.start()
    await two.start()
    running = start_agent(llama, one.addr, two.addr)
    try:
        await eventually(lambda: len(one.lines) >= 3 and len(two.lines) >= 3)
        assert one.lines[0].agent_id == two.lines[0].agent_id
    finally:
        await running.stop()
        await one.stop()
        await two.stop()


async def test_a_dead_balancer_does_not_delay_another(llama: FakeLlama, receiver: Receiver) -> None:
    dead = f"127.0.0.1:{free_port()}"
    running = start_agent(llama, dead, receiver.addr, interval_ms=100)
    await eventually(lambda: len(receiver.lines) >= 6, timeout=2)
    gaps = [b.at - a.at for a, b in zip(receiver.lines, receiver.lines[1:], strict=False)]
    assert max(gaps) < 0.25
    await running.stop()


async def test_reconnects_soon_after_the_balancer_comes_back(
    llama: FakeLlama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rower")
    receiver = Receiver()
    await receiver.start()
    running = start_agent(llama, receiver.addr)
    try:
        await eventually(lambda: len(receiver.lines) >= 2)
        await receiver.stop()
        await asyncio.sleep(1.0)
        seen = len(receiver.lines)
        back = Receiver(port=receiver.port)
        await back.start()
        restarted = time.monotonic()
        await eventually(lambda: len(back.lines) >= 1, timeout=3)
        assert time.monotonic() - restarted < 1.5
        # The first line after a reconnect is the newest status, not a stale one.
        assert back.statuses[0].sequence > receiver.statuses[seen - 1].sequence
        assert "reconnecting" in caplog.text
        await running.stop()
        await back.stop()
    finally:
        if not running.task.done():
            await running.stop()


async def test_rejected_token_is_logged_and_retried(
    llama: FakeLlama, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="rower")
    receiver = Receiver(token="right")
    await receiver.start()
    running = start_agent(llama, receiver.addr, token="wrong")
    try:
        await eventually(lambda: receiver.rejected >= 3, timeout=3)
        assert receiver.headers[0]["Authorization"] == "Bearer wrong"
        assert not receiver.lines
        assert "the balancer rejected the management token (401 invalid management token)" in (
            caplog.text
        )
        # Logged once, not at every retry.
        assert caplog.text.count("rejected the management token") == 1
        # Fixing the token on the balancer side lets the next retry in.
        receiver.token = "wrong"
        await eventually(lambda: len(receiver.lines) >= 2, timeout=3)
    finally:
        await running.stop()
        await receiver.stop()


async def test_missing_token_says_how_to_fix_it(
    llama: FakeLlama, caplog: pytest.LogCaptureFixture
) -> None:
    receiver = Receiver(token="needed")
    await receiver.start()
    running = start_agent(llama, receiver.addr)
    try:
        await eventually(lambda: receiver.rejected >= 1)
        await eventually(lambda: "set --management-token" in caplog.text)
    finally:
        await running.stop()
        await receiver.stop()


async def test_token_is_sent(llama: FakeLlama) -> None:
    receiver = Receiver(token="s3cret")
    await receiver.start()
    running = start_agent(llama, receiver.addr, token="s3cret")
    try:
        await eventually(lambda: len(receiver.lines) >= 2)
        assert receiver.headers[0]["Authorization"] == "Bearer s3cret"
    finally:
        await running.stop()
        await receiver.stop()


async def test_bad_request_answer_is_logged_and_retried_with_backoff(
    llama: FakeLlama, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    receiver.reject_all_with = 400
    running = start_agent(llama, receiver.addr)
    await asyncio.sleep(1.2)
    await running.stop()
    assert "the balancer rejected a status line (400 rejected by the test)" in caplog.text
    # 0.25 s, 0.5 s, 1 s (±20 %) between attempts: 3 or 4 attempts in 1.2 s, not dozens.
    assert 2 <= receiver.rejected <= 4


async def test_llama_issue_is_reported_with_no_idle_slots(
    llama: FakeLlama, receiver: Receiver
) -> None:
    running = start_agent(llama, receiver.addr)
    await eventually(lambda: len(receiver.lines) >= 1)
    await llama.stop()

    def down() -> StatusUpdate | None:
        latest = receiver.latest
        return latest if latest is not None and latest.is_connect_error else None

    await eventually(down)
    latest = down()
    assert latest is not None
    assert latest.error == f"Request to http://{llama.addr}/slots failed: connection refused"
    assert latest.slots_idle == 0
    await running.stop()
