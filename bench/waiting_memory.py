"""What one waiting request keeps alive in the balancer: RSS, and Python allocations by package.

A balancer runs in this process with one server whose one slot is busy, so every request waits;
a client process opens N connections that each send a small completion request and wait. RSS
before and after, per waiting request; with `--trace`, tracemalloc's allocations per request,
summed by package (aiohttp, asyncio and uvloop, rower) and the top allocation sites (the RSS of
a traced run is tracemalloc's too: read the sizes, not that RSS).

    python -m bench.waiting_memory [N] [--trace]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import resource
import sys
import tracemalloc
from pathlib import Path

import uvloop

from bench import procs
from rower.addresses import Address
from rower.balancer.service import Balancer
from rower.balancer.settings import BalancerSettings
from rower.status import StatusUpdate

CLIENTS = """
import asyncio, resource, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
BODY = b'{"prompt": "hi", "n_predict": 1, "stream": false}'
async def one(port, sent):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /completion HTTP/1.1\\r\\nHost: x\\r\\nContent-Type: application/json\\r\\n"
                 b"Content-Length: %d\\r\\n\\r\\n%s" % (len(BODY), BODY))
    await writer.drain()
    sent.append(1)
    await reader.read(1)
async def main(port, n):
    sent = []
    tasks = [asyncio.create_task(one(port, sent)) for _ in range(n)]
    while len(sent) < n:
        await asyncio.sleep(0.05)
    print("sent", flush=True)
    await asyncio.sleep(120)  # never outlives a measurement for long, whatever happens to it
asyncio.run(main(int(sys.argv[1]), int(sys.argv[2])))
"""


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def package(filename: str) -> str:
    for name in ("aiohttp", "multidict", "yarl", "rower", "uvloop", "asyncio"):
        if f"/{name}/" in filename:
            return "asyncio+uvloop" if name in ("uvloop", "asyncio") else name
    return "other"


async def measure(count: int, trace: bool) -> None:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    port = procs.free_port()
    settings = BalancerSettings(
        management_addr=Address.parse(f"127.0.0.1:{procs.free_port()}"),
        reverseproxy_addr=Address.parse(f"127.0.0.1:{port}"),
        max_buffered_requests=count * 2,
        buffered_request_timeout=600.0,
    )
    balancer = Balancer(settings)
    await balancer.start()
    busy = StatusUpdate(
        external_llamacpp_addr="127.0.0.1:9",
        slots_idle=0,
        slots_processing=1,
        slots_total=1,
        monitoring_interval_ms=60_000,
    )
    balancer.gate.report("agent-busy", busy)

    async def clients(n: int) -> asyncio.subprocess.Process:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", CLIENTS, str(port), str(n), stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        await proc.stdout.readline()
        return proc

    started: list[asyncio.subprocess.Process] = []
    try:
        started.append(await clients(50))  # the first connections' one-off allocations
        await asyncio.sleep(0.5)
        gc.collect()
        before = rss_kb()
        if trace:
            tracemalloc.start(1)
            first = tracemalloc.take_snapshot()
        started.append(await clients(count))
        for _ in range(100):
            if balancer.fleet.requests_buffered >= count + 50:
                break
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        gc.collect()
        after = rss_kb()
        print(
            f"{balancer.fleet.requests_buffered} waiting: RSS {before / 1024:.1f} -> "
            f"{after / 1024:.1f} MB, {(after - before) / count:.2f} KB per waiting request"
        )
        if trace:
            report(tracemalloc.take_snapshot().compare_to(first, "lineno"), count)
    finally:
        for proc in started:
            proc.kill()
            await proc.wait()
        await balancer.stop()


def report(stats: list[tracemalloc.StatisticDiff], count: int) -> None:
    by_package: dict[str, int] = {}
    for stat in stats:
        name = package(stat.traceback[0].filename)
        by_package[name] = by_package.get(name, 0) + stat.size_diff
    total = sum(by_package.values())
    print(f"traced: {total / count:.0f} B per waiting request")
    for name, size in sorted(by_package.items(), key=lambda item: -item[1]):
        print(f"  {name}: {size / count:.0f} B")
    for stat in stats[:20]:
        frame = stat.traceback[0]
        print(f"  {stat.size_diff / count:6.0f} B  {frame.filename}:{frame.lineno}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("count", type=int, nargs="?", default=3000)
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    uvloop.run(measure(args.count, args.trace))


if __name__ == "__main__":
    main()
