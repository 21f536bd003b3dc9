"""What must hold after any fault, and small tools to cause faults and watch clients."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.integration.fleet import Fleet, Sim, until
from tests.processes import Process

CLIENT_DEADLINE = 20.0
"""No request of a test may take longer than this: past it, it hangs."""


async def settled(
    fleet: Fleet,
    *,
    sims: Iterable[Sim] | None = None,
    agents: int | None = None,
    within: float = 8.0,
) -> None:
    """The invariants: nothing in flight or waiting, every server idle, no agent entry leaked.

    `sims` are the servers still running (default: every sim of the fleet); `agents` is how
    many agents must be listed (default: one per running sim).
    """
    live = list(fleet.sims if sims is None else sims)
    expected_agents = len(live) if agents is None else agents

    def balancer_idle() -> bool:
        view = fleet.agents_view()
        return view["requests_in_flight"] == 0 and view["requests_buffered"] == 0

    await until(balancer_idle, within=within, what="balancer: nothing in flight or buffered")
    for sim in live:
        await until(
            lambda sim=sim: sim.slots_processing() == 0,
            within=within,
            what=f"sim {sim.addr} idle",
        )

    def agents_listed() -> bool:
        view = fleet.agents_view()
        return len(view["agents"]) == expected_agents and all(
            a["slots_taken"] == 0 for a in view["agents"]
        )

    await until(agents_listed, within=within, what=f"exactly {expected_agents} agents listed")
    addresses = [a["status"]["external_llamacpp_addr"] for a in fleet.agents_view()["agents"]]
    assert len(addresses) == len(set(addresses)), f"a server is listed twice: {addresses}"


@dataclass
class Outcomes:
    """What the clients of a test saw: status codes, and errors by kind."""

    statuses: dict[int, int] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def status(self, code: int) -> None:
        self.statuses[code] = self.statuses.get(code, 0) + 1

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def total(self) -> int:
        return sum(self.statuses.values()) + sum(self.errors.values())


async def bounded(awaitable: Awaitable[Any], what: str = "request") -> Any:
    """Await with the hang deadline: a request that outlives it fails the test."""
    try:
        return await asyncio.wait_for(awaitable, CLIENT_DEADLINE)
    except TimeoutError:
        raise AssertionError(f"{what} hung for {CLIENT_DEADLINE} s") from None


async def stream_completion(
    session: aiohttp.ClientSession,
    url: str,
    *,
    n_predict: int = 20,
    outcomes: Outcomes | None = None,
) -> tuple[int, bytes]:
    """POST a streaming /completion and read it to the end; returns (status, body)."""
    body = {"prompt": "chaos", "n_predict": n_predict, "stream": True}
    try:
        async with session.post(url + "/completion", json=body) as answer:
            data = await answer.read()
            if outcomes is not None:
                outcomes.status(answer.status)
            return answer.status, data
    except aiohttp.ClientError as error:
        if outcomes is not None:
            outcomes.error(type(error).__name__)
        return 0, str(error).encode()


def freeze(process: Process) -> None:
    process.signal(signal.SIGSTOP)


def thaw(process: Process) -> None:
    process.signal(signal.SIGCONT)
