"""A whole fleet of real processes on loopback: a balancer, `rower sim` servers, agents.

Tests start what they need, talk HTTP to it, and everything is killed when the test ends.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.processes import LoopbackServer, Process, free_port, rower


def get_json(url: str, timeout: float = 5.0) -> Any:
    """GET `url` and decode its JSON body (blocking; fine for test setup)."""
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.load(answer)


def stream_completion(proxy_url: str, tokens: int) -> Iterator[bytes]:
    """A streaming completion through the proxy; yields its SSE chunks as they come."""
    body = json.dumps({"prompt": "Tell me a long story", "n_predict": tokens, "stream": True})
    request = urllib.request.Request(
        f"{proxy_url}/completion",
        data=body.encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        while chunk := answer.read1(4096):
            yield chunk


async def until(check: Callable[[], bool], *, within: float = 10.0, what: str = "") -> None:
    """`eventually` for async tests: lets the event loop run between checks."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not true after {within}s: {what or check}")


def eventually(check: Callable[[], bool], *, timeout: float = 10.0, what: str = "") -> None:
    """Wait until `check()` is true, polling every 20 ms; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.02)
    raise AssertionError(f"not true after {timeout}s: {what or check}")


OBSERVABILITY = ("--metrics-endpoint-enable", "--management-dashboard-enable")
"""Balancer flags for the metrics endpoint and the web dashboard."""


@dataclass
class Sim(LoopbackServer):
    """One `rower sim` process."""

    process: Process
    port: int

    def slots_processing(self) -> int:
        return sum(slot["is_processing"] for slot in get_json(self.url + "/slots"))

    def counters(self) -> dict[str, int]:
        """The sim's own counters: requests_total, requests_deferred, requests_cancelled..."""
        return dict(get_json(self.url + "/props")["rower_sim"])


@dataclass
class Fleet:
    """Processes of one test, stopped by `close`.

    The balancer's ports are chosen up front, so a client can be pointed at a balancer that
    is not started yet, and a restarted balancer is found where the old one was.
    """

    processes: list[Process] = field(default_factory=list)
    management_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    sims: list[Sim] = field(default_factory=list)
    agents: list[Process] = field(default_factory=list)

    @property
    def management_addr(self) -> str:
        """`host:port` of the management API, as `--management-addr` takes it."""
        return f"127.0.0.1:{self.management_port}"

    @property
    def management(self) -> str:
        return f"http://{self.management_addr}"

    @property
    def proxy(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def balancer(self, *flags: str) -> Process:
        """Start the balancer on the fleet's ports with `flags` and wait for its /health."""
        process = rower(
            "balancer",
            "--management-addr",
            self.management_addr,
            "--reverseproxy-addr",
            f"127.0.0.1:{self.proxy_port}",
            *flags,
        )
        self.processes.append(process)
        process.wait_http(self.management + "/health")
        return process

    def sim(
        self,
        *,
        slots: int = 1,
        speed: int = 200,
        flags: Sequence[str] = (),
        ready: Sequence[int] = (200,),
    ) -> Sim:
        """Start a `rower sim` with `slots` slots decoding `speed` tokens/s.

        `ready` are the `/health` statuses that count as started (503 for a loading one).
        """
        port = free_port()
        process = rower(
            "sim",
            "--addr",
            f"127.0.0.1:{port}",
            "--slots",
            str(slots),
            "--decode-tokens-per-second",
            str(speed),
            *flags,
        )
        self.processes.append(process)
        sim = Sim(process, port)
        process.wait_http(sim.url + "/health", statuses=ready)
        self.sims.append(sim)
        return sim

    def agent(
        self,
        sim: LoopbackServer,
        *,
        name: str | None = None,
        interval_ms: int = 100,
        flags: Sequence[str] = (),
    ) -> Process:
        """Start an agent for `sim` (or a real llama-server), reporting to this balancer.

        It is named `name`, or `sim-PORT` after the server's port.
        """
        process = rower(
            "agent",
            "--management-addr",
            self.management_addr,
            "--local-llamacpp-addr",
            sim.addr,
            "--name",
            name or f"sim-{sim.port}",
            "--monitoring-interval",
            str(interval_ms),
            *flags,
        )
        self.processes.append(process)
        self.agents.append(process)
        return process

    def sim_with_agent(
        self, name: str, *, slots: int = 1, speed: int = 200, interval_ms: int = 100
    ) -> tuple[Sim, Process]:
        """Start a sim and an agent named `name` for it; wait until the balancer lists it."""
        sim = self.sim(slots=slots, speed=speed)
        agent = self.agent(sim, name=name, interval_ms=interval_ms)
        eventually(lambda: name in self.agent_names(), timeout=15.0, what=f"agent {name} listed")
        return sim, agent

    def agents_view(self) -> dict[str, Any]:
        return dict(get_json(self.management + "/api/v1/agents"))

    def agents_by_addr(self) -> dict[str, dict[str, Any]]:
        """The balancer's agent entries by the server address each reports."""
        return {a["status"]["external_llamacpp_addr"]: a for a in self.agents_view()["agents"]}

    def agent_names(self) -> list[str]:
        """Names of the agents the balancer lists now."""
        return [agent["status"]["agent_name"] for agent in self.agents_view()["agents"]]

    def wait_agents(self, count: int, *, usable: bool = True) -> None:
        """Wait until `count` agents are registered (and usable, unless told otherwise)."""

        def ready() -> bool:
            agents = self.agents_view()["agents"]
            return len(agents) == count and all(a["is_usable"] or not usable for a in agents)

        eventually(ready, what=f"{count} agents registered")

    def in_flight(self) -> int:
        """Requests the balancer counts as running on its upstreams.

        The fleet's own count, not a sum over the agents listed: a request whose agent left
        is still in flight, and a sum would read it as 0.
        """
        return int(self.agents_view()["requests_in_flight"])

    def close(self) -> None:
        for process in reversed(self.processes):
            process.close()

    def outputs(self) -> str:
        return "\n".join(f"--- {' '.join(p.argv[2:4])} ---\n{p.output}" for p in self.processes)
