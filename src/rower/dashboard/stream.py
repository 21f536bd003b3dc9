"""Following a balancer's `/api/v1/agents/stream` (server-sent events) from a terminal client.

`fleet_events` turns the stream into typed events: a fleet snapshot, or a change of connection
state. It never gives up: a balancer that is down, restarting or unreachable is retried with a
capped backoff, and the caller is told each time, so a dashboard can say what is going on.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp
import msgspec

from rower.status import FleetView, fleet_decoder

MAX_EVENT_BYTES = 16 * 1024 * 1024
"""Largest snapshot accepted: thousands of agents with all their slots."""


@dataclass(frozen=True, slots=True)
class Connecting:
    """A connection attempt to `url` starts."""

    url: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    """The stream could not be opened or broke; the next attempt is in `retry_in` seconds."""

    url: str
    reason: str
    retry_in: float


StreamEvent = Connecting | Unreachable | FleetView


async def fleet_events(
    url: str,
    *,
    token: str | None = None,
    first_retry: float = 0.5,
    max_retry: float = 5.0,
) -> AsyncIterator[StreamEvent]:
    """Snapshots from the SSE stream at `url`, with connection states in between, forever.

    `token` is sent as `Authorization: Bearer TOKEN`, for a balancer whose management token
    guards reads (`--management-token-guards-reads`).
    """
    retry = first_retry
    headers = {"Accept": "text/event-stream"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    # sock_read: the balancer sends a keep-alive comment every 15 s, so silence means trouble.
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=3.0, sock_read=45.0)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            yield Connecting(url)
            try:
                async with session.get(url, headers=headers) as response:
                    if response.status == 401:
                        reason = (
                            "the balancer wants its management token: start rower dashboard "
                            "with --management-token TOKEN"
                            if token is None
                            else "the balancer refused the token given with --management-token"
                        )
                    elif response.status != 200:
                        reason = f"the balancer answered HTTP {response.status}"
                    else:
                        async for fleet in _snapshots(response.content):
                            retry = first_retry
                            yield fleet
                        reason = "the balancer closed the stream"
            except (aiohttp.ClientError, OSError, TimeoutError) as error:
                reason = _describe(error)
            except (msgspec.DecodeError, ValueError) as error:
                reason = f"the balancer sent an unreadable snapshot: {error}"
            yield Unreachable(url, reason, retry)
            await asyncio.sleep(retry)
            retry = min(max_retry, retry * 2)


async def _snapshots(content: aiohttp.StreamReader) -> AsyncIterator[FleetView]:
    data: list[bytes] = []
    while True:
        line = await content.readuntil(b"\n", max_size=MAX_EVENT_BYTES)
        if not line:
            return
        line = line.rstrip(b"\r\n")
        if line:
            if line.startswith(b"data:"):
                data.append(line[6:] if line.startswith(b"data: ") else line[5:])
            # Comments (keep-alives), `event:`, `id:` and `retry:` lines carry nothing for us.
            continue
        if data:
            yield fleet_decoder.decode(b"\n".join(data))
            data.clear()


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientConnectorError):
        return f"cannot connect: {error.os_error.strerror or error.os_error}"
    if isinstance(error, TimeoutError):
        return "no answer in time"
    return str(error) or type(error).__name__
