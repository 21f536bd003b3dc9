"""Fleet-wide sums that StatsD and Prometheus both report, computed from one `FleetView`."""

from __future__ import annotations

from dataclasses import dataclass

from rower.status import FleetView


@dataclass(frozen=True, slots=True)
class FleetTotals:
    """Slots and waiting requests summed over every registered agent.

    The slot counts are the balancer's corrected ones (what the agent reported, adjusted by
    what this balancer dispatched and finished since), as `/api/v1/agents` shows them.
    """

    slots_idle: int
    slots_processing: int
    requests_buffered: int
    agents_registered: int

    @classmethod
    def of(cls, view: FleetView) -> FleetTotals:
        """Sum `view` over its agents."""
        return cls(
            slots_idle=sum(agent.status.slots_idle for agent in view.agents),
            slots_processing=sum(agent.status.slots_processing for agent in view.agents),
            requests_buffered=view.requests_buffered,
            agents_registered=len(view.agents),
        )
