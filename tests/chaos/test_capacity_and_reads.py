"""What the fleet view tells autoscalers and strangers: usable capacity only, and only to holders
of the token when reads are guarded."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from tests.chaos.invariants import freeze, thaw
from tests.integration.fleet import OBSERVABILITY, Fleet, until
from tests.integration.test_metrics import scrape
from tests.processes import free_port


def idle_by_name(fleet: Fleet) -> dict[str, tuple[int, list[str]]]:
    return {
        agent["status"]["agent_name"]: (agent["status"]["slots_idle"], agent["unusable_reasons"])
        for agent in fleet.agents_view()["agents"]
    }


class StatsdGauges:
    """The latest value of each StatsD gauge received on `sock`."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self.latest: dict[str, str] = {}

    def read(self) -> dict[str, str]:
        while True:
            try:
                name, _, value = self.sock.recv(1024).decode().partition(":")
            except BlockingIOError:
                return self.latest
            self.latest[name] = value


async def test_unusable_capacity_is_shown_as_zero_idle(
    fleet: Fleet, statsd_socket: socket.socket
) -> None:
    statsd_port = statsd_socket.getsockname()[1]
    fleet.balancer(
        *OBSERVABILITY,
        "--statsd-addr",
        f"127.0.0.1:{statsd_port}",
        "--statsd-reporting-interval",
        "100",
    )
    gauges = StatsdGauges(statsd_socket)
    _, frozen = fleet.sim_with_agent("frozen", slots=2)
    fleet.sim_with_agent("drained", slots=3)
    fleet.sim_with_agent("healthy", slots=4)
    await until(lambda: sum(i for i, _ in idle_by_name(fleet).values()) == 9, what="9 idle")

    def totals_are(idle: int) -> bool:
        _, samples = scrape(fleet)
        statsd = gauges.read().get("rower.slots_idle")
        view = sum(i for i, _ in idle_by_name(fleet).values())
        return samples[("rower_slots_idle", ())] == idle and statsd == f"{idle}|g" and view == idle

    # A frozen agent: its reports stop, the upstream goes stale and its slots are not idle.
    freeze(frozen)
    try:
        await until(lambda: idle_by_name(fleet)["frozen"] == (0, ["stale"]), what="stale at 0")
        await until(lambda: totals_are(7), what="totals without the stale agent")

        # An operator drains one.
        drained_id = next(
            a["agent_id"]
            for a in fleet.agents_view()["agents"]
            if a["status"]["agent_name"] == "drained"
        )
        async with aiohttp.ClientSession() as session:
            url = f"{fleet.management}/api/v1/agents/{drained_id}/drain"
            async with session.post(url) as answer:
                assert answer.status == 200
        await until(lambda: idle_by_name(fleet)["drained"] == (0, ["draining"]), what="drained")
        await until(lambda: totals_are(4), what="totals without the drained agent")

        # An agent whose server refuses connections is quarantined by the first request.
        async with quarantined_agent(fleet) as name:
            async with aiohttp.ClientSession() as session:
                body = {"prompt": "hi", "n_predict": 1}
                async with session.post(fleet.proxy + "/completion", json=body) as answer:
                    assert answer.status == 200
            await until(
                lambda: idle_by_name(fleet)[name] == (0, ["quarantined"]), what="quarantined"
            )
            await until(lambda: totals_are(4), what="totals without the quarantined agent")
            agents = fleet.agents_view()["agents"]
            assert [a["status"]["agent_name"] for a in agents if a["is_usable"]] == ["healthy"]
            assert all(a["slots_free"] == 0 for a in agents if not a["is_usable"])
    finally:
        thaw(frozen)
    await until(lambda: idle_by_name(fleet)["frozen"] == (2, []), what="thawed agent usable")


@contextlib.asynccontextmanager
async def quarantined_agent(fleet: Fleet) -> AsyncIterator[str]:
    """A status stream, kept open, for a server that refuses every connection and seems idle."""
    name = "refusing"
    status = {
        "agent_name": name,
        "external_llamacpp_addr": f"127.0.0.1:{free_port()}",
        "slots_idle": 8,
        "slots_total": 8,
        "model": "sim",
        "slots": [{"id": i, "is_processing": False, "n_ctx": 4096} for i in range(8)],
        "monitoring_interval_ms": 60000,  # the most a balancer accepts: never stale here
    }
    lines: asyncio.Queue[bytes | None] = asyncio.Queue()
    lines.put_nowait(json.dumps(status).encode() + b"\n")

    async def body() -> AsyncIterator[bytes]:
        while (line := await lines.get()) is not None:
            yield line

    async with aiohttp.ClientSession() as session:
        url = f"{fleet.management}/api/v1/agent_status_update/refusing-agent"
        stream = asyncio.create_task(session.post(url, data=body()))
        try:
            await until(lambda: name in fleet.agent_names(), what="the refusing agent listed")
            yield name
        finally:
            lines.put_nowait(None)
            answer = await stream
            answer.close()


TOKEN = "reads-token"
GUARDED = ("/api/v1/agents", "/api/v1/agents/stream", "/api/v1/metrics", "/metrics", "/nowhere")
OPEN = (
    "/health",
    "/api/v1/openapi.json",
    "/dashboard",
    "/dashboard/app.js",
    "/dashboard/style.css",
)


async def test_the_token_guards_reads_when_asked(fleet: Fleet) -> None:
    fleet.balancer(*OBSERVABILITY, "--management-token", TOKEN, "--management-token-guards-reads")
    sim = fleet.sim(slots=1)
    fleet.agent(sim, name="guarded", flags=["--management-token", TOKEN])
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:

        async def listed() -> list[Any]:
            async with session.get(fleet.management + "/api/v1/agents", headers=bearer) as answer:
                assert answer.status == 200
                return list((await answer.json())["agents"])

        for _ in range(100):
            if await listed():
                break
            await asyncio.sleep(0.1)
        assert [a["status"]["agent_name"] for a in await listed()] == ["guarded"]
        for path in GUARDED:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
                async with session.get(fleet.management + path, headers=headers) as answer:
                    assert answer.status == 401, path
                    assert answer.headers["WWW-Authenticate"].startswith("Bearer")
                    error = (await answer.json())["error"]
                    assert "--management-token-guards-reads" in error["message"]
            async with session.head(fleet.management + path) as answer:
                assert answer.status == 401, path
        for path in GUARDED[2:4]:
            async with session.get(fleet.management + path, headers=bearer) as answer:
                assert answer.status == 200, path
                assert "rower_slots_idle" in await answer.text()
        async with session.get(fleet.management + GUARDED[1], headers=bearer) as answer:
            assert answer.status == 200
            first = await answer.content.readuntil(b"\n\n")
            assert b"guarded" in first
        for path in OPEN:
            async with session.get(fleet.management + path) as answer:
                assert answer.status == 200, path
        async with session.post(fleet.management + "/api/v1/agents/x/drain") as answer:
            assert answer.status == 401


def test_guarding_reads_needs_a_token() -> None:
    port = free_port()
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "rower",
            "balancer",
            "--management-token-guards-reads",
            "--management-addr",
            f"127.0.0.1:{port}",
            "--reverseproxy-addr",
            f"127.0.0.1:{port + 1}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert finished.returncode == 2
    assert "--management-token-guards-reads needs --management-token" in finished.stderr
