"""What a small proxied request costs the balancer in Python alone, without system calls.

`GET /health` through a whole `Balancer` (its reverse proxy, fleet core and listeners, started in
this process), with both sockets replaced by in-memory transports: the client's bytes are fed to
the listener's protocol, and the upstream connection answers llama-server's `/health` answer as
soon as the request is written to it. What is left is the Python the balancer runs per request
and the event loop's own work. On loopback the system calls and the wake-ups they cause cost as
much again, and move with the machine; this figure moves only with the code, so it is the one to
compare two versions by (interleave them, as usual).

    python -m bench.proxy_python_cost [--requests N] [--rounds R] [--profile FILE]

`--profile` writes cProfile's stats of one more round to FILE (`python -m pstats FILE`).
`ROWER_BENCH_ACCESS_LOG=stderr` runs it with the default access log (off otherwise, as in the
other proxy scenarios) to measure what a line costs.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import statistics
import time
from typing import Any

import uvloop

from rower.addresses import Address
from rower.balancer.client_connection import ClientConnection, ClientListener
from rower.balancer.proxy import ReverseProxy
from rower.balancer.service import Balancer, listener_limits, tune_garbage_collector
from rower.balancer.settings import BalancerSettings
from rower.balancer.upstream_client import UpstreamClient
from rower.balancer.upstream_connection import UpstreamConnection
from rower.logs import configure_logging
from rower.status import StatusUpdate

UPSTREAM = "127.0.0.1:9"
"""Never connected to: the pool holds one in-memory connection to it."""

REQUEST = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n\r\n"
ANSWER = (
    b"HTTP/1.1 200 OK\r\nAccess-Control-Allow-Origin: \r\nContent-Length: 15\r\n"
    b"Content-Type: application/json; charset=utf-8\r\nKeep-Alive: timeout=5, max=100\r\n"
    b"Server: llama.cpp\r\n\r\n"
    b'{"status":"ok"}'
)
"""What llama-server (build 11434) answers to `GET /health`, byte for byte."""


class _Transport(asyncio.Transport):
    """An in-memory socket: what is written goes to `on_write`."""

    def __init__(self, on_write: Any) -> None:
        super().__init__()
        self._on_write = on_write
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self._on_write(bytes(data))

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def can_write_eof(self) -> bool:
        return False


class _Client:
    """One kept-alive client connection sending `REQUEST` again as soon as it is answered."""

    def __init__(self, listener: ClientListener, requests: int, done: asyncio.Future[None]):
        self.left = requests
        self.done = done
        self.connection = ClientConnection(listener)
        self.connection.connection_made(_Transport(self._answered))

    def send(self) -> None:
        self.connection.data_received(REQUEST)

    def _answered(self, data: bytes) -> None:
        if not data.startswith(b"HTTP/1.1 200 "):
            self.done.set_exception(AssertionError(f"unexpected answer {data[:80]!r}"))
            return
        self.left -= 1
        if self.left <= 0:
            self.done.set_result(None)
        else:
            # The next request comes in a later callback, as a socket's would.
            asyncio.get_running_loop().call_soon(self.send)


async def _pooled_connection() -> UpstreamConnection:
    """A connection to `UPSTREAM` that answers every request written to it with `ANSWER`,
    after one exchange (so the pool takes it as a kept-alive one)."""
    connection = UpstreamConnection()
    loop = asyncio.get_running_loop()
    connection.connection_made(
        _Transport(lambda _request: loop.call_soon(connection.data_received, ANSWER))
    )
    connection.send(b"GET /health HTTP/1.1\r\nHost: " + UPSTREAM.encode() + b"\r\n\r\n")
    await connection.head()
    await connection.whole()
    assert connection.reusable
    return connection


async def _round(listener: ClientListener, requests: int) -> float:
    """CPU seconds per request over `requests` requests from one client connection."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    client = _Client(listener, requests, done)
    started = time.process_time()
    client.send()
    await done
    return (time.process_time() - started) / requests


async def measure(requests: int, rounds: int, profile: str | None = None) -> list[float]:
    """CPU seconds per request of `rounds` rounds of `requests` (every answer checked to be
    llama-server's, passed on); `profile`: cProfile's stats of one more round to that file."""
    # As the balancer runs by default (no metrics endpoint), with the access log off as in the
    # other proxy scenarios (nginx's `access_log off`). Never listened on.
    settings = BalancerSettings(
        management_addr=Address.parse("127.0.0.1:9"),
        reverseproxy_addr=Address.parse("127.0.0.1:9"),
        access_log=os.environ.get("ROWER_BENCH_ACCESS_LOG", "off"),
    )
    balancer = Balancer(settings)
    balancer.gate.report(
        "agent-0",
        StatusUpdate(
            external_llamacpp_addr=UPSTREAM,
            slots_idle=4,
            slots_total=4,
            monitoring_interval_ms=3_600_000,
        ),
    )
    # What `Balancer.start` builds, without its sockets.
    pool = UpstreamClient()
    proxy = ReverseProxy(balancer.gate, pool, settings, on_outcome=balancer._outcome_listener())
    listener = ClientListener(
        proxy,
        limits=listener_limits(settings)["reverse-proxy"],
        stats=balancer.listener_stats["reverse-proxy"],
        max_body_bytes=settings.max_request_body_bytes,
    )
    # One connection, pooled: every request reuses it, as kept-alive connections are reused.
    pool.release(UPSTREAM, await _pooled_connection())
    thresholds = gc.get_threshold()
    tune_garbage_collector()  # as `rower balancer` does once started
    try:
        await _round(listener, 1000)  # warm
        costs = [await _round(listener, requests) for _ in range(rounds)]
        if profile:
            profiler = cProfile.Profile(time.process_time)
            profiler.enable()
            await _round(listener, requests)
            profiler.disable()
            profiler.dump_stats(profile)
    finally:
        # Left as found, for a caller that goes on (the bench's smoke test).
        gc.unfreeze()
        gc.set_threshold(*thresholds)
    return costs


def main() -> None:
    # The balancer's own logging (`rower balancer` sets it up so): what the access log costs,
    # with ROWER_BENCH_ACCESS_LOG=stderr, includes formatting and writing each line.
    configure_logging("warning", "text")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE")
    args = parser.parse_args()
    costs = uvloop.run(measure(args.requests, args.rounds, args.profile))
    print(
        f"GET /health, Python and event loop only: {1e6 * statistics.median(costs):.1f} µs "
        f"per request (median of {args.rounds} rounds of {args.requests}; "
        f"rounds {', '.join(f'{1e6 * c:.1f}' for c in costs)})"
    )


if __name__ == "__main__":
    main()
