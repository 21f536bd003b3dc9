"""One running agent: a monitor polling llama-server and one reporter per balancer.

The monitor writes the newest status to a `LatestStatus` board; each reporter streams from it
at its own pace. Stopping drains first: every status is marked `is_draining`, so balancers send
nothing new, while the monitor keeps polling until no slot of llama-server is processing (or
`max_drain_time` passed, or a second signal came). Then one last status goes out and every
stream ends cleanly, so each balancer removes the agent at once instead of waiting for it to go
stale.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
import msgspec

from rower.addresses import Address
from rower.agent.latest_status import LatestStatus
from rower.agent.llamacpp_probe import AgentIdentity
from rower.agent.monitor import REQUEST_TIMEOUT, Monitor
from rower.agent.reporter import FINISH_TIMEOUT, Reporter

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AgentConfig:
    """What `rower agent`'s flags say, with the external address already resolved."""

    management_addrs: Sequence[Address]
    local_llamacpp_addr: Address
    external_llamacpp_addr: Address
    llamacpp_api_key: str | None = None
    name: str | None = None
    monitoring_interval_ms: int = 1000
    management_token: str | None = None
    request_timeout: float = REQUEST_TIMEOUT
    max_drain_time: float = 30.0
    """Seconds a stopping agent waits for llama-server's slots to go idle."""


class Agent:
    """Runs the monitor and the reporters until `stop` is set."""

    def __init__(self, config: AgentConfig, *, agent_id: str | None = None) -> None:
        self.config = config
        self.agent_id = agent_id or str(uuid.uuid4())
        self.board = LatestStatus()
        self.identity = AgentIdentity(
            external_llamacpp_addr=str(config.external_llamacpp_addr),
            agent_name=config.name,
            monitoring_interval_ms=config.monitoring_interval_ms,
        )
        self.reporters = [
            Reporter(
                management_addr=addr,
                agent_id=self.agent_id,
                board=self.board,
                management_token=config.management_token,
            )
            for addr in dict.fromkeys(config.management_addrs)
        ]

    async def run(self, stop: asyncio.Event, hurry: asyncio.Event | None = None) -> None:
        """Poll and report until `stop` is set, drain, then end every stream cleanly.

        `hurry` (a second signal) ends the drain at once.
        """
        logger.info(
            "agent %s: polling llama-server at %s every %d ms, reporting %s to %s",
            self.agent_id,
            self.config.local_llamacpp_addr,
            self.config.monitoring_interval_ms,
            self.config.external_llamacpp_addr,
            ", ".join(str(addr) for addr in self.config.management_addrs),
        )
        reporting = [asyncio.create_task(reporter.run()) for reporter in self.reporters]
        try:
            async with aiohttp.ClientSession() as session:
                monitor = Monitor(
                    session=session,
                    local_addr=self.config.local_llamacpp_addr,
                    identity=self.identity,
                    board=self.board,
                    api_key=self.config.llamacpp_api_key,
                    request_timeout=self.config.request_timeout,
                )
                await monitor.run(stop)
                await self._drain(monitor, hurry or asyncio.Event())
        finally:
            await self._finish(reporting)

    async def _drain(self, monitor: Monitor, hurry: asyncio.Event) -> None:
        """Report `is_draining` until llama-server's slots are idle, or time is up."""
        monitor.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.max_drain_time
        logged = False
        while not hurry.is_set():
            status = await monitor.poll_once()
            self.board.publish(status)
            if status.error is not None or status.slots_processing == 0:
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                logger.warning(
                    "agent %s: %d slots still processing after %g s of draining; stopping",
                    self.agent_id,
                    status.slots_processing,
                    self.config.max_drain_time,
                )
                return
            if not logged:
                logger.info(
                    "agent %s draining: waiting up to %g s for %d processing slots",
                    self.agent_id,
                    remaining,
                    status.slots_processing,
                )
                logged = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(hurry.wait(), min(monitor.interval, remaining))

    async def _finish(self, reporting: list[asyncio.Task[None]]) -> None:
        last = self.board.latest
        if last is not None:
            self.board.publish(
                msgspec.structs.replace(
                    last,
                    is_draining=True,
                    slots_idle=0,
                    sequence=last.sequence + 1,
                    # A router's models too: none of them takes work any more.
                    models=[msgspec.structs.replace(m, slots_idle=0) for m in last.models],
                ),
                # The same poll's counts: its age goes on from that poll.
                polled_at=self.board.polled_at,
            )
        self.board.close()
        _, pending = (
            await asyncio.wait(reporting, timeout=FINISH_TIMEOUT) if reporting else ((), ())
        )
        for task in pending:
            task.cancel()
        for task in reporting:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        logger.info("agent %s stopped", self.agent_id)
