"""Snapshots of the fleet for `/api/v1/agents` and its SSE stream.

One publisher task serializes the fleet at most every `min_period` seconds while it changes and
fans the same bytes out to every subscriber, so a thousand dashboards under heavy load cost one
serialization per period, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from rower.balancer.fleet_totals import model_summaries
from rower.balancer.slot_gate import SlotGate
from rower.status import FleetView, json_encoder


class FleetPublisher:
    """Publishes fleet snapshots (JSON bytes) to subscribers when the fleet changes.

    Args:
        gate: where the fleet lives and changes are signalled.
        min_period: least time between two snapshots, in seconds.
        stale_check_period: how often agents are checked for missed reports, in seconds.
    """

    def __init__(
        self, gate: SlotGate, *, min_period: float = 0.1, stale_check_period: float = 0.25
    ) -> None:
        self.gate = gate
        self.min_period = min_period
        self.stale_check_period = stale_check_period
        self._subscribers: set[asyncio.Queue[bytes]] = set()
        self._latest = self.snapshot()

    def view(self) -> FleetView:
        """The fleet as the API shows it now, with each model's totals."""
        fleet = self.gate.fleet
        agents = fleet.views(self.gate.clock())
        cold = {(u.agent_id, u.model) for u in fleet.upstreams.values() if u.cold}
        return FleetView(
            agents=agents,
            requests_buffered=fleet.requests_buffered,
            requests_in_flight=fleet.requests_in_flight,
            models=model_summaries(agents, fleet.buffered_by_model(), cold),
        )

    def snapshot(self) -> bytes:
        """The fleet as JSON now."""
        return json_encoder.encode(self.view())

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[bytes]]:
        """A queue that gets the current snapshot at once, then one per change."""
        queue: asyncio.Queue[bytes] = asyncio.Queue(maxsize=1)
        queue.put_nowait(self.snapshot())
        self._subscribers.add(queue)
        try:
            yield queue
        finally:
            self._subscribers.discard(queue)

    async def run(self) -> None:
        """Publish until cancelled.

        A snapshot of a thousand agents takes ~10 ms of the event loop that every request
        waits on: none is taken while nobody subscribes, and snapshots are spaced so that they
        take a tenth of the time at most.
        """
        changed = self.gate.changed
        loop = asyncio.get_running_loop()
        while True:
            if self._subscribers:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), self.stale_check_period)
            else:
                await asyncio.sleep(self.stale_check_period)
            self.gate.time_passed()
            if not changed.is_set():
                continue
            changed.clear()
            if not self._subscribers:
                continue
            started = loop.time()
            self._latest = self.snapshot()
            for queue in self._subscribers:
                if queue.full():
                    # A slow reader only ever needs the newest snapshot.
                    queue.get_nowait()
                queue.put_nowait(self._latest)
            await asyncio.sleep(max(self.min_period, 10 * (loop.time() - started)))
