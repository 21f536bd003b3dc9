"""Hundreds of clients that hold connections and send little or nothing, while others work.

Slow request heads, idle connections and stalled bodies are closed by the listeners' deadlines
(`--request-header-timeout`, `--idle-connection-timeout`, `--request-body-timeout`), none of
them holds a slot, and normal traffic measured at the same time keeps its latency. One
connection more than `--max-client-connections` gets a 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass

import aiohttp

from rower.balancer.http_limits import LINGER
from tests.chaos.invariants import bounded, settled
from tests.chaos.raw_http import exchange, read_answer
from tests.integration.fleet import Fleet

HEADER_TIMEOUT = 2.0
IDLE_TIMEOUT = 3.0
BODY_TIMEOUT = 2.0
SLACK = 2.5
"""How late a deadline may close a connection on a busy 2-core machine, in seconds."""

STALLED_HEAD = (
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 1000\r\n\r\n"
)
STALLED_BODY = b'{"messages": ['  # 14 bytes of 1000, then nothing


def deadline_flags() -> list[str]:
    return [
        "--request-header-timeout",
        str(int(HEADER_TIMEOUT * 1000)),
        "--idle-connection-timeout",
        str(int(IDLE_TIMEOUT * 1000)),
        "--request-body-timeout",
        str(int(BODY_TIMEOUT * 1000)),
    ]


@dataclass
class Held:
    """One hostile connection: when it started sending, and how the server ended it."""

    kind: str
    started: float
    ended: float | None = None
    status: int | None = None

    @property
    def lasted(self) -> float:
        assert self.ended is not None, f"{self.kind} connection never closed by the server"
        return self.ended - self.started


async def hold(port: int, kind: str, *, give_up: float) -> Held:
    """Open a connection and misbehave as `kind` until the server closes it (or `give_up`)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    held = Held(kind, time.monotonic())

    async def misbehave() -> None:
        with contextlib.suppress(ConnectionError):
            if kind == "slow head":
                for byte in b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 100:
                    writer.write(bytes([byte]))
                    await writer.drain()
                    await asyncio.sleep(0.5)
            elif kind == "stalled body":
                writer.write(STALLED_HEAD + STALLED_BODY)
                await writer.drain()

    sender = asyncio.create_task(misbehave())
    try:
        answer = await asyncio.wait_for(read_answer(reader), give_up)
        if answer is not None:
            held.status = answer.status
            await asyncio.wait_for(reader.read(), give_up)
        held.ended = time.monotonic()
    except TimeoutError:
        pass  # not closed: `lasted` says so
    except (asyncio.IncompleteReadError, ConnectionError):
        # Closed while this side was still sending: a reset instead of an end of stream.
        held.ended = time.monotonic()
    finally:
        sender.cancel()
        writer.close()
    return held


async def normal_traffic(url: str, seconds: float, latencies: list[float]) -> None:
    """Short completions, one after another, for `seconds`; each one's latency is kept."""
    body = {"prompt": "hello", "n_predict": 2}
    async with aiohttp.ClientSession() as session:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            started = time.monotonic()
            async with session.post(url + "/completion", json=body) as answer:
                await answer.read()
                assert answer.status == 200
            latencies.append(time.monotonic() - started)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]


async def test_slow_idle_and_stalled_connections_are_closed_while_traffic_flows(
    fleet: Fleet,
) -> None:
    fleet.balancer(*deadline_flags())
    sim = fleet.sim(slots=4, speed=2000)
    fleet.agent(sim)
    fleet.wait_agents(1)
    give_up = IDLE_TIMEOUT + 3 * SLACK
    kinds = {"idle": 100, "slow head": 100, "stalled body": 100}
    holders = [
        asyncio.create_task(hold(fleet.proxy_port, kind, give_up=give_up))
        for kind, count in kinds.items()
        for _ in range(count)
    ]
    holders += [
        asyncio.create_task(hold(fleet.management_port, kind, give_up=give_up))
        for kind in ("idle", "slow head")
        for _ in range(25)
    ]
    await asyncio.sleep(1.0)
    # A hundred stalled bodies and none holds a slot: the body is read before one is asked for.
    view = fleet.agents_view()
    assert view["requests_in_flight"] == 0, view
    assert all(agent["slots_taken"] == 0 for agent in view["agents"]), view
    latencies: list[float] = []
    await bounded(
        asyncio.gather(*(normal_traffic(fleet.proxy, 4.0, latencies) for _ in range(4))),
        "normal traffic",
    )
    held = await bounded(asyncio.gather(*holders), "hostile connections")

    print(f"normal traffic beside {len(holders)} hostile connections: {len(latencies)} requests,")
    print(f"p50 {sorted(latencies)[len(latencies) // 2]:.3f} s, p99 {p99(latencies):.3f} s")
    assert len(latencies) > 50, f"only {len(latencies)} requests in 4 s"
    assert p99(latencies) < 1.0, f"p99 {p99(latencies):.3f} s over {len(latencies)} requests"
    limits = {
        "idle": IDLE_TIMEOUT,
        "slow head": HEADER_TIMEOUT + 0.5,
        # The 408 comes at the deadline; the rest of the body is then waited for LINGER.
        "stalled body": BODY_TIMEOUT + LINGER,
    }
    for one in held:
        assert one.lasted < limits[one.kind] + SLACK, f"{one.kind} held {one.lasted:.1f} s"
        assert one.lasted > limits[one.kind] - 0.6, f"{one.kind} cut at {one.lasted:.1f} s"
    statuses = {kind: {h.status for h in held if h.kind == kind} for kind in kinds}
    assert statuses == {"idle": {None}, "slow head": {408}, "stalled body": {408}}, statuses
    await settled(fleet)


async def test_stalled_bodies_beyond_the_slot_count_block_nothing(fleet: Fleet) -> None:
    fleet.balancer(*deadline_flags())
    sim = fleet.sim(slots=2, speed=2000)
    fleet.agent(sim)
    fleet.wait_agents(1)
    stalled = [
        asyncio.create_task(hold(fleet.proxy_port, "stalled body", give_up=BODY_TIMEOUT + SLACK))
        for _ in range(6)
    ]
    await asyncio.sleep(0.5)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with session.post(fleet.proxy + "/v1/chat/completions", json=body) as answer:
            assert answer.status == 200, await answer.text()
    assert time.monotonic() - started < 1.0
    held = await bounded(asyncio.gather(*stalled), "stalled bodies")
    assert {h.status for h in held} == {408}
    error = (await exchange(fleet.proxy_port, STALLED_HEAD + STALLED_BODY, wait=5)).first.error()
    assert "--request-body-timeout" in error["message"]
    assert fleet.agents_view()["requests_in_flight"] == 0
    await settled(fleet)


async def test_one_connection_too_many_gets_503_and_is_closed(fleet: Fleet) -> None:
    fleet.balancer("--max-client-connections", "20", "--max-agents", "2")
    sim = fleet.sim(slots=1)
    fleet.agent(sim)
    fleet.wait_agents(1)
    for port, room in ((fleet.proxy_port, 20), (fleet.management_port, 22 - 1)):
        # The management listener takes --max-agents more; the agent holds one of them.
        opened = [await asyncio.open_connection("127.0.0.1", port) for _ in range(room)]
        await asyncio.sleep(0.2)
        seen = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert seen.first.status == 503
        assert seen.first.header("retry-after") == "1"
        assert "--max-client-connections" in seen.first.error()["message"]
        assert seen.closed
        for _, writer in opened[:5]:
            writer.close()
        await asyncio.sleep(0.3)
        seen = await exchange(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert seen.first.status == 200
        for _, writer in opened[5:]:
            writer.close()
    await settled(fleet)
