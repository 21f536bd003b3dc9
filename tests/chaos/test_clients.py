"""Clients that leave at every stage at once: waiting, before the first byte, mid-stream.

Each stage alone is in `test_balancer_failures.py`; here many clients leave at random moments
while others are served, and nothing may leak.
"""

from __future__ import annotations

import asyncio
import random

import aiohttp

from tests.chaos.invariants import bounded, settled
from tests.integration.fleet import Fleet


async def test_clients_leaving_at_random_stages_leak_nothing(fleet: Fleet) -> None:
    fleet.balancer("--max-buffered-requests", "100")
    sims = [fleet.sim(slots=2, speed=100), fleet.sim(slots=1, speed=100)]
    for sim in sims:
        fleet.agent(sim)
    fleet.wait_agents(2)
    rng = random.Random(7)
    completed = 0

    async def client(session: aiohttp.ClientSession, leave_after: float | None) -> None:
        nonlocal completed
        body = {"prompt": "leave", "n_predict": rng.randint(5, 40), "stream": rng.random() < 0.7}

        async def whole() -> None:
            nonlocal completed
            async with session.post(fleet.proxy + "/completion", json=body) as answer:
                assert answer.status == 200
                await answer.read()
                completed += 1

        if leave_after is None:
            await bounded(whole())
            return
        task = asyncio.create_task(whole())
        await asyncio.sleep(leave_after)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    async with aiohttp.ClientSession() as session:
        # 3 slots, 24 clients: many wait in the buffer; a third leave after 0-0.5 s.
        clients = [
            client(session, rng.uniform(0.0, 0.5) if rng.random() < 0.35 else None)
            for _ in range(24)
        ]
        await bounded(asyncio.gather(*clients), "clients")
        # The fleet is still fully usable.
        async with session.post(fleet.proxy + "/completion", json={"prompt": "after"}) as last:
            assert last.status == 200
    assert completed >= 10
    await settled(fleet)
