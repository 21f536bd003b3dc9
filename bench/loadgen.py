"""Load generator, run as its own process so its CPU does not count against the proxy.

Open loop (`open`): requests start at the times a schedule says (Poisson arrivals chosen by the
scenario), whatever happened to earlier ones, as real users do; each one streams and records its
time to first token (TTFT) and end to end (E2E) from the moment it was due.
Closed loop (`closed`): C workers each send N/C requests back to back; records time to first
byte (TTFB) and E2E. Both write one JSON file of per-request records and stop by themselves:
every request has a deadline.

    python -m bench.loadgen open SCHEDULE.json OUT.json
    python -m bench.loadgen closed URL CONCURRENCY COUNT OUT.json [--body JSON] [--deadline S]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

TOKEN_EVENT = b'"stop":false'
"""Every streamed token event of llama-server's (and the sim's) `/completion` carries this."""


@dataclass
class Record:
    """One request as the client saw it; times in seconds from the start of the run."""

    due: float
    status: int = 0
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    error: str | None = None


async def stream_one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    record: Record,
    t0: float,
    deadline: float,
) -> None:
    """Send one request and read its stream to the end, filling `record`."""
    due = t0 + record.due
    tail = b""
    try:
        async with asyncio.timeout(deadline), session.post(url, data=body) as response:
            record.status = response.status
            async for chunk in response.content.iter_any():
                if record.ttft is None:
                    record.ttft = time.perf_counter() - due
                buffer = tail + chunk
                record.tokens += buffer.count(TOKEN_EVENT)
                tail = buffer[-(len(TOKEN_EVENT) - 1) :]
            record.e2e = time.perf_counter() - due
            if response.status != 200:
                record.error = f"HTTP {response.status}"
    except TimeoutError:
        record.error = "deadline"
    except (aiohttp.ClientError, OSError) as error:
        record.error = type(error).__name__


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=False),
        timeout=aiohttp.ClientTimeout(total=None),
        headers={"Content-Type": "application/json"},
    )


async def open_loop(schedule: dict[str, Any]) -> list[Record]:
    """Start each request of the schedule at its time; wait for all of them."""
    url = schedule["url"]
    deadline = float(schedule.get("deadline", 120.0))
    tasks: list[asyncio.Task[None]] = []
    records: list[Record] = []
    async with session() as client:
        t0 = time.perf_counter() + 0.2
        for item in schedule["requests"]:
            record = Record(due=item["at"])
            records.append(record)
            body = json.dumps(item["body"]).encode()
            delay = t0 + record.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(client, url, body, record, t0, deadline)))
        await asyncio.gather(*tasks)
    return records


async def closed_loop(
    url: str, concurrency: int, count: int, body: bytes, deadline: float
) -> list[Record]:
    """`concurrency` workers send `count` requests in all, each as soon as the last ended."""
    records: list[Record] = []
    remaining = [count]

    async def worker(client: aiohttp.ClientSession) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            record = Record(due=0.0)
            t0 = time.perf_counter()
            await stream_one(client, url, body, record, t0, deadline)
            record.due = t0
            records.append(record)

    async with session(limit=concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return records


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    open_parser = sub.add_parser("open")
    open_parser.add_argument("schedule")
    open_parser.add_argument("out")
    closed = sub.add_parser("closed")
    closed.add_argument("url")
    closed.add_argument("concurrency", type=int)
    closed.add_argument("count", type=int)
    closed.add_argument("out")
    closed.add_argument("--body", default='{"prompt": "hi", "n_predict": 1, "stream": true}')
    closed.add_argument("--deadline", type=float, default=30.0)
    args = parser.parse_args()
    import uvloop

    started = time.perf_counter()
    if args.mode == "open":
        with open(args.schedule) as file:
            schedule = json.load(file)
        records = uvloop.run(open_loop(schedule))
    else:
        records = uvloop.run(
            closed_loop(args.url, args.concurrency, args.count, args.body.encode(), args.deadline)
        )
    elapsed = time.perf_counter() - started
    with open(args.out, "w") as file:
        json.dump({"elapsed": elapsed, "records": [asdict(r) for r in records]}, file)


if __name__ == "__main__":
    main()
