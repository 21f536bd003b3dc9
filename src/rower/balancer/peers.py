"""Following another balancer's placements (`--peer-balancer-addr`).

Several balancers in front of the same agents each remember what they sent where. When a
conversation's turns arrive through different balancers, each would follow its own memory and
the conversation would live on two servers, in two caches (docs/routing.md, "Several
balancers"). So each balancer follows the others' `GET /api/v1/placements` stream and records
what they sent as if it had sent it (`Fleet.placed_by_peer`): all of them then remember the
same, and a turn goes where the conversation's previous turn went, whichever balancer sent it.

A peer that cannot be reached, or whose stream ends or sends a line that is not a placement, is
followed again after a pause that doubles up to `MAX_RETRY_DELAY`; each failure is logged once
per state change, not once per attempt. Nothing a peer sends can do more than make this balancer
believe a server holds a prefix: a placement for a server this balancer does not know is
dropped, and the memory stays within its bounds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

import aiohttp

from rower.addresses import Address
from rower.balancer.placement_wire import MAX_LINE_BYTES, BadPlacement, decode
from rower.balancer.prefix_memory import Placement

log = logging.getLogger(__name__)

PLACEMENTS_PATH = "/api/v1/placements"
KEEPALIVE_SECONDS = 5.0
"""A placement stream sends an empty line after this long without a placement."""
READ_TIMEOUT = 4 * KEEPALIVE_SECONDS
"""A stream silent this long (no placement, no keep-alive) is taken for dead."""
FIRST_RETRY_DELAY = 0.5
MAX_RETRY_DELAY = 10.0


@dataclass(slots=True)
class PeerCounts:
    """What one peer's stream brought (for metrics)."""

    applied: int = 0
    """Placements recorded."""
    unknown_server: int = 0
    """Placements for a server this balancer does not know (not recorded)."""
    refused_lines: int = 0
    """Lines that were not placements (each ended the stream)."""
    connected: bool = False


class PeerFollower:
    """Follows one peer balancer's placements until cancelled.

    Args:
        peer: the peer's management address.
        place: records a placement; returns whether this balancer knows its server.
        token: the management token the peer requires, if any.
    """

    def __init__(
        self,
        peer: Address,
        place: Callable[[Placement], bool],
        *,
        token: str | None = None,
    ) -> None:
        self.peer = peer
        self.place = place
        self.token = token
        self.counts = PeerCounts()

    @property
    def url(self) -> str:
        return f"http://{self.peer}{PLACEMENTS_PATH}"

    async def run(self) -> None:
        """Follow the peer, reconnecting after each failure, until cancelled."""
        delay = FIRST_RETRY_DELAY
        last_failure: str | None = None
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=READ_TIMEOUT)
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            while True:
                try:
                    await self._follow(session)
                    failure = "its placement stream ended"
                except BadPlacement as error:
                    self.counts.refused_lines += 1
                    failure = f"it sent a line that is not a placement ({error})"
                except (aiohttp.ClientError, TimeoutError, OSError) as error:
                    failure = _describe(error)
                if self.counts.connected:
                    delay = FIRST_RETRY_DELAY
                self.counts.connected = False
                if failure != last_failure:
                    log.warning(
                        "not following peer balancer %s: %s; retrying (every %g s at most)",
                        self.peer,
                        failure,
                        MAX_RETRY_DELAY,
                    )
                    last_failure = failure
                await asyncio.sleep(delay)
                delay = min(MAX_RETRY_DELAY, delay * 2)

    async def _follow(self, session: aiohttp.ClientSession) -> None:
        async with session.get(self.url) as response:
            if response.status != 200:
                text = (await response.content.read(512)).decode("utf-8", "replace")
                raise aiohttp.ClientResponseError(
                    response.request_info,
                    (),
                    status=response.status,
                    message=f"{PLACEMENTS_PATH} answered {response.status}: {text.strip()}",
                )
            self.counts.connected = True
            log.info("following peer balancer %s", self.peer)
            pending = b""
            async for data in response.content.iter_any():
                pending += data
                *lines, pending = pending.split(b"\n")
                if len(pending) > MAX_LINE_BYTES:
                    raise BadPlacement(f"a line longer than {MAX_LINE_BYTES} bytes")
                for line in lines:
                    if line:
                        self._apply(decode(line))

    def _apply(self, placement: Placement) -> None:
        if self.place(placement):
            self.counts.applied += 1
        else:
            self.counts.unknown_server += 1


def _describe(error: BaseException) -> str:
    if isinstance(error, aiohttp.ClientResponseError):
        if error.status == 401:
            return (
                f"{error.message}; give this balancer the peer's --management-token "
                "(balancers that follow each other share one)"
            )
        if error.status == 404:
            return f"{error.message}; is it a Rower balancer's --management-addr, of this version?"
        return error.message
    if isinstance(error, TimeoutError):
        return f"nothing came for {READ_TIMEOUT:g} s"
    return str(error) or type(error).__name__
