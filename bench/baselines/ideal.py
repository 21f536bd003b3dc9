"""The ideal slot-aware dispatcher: the physical limit of what a balancer can do.

One central FIFO with exact knowledge of every server's slots: it knows each slot count up front
and counts its own requests in flight exactly (it is the servers' only client), so a request
goes to a free slot the instant one frees, never to a busy server. It relays bytes the same way
Rower's proxy does (aiohttp, chunks as they arrive), so the difference to Rower is only what
Rower does not know.

    python -m bench.baselines.ideal PORT HOST:PORT:SLOTS [HOST:PORT:SLOTS ...]
"""

from __future__ import annotations

import asyncio
import collections
import sys

import aiohttp
from aiohttp import web


class Dispatcher:
    """Free slot counts and the FIFO of requests waiting for one."""

    def __init__(self, slots: dict[str, int]) -> None:
        self.free = dict(slots)
        self.waiting: collections.deque[asyncio.Future[str]] = collections.deque()

    async def acquire(self) -> str:
        if not self.waiting:
            upstream = max(self.free, key=self.free.__getitem__)
            if self.free[upstream] > 0:
                self.free[upstream] -= 1
                return upstream
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        try:
            return await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release(future.result())
            raise

    def release(self, upstream: str) -> None:
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_result(upstream)
                return
        self.free[upstream] += 1


def application(slots: dict[str, int]) -> web.Application:
    dispatcher = Dispatcher(slots)
    holder: dict[str, aiohttp.ClientSession] = {}

    async def start(app: web.Application) -> None:
        holder["session"] = aiohttp.ClientSession(
            # A new connection per request, as Rower's proxy: kept-alive ones to llama-server
            # fail now and then with "Server disconnected".
            connector=aiohttp.TCPConnector(limit=0, force_close=True),
            timeout=aiohttp.ClientTimeout(total=None),
            auto_decompress=False,
        )

    async def stop(app: web.Application) -> None:
        await holder["session"].close()

    async def relay(request: web.Request) -> web.StreamResponse:
        upstream = await dispatcher.acquire()
        try:
            body = await request.read()
            async with holder["session"].request(
                request.method,
                f"http://{upstream}{request.rel_url}",
                data=body,
                headers={"Content-Type": request.headers.get("Content-Type", "")},
            ) as answer:
                response = web.StreamResponse(status=answer.status)
                response.content_type = answer.content_type
                await response.prepare(request)
                async for chunk in answer.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        finally:
            dispatcher.release(upstream)

    app = web.Application(client_max_size=0)
    app.on_startup.append(start)
    app.on_cleanup.append(stop)
    app.router.add_route("*", "/{tail:.*}", relay)
    return app


def main() -> None:
    port = int(sys.argv[1])
    slots: dict[str, int] = {}
    for spec in sys.argv[2:]:
        address, count = spec.rsplit(":", 1)
        slots[address] = int(count)
    import uvloop

    web.run_app(
        application(slots),
        host="127.0.0.1",
        port=port,
        handler_cancellation=True,
        access_log=None,
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
