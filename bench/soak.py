"""Soak: a fleet under mixed streaming load while faults are injected at random, then a leak check.

    .venv/bin/python -m bench.soak --minutes 10

Starts a balancer, `--sims` `rower sim` servers and one agent each, on loopback. Clients send
`/completion` requests (most streaming, some not) in a loop; a share of them leave early at a
random moment. Every few seconds one fault hits at random: a server killed and restarted on its
port, a server frozen (SIGSTOP) and thawed, an agent killed and replaced (new id), an agent
frozen and thawed, an agent stopped gracefully (SIGTERM: it drains) and replaced. At the end
the load stops, every process is thawed, and the balancer must settle: nothing in flight or
buffered, every server idle, exactly one agent per server. The report gives requests served,
outcomes and errors by kind, faults by kind, and the leak check. Not a test: numbers go to
docs/reliability.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

REQUEST_DEADLINE = 60.0
"""A request that takes longer than this is counted as hung."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)


class Child:
    """One `rower` process, its output in a temporary file."""

    def __init__(self, *args: str) -> None:
        self.args = args
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed with the process
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "rower", *args],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def signal(self, signum: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, signum)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.signal(signal.SIGKILL)
            self.popen.wait(5)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(5)


def wait_http(url: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"{url} not ready after {seconds} s")


@dataclass
class Server:
    port: int
    sim: Child
    agent: Child
    frozen: bool = False
    agent_frozen: bool = False


@dataclass
class Soak:
    management: int
    proxy: int
    sims: int
    slots: int
    interval_ms: int
    servers: list[Server] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    children: list[Child] = field(default_factory=list)

    def start_sim(self, port: int) -> Child:
        sim = Child(
            "sim",
            "--addr",
            f"127.0.0.1:{port}",
            "--slots",
            str(self.slots),
            "--decode-tokens-per-second",
            "200",
            "--log-level",
            "warning",
        )
        self.children.append(sim)
        wait_http(f"http://127.0.0.1:{port}/health")
        return sim

    def start_agent(self, port: int) -> Child:
        agent = Child(
            "agent",
            "--management-addr",
            f"127.0.0.1:{self.management}",
            "--local-llamacpp-addr",
            f"127.0.0.1:{port}",
            "--monitoring-interval",
            str(self.interval_ms),
            "--max-drain-time",
            "5000",
            "--log-level",
            "warning",
        )
        self.children.append(agent)
        return agent

    def start(self) -> None:
        balancer = Child(
            "balancer",
            "--management-addr",
            f"127.0.0.1:{self.management}",
            "--reverseproxy-addr",
            f"127.0.0.1:{self.proxy}",
            "--max-buffered-requests",
            "200",
            "--buffered-request-timeout",
            "20000",
            "--log-level",
            "warning",
            "--access-log",
            "off",  # as nginx's `access_log off` in the baselines
        )
        self.children.append(balancer)
        wait_http(f"http://127.0.0.1:{self.management}/health")
        for _ in range(self.sims):
            port = free_port()
            sim = self.start_sim(port)
            self.servers.append(Server(port, sim, self.start_agent(port)))
        deadline = time.monotonic() + 20
        while len(self.view()["agents"]) < self.sims and time.monotonic() < deadline:
            time.sleep(0.1)

    def view(self) -> dict[str, Any]:
        return dict(get_json(f"http://127.0.0.1:{self.management}/api/v1/agents"))

    async def client(self, session: Any, rng: random.Random, until: float) -> None:
        import aiohttp

        while time.monotonic() < until:
            stream = rng.random() < 0.75
            body = {"prompt": "soak " * rng.randint(1, 40), "n_predict": rng.randint(5, 60)}
            body["stream"] = stream
            leave_after = rng.uniform(0.0, 0.4) if rng.random() < 0.1 else None

            async def one(body: dict[str, Any] = body) -> str:
                async with session.post(
                    f"http://127.0.0.1:{self.proxy}/completion", json=body
                ) as answer:
                    data = await answer.read()
                    if answer.status != 200:
                        return f"status {answer.status}"
                    if b'"stop":true' not in data and b'"stop": true' not in data:
                        return "200 incomplete"
                    return "200"

            task = asyncio.create_task(one())
            try:
                if leave_after is not None:
                    done, _ = await asyncio.wait({task}, timeout=leave_after)
                    if not done:
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        self.outcomes["client left early"] += 1
                        continue
                outcome = await asyncio.wait_for(task, REQUEST_DEADLINE)
            except TimeoutError:
                outcome = "HUNG"
            except aiohttp.ClientPayloadError:
                outcome = "stream cut (server died)"
            except aiohttp.ClientError as error:
                outcome = f"error {type(error).__name__}"
            self.outcomes[outcome] += 1

    async def inject(self, rng: random.Random, until: float, every: tuple[float, float]) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < until:
            await asyncio.sleep(rng.uniform(*every))
            if time.monotonic() >= until:
                return
            server = rng.choice(self.servers)
            kind = rng.choice(
                [
                    "server killed and restarted",
                    "server frozen and thawed",
                    "agent killed and replaced",
                    "agent frozen and thawed",
                    "agent stopped (drain) and replaced",
                ]
            )
            self.faults[kind] += 1
            pause = rng.uniform(0.5, 3.0)
            if kind == "server killed and restarted":
                server.sim.kill()
                await asyncio.sleep(pause)
                server.sim = await loop.run_in_executor(None, self.start_sim, server.port)
            elif kind == "server frozen and thawed":
                server.sim.signal(signal.SIGSTOP)
                await asyncio.sleep(pause)
                server.sim.signal(signal.SIGCONT)
            elif kind == "agent killed and replaced":
                server.agent.kill()
                await asyncio.sleep(pause / 3)
                server.agent = self.start_agent(server.port)
            elif kind == "agent frozen and thawed":
                server.agent.signal(signal.SIGSTOP)
                await asyncio.sleep(pause)
                server.agent.signal(signal.SIGCONT)
            else:
                old = server.agent
                old.signal(signal.SIGTERM)
                server.agent = self.start_agent(server.port)
                await loop.run_in_executor(None, old.popen.wait, 15)

    def settle(self, seconds: float = 30.0) -> dict[str, Any]:
        """Wait for the invariants; returns what was seen at the end."""
        deadline = time.monotonic() + seconds
        while True:
            view = self.view()
            busy = {
                s.port: sum(
                    slot["is_processing"] for slot in get_json(f"http://127.0.0.1:{s.port}/slots")
                )
                for s in self.servers
            }
            addresses = [a["status"]["external_llamacpp_addr"] for a in view["agents"]]
            check = {
                "requests_in_flight": view["requests_in_flight"],
                "requests_buffered": view["requests_buffered"],
                "servers_busy_slots": sum(busy.values()),
                "agents_listed": len(addresses),
                "servers": len(self.servers),
                "duplicate_addresses": len(addresses) - len(set(addresses)),
                "slots_taken": sum(a["slots_taken"] for a in view["agents"]),
            }
            ok = (
                check["requests_in_flight"] == 0
                and check["requests_buffered"] == 0
                and check["servers_busy_slots"] == 0
                and check["agents_listed"] == len(self.servers)
                and check["duplicate_addresses"] == 0
                and check["slots_taken"] == 0
            )
            if ok or time.monotonic() > deadline:
                check["leak_free"] = ok
                return check
            time.sleep(0.2)

    def close(self) -> None:
        for child in reversed(self.children):
            child.stop()


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import aiohttp

    soak = Soak(free_port(), free_port(), args.sims, args.slots, args.interval_ms)
    rng = random.Random(args.seed)
    try:
        await asyncio.get_running_loop().run_in_executor(None, soak.start)
        started = time.monotonic()
        until = started + args.minutes * 60
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector) as session:
            clients = [
                soak.client(session, random.Random(rng.random()), until)
                for _ in range(args.clients)
            ]
            injector = soak.inject(
                random.Random(rng.random()), until, (args.fault_min, args.fault_max)
            )
            await asyncio.gather(*clients, injector)
        elapsed = time.monotonic() - started
        for server in soak.servers:
            server.sim.signal(signal.SIGCONT)
            server.agent.signal(signal.SIGCONT)
        check = await asyncio.get_running_loop().run_in_executor(None, soak.settle)
    finally:
        soak.close()
    served = soak.outcomes["200"]
    return {
        "minutes": round(elapsed / 60, 2),
        "servers": args.sims,
        "slots_per_server": args.slots,
        "clients": args.clients,
        "requests": sum(soak.outcomes.values()),
        "served_complete": served,
        "served_per_second": round(served / elapsed, 1),
        "outcomes": dict(soak.outcomes.most_common()),
        "faults": dict(soak.faults.most_common()),
        "end_check": check,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--sims", type=int, default=3)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--clients", type=int, default=12)
    parser.add_argument("--interval-ms", type=int, default=200)
    parser.add_argument(
        "--fault-min", type=float, default=2.0, help="seconds between faults, least"
    )
    parser.add_argument("--fault-max", type=float, default=5.0, help="seconds between faults, most")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    report = asyncio.run(run(args))
    print(json.dumps(report, indent=2))
    hung = report["outcomes"].get("HUNG", 0)
    return 0 if report["end_check"]["leak_free"] and hung == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
