"""A small fleet of real processes for the observability tests: balancer, sims and agents.

Everything listens on loopback at free ports and is stopped when the `with` block ends; the
processes' output is printed if the block fails.
"""

from __future__ import annotations

import contextlib
import json
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from tests.processes import Process, free_port, rower


def get_json(url: str) -> Any:
    """GET `url` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)


def eventually(check: Callable[[], bool], *, timeout: float = 15.0, what: str = "") -> None:
    """Wait until `check()` is true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not true after {timeout} s: {what or check}")


@dataclass
class Server:
    """A `rower sim` and the `rower agent` that reports on it."""

    name: str
    sim: Process
    sim_port: int
    agent: Process | None = None


@dataclass
class ObservedFleet:
    """A balancer with observability switched on, and the servers started in it."""

    management_port: int = field(default_factory=free_port)
    proxy_port: int = field(default_factory=free_port)
    servers: dict[str, Server] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    balancer: Process | None = None

    @property
    def management(self) -> str:
        return f"127.0.0.1:{self.management_port}"

    @property
    def management_url(self) -> str:
        return f"http://{self.management}"

    @property
    def proxy_url(self) -> str:
        return f"http://127.0.0.1:{self.proxy_port}"

    def start_balancer(self, *extra: str) -> Process:
        """Start the balancer with the metrics endpoint and the dashboard on."""
        self.balancer = self._keep(
            rower(
                "balancer",
                "--management-addr",
                self.management,
                "--reverseproxy-addr",
                f"127.0.0.1:{self.proxy_port}",
                "--metrics-endpoint-enable",
                "--management-dashboard-enable",
                *extra,
            )
        )
        self.balancer.wait_http(f"{self.management_url}/health")
        return self.balancer

    def start_server(
        self, name: str, *, slots: int = 2, tokens_per_second: int = 50, interval_ms: int = 200
    ) -> Server:
        """Start a sim with `slots` slots and an agent named `name` for it; wait until listed."""
        port = free_port()
        sim = self._keep(
            rower(
                "sim",
                "--addr",
                f"127.0.0.1:{port}",
                "--slots",
                str(slots),
                "--decode-tokens-per-second",
                str(tokens_per_second),
            )
        )
        sim.wait_http(f"http://127.0.0.1:{port}/health")
        server = Server(name, sim, port)
        self.servers[name] = server
        self.start_agent(name, interval_ms=interval_ms)
        return server

    def start_agent(self, name: str, *, interval_ms: int = 200) -> None:
        """Start (again) the agent of server `name`; wait until the balancer lists it."""
        server = self.servers[name]
        server.agent = self._keep(
            rower(
                "agent",
                "--management-addr",
                self.management,
                "--local-llamacpp-addr",
                f"127.0.0.1:{server.sim_port}",
                "--name",
                name,
                "--monitoring-interval",
                str(interval_ms),
            )
        )
        eventually(lambda: name in self.agent_names(), what=f"agent {name} listed")

    def agents(self) -> list[dict[str, Any]]:
        """`/api/v1/agents` now."""
        return list(get_json(f"{self.management_url}/api/v1/agents")["agents"])

    def agent_names(self) -> list[str]:
        """Names of the listed agents."""
        return [agent["status"]["agent_name"] for agent in self.agents()]

    def _keep(self, process: Process) -> Process:
        self.processes.append(process)
        return process

    def close(self) -> None:
        """Stop every process, the balancer last."""
        for process in reversed(self.processes):
            process.close()

    def outputs(self) -> str:
        """Every process's output, for a failure message."""
        return "\n".join(f"--- {' '.join(p.argv)} ---\n{p.output}" for p in self.processes)


@contextlib.contextmanager
def observed_fleet() -> Iterator[ObservedFleet]:
    """An empty `ObservedFleet`, closed at the end, with its logs printed on failure."""
    fleet = ObservedFleet()
    try:
        yield fleet
    except BaseException:
        print(fleet.outputs())
        raise
    finally:
        fleet.close()


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
