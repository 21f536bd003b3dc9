"""Many lightweight agents in one process: each holds one NDJSON status stream to a balancer.

Each reports, every interval, a llama-server with every slot busy (so nothing is ever sent to
the made-up addresses), as `rower agent` would. Stops by itself after `seconds`.

    python -m bench.fake_agents MANAGEMENT_PORT COUNT INTERVAL_MS SECONDS
"""

from __future__ import annotations

import asyncio
import random
import sys
import uuid
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from rower.status import StatusUpdate


async def stream(
    session: aiohttp.ClientSession, url: str, index: int, interval: float, until: float
) -> None:
    loop = asyncio.get_running_loop()

    async def lines() -> AsyncIterator[bytes]:
        await asyncio.sleep(random.random() * interval)
        sequence = 0
        while loop.time() < until:
            sequence += 1
            status = StatusUpdate(
                external_llamacpp_addr=f"127.0.0.2:{20000 + index}",
                agent_name=f"fake-{index}",
                slots_idle=0,
                slots_processing=4,
                slots_total=4,
                monitoring_interval_ms=round(interval * 1000),
                sequence=sequence,
            )
            yield msgspec.json.encode(status) + b"\n"
            await asyncio.sleep(interval)

    try:
        async with session.post(f"{url}/{uuid.uuid4()}", data=lines()) as response:
            await response.read()
    except (aiohttp.ClientError, OSError):
        pass


async def main(port: int, count: int, interval_ms: int, seconds: float) -> None:
    url = f"http://127.0.0.1:{port}/api/v1/agent_status_update"
    until = asyncio.get_running_loop().time() + seconds
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as session:
        await asyncio.gather(
            *(stream(session, url, i, interval_ms / 1000, until) for i in range(count))
        )


if __name__ == "__main__":
    import uvloop

    port, count, interval_ms, seconds = sys.argv[1:5]
    uvloop.run(main(int(port), int(count), int(interval_ms), float(seconds)))
