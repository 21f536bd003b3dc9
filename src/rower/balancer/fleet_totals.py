"""Fleet-wide and per-model sums that StatsD and Prometheus report, computed from one `FleetView`.

`model_summaries` builds the per-model part of the view (`FleetView.models`) from the agents'
entries; `FleetTotals` sums a view for the reporters. Both count only capacity a request can
use now: an unusable agent's entry already shows 0 idle slots, and a router's model that is not
loaded (a cold unit, `Upstream.cold`) has no idle slot here, whatever one slot it offers to the
request that makes the router load it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from rower.balancer.models import UNKNOWN
from rower.status import AgentView, FleetView, ModelSummary


@dataclass(frozen=True, slots=True)
class FleetTotals:
    """Slots and waiting requests summed over every registered agent, and per model.

    The slot counts are the balancer's corrected ones (what the agent reported, adjusted by
    what this balancer dispatched and finished since), as `/api/v1/agents` shows them.
    """

    slots_idle: int
    slots_processing: int
    requests_buffered: int
    agents_registered: int
    models: tuple[ModelSummary, ...] = ()

    @classmethod
    def of(cls, view: FleetView) -> FleetTotals:
        """Sum `view` over its models (every agent is in exactly one)."""
        return cls(
            slots_idle=sum(model.slots_idle for model in view.models),
            slots_processing=sum(model.slots_processing for model in view.models),
            requests_buffered=view.requests_buffered,
            agents_registered=len(view.agents),
            models=tuple(view.models),
        )


def model_summaries(
    agents: Iterable[AgentView],
    buffered: Mapping[str, int],
    cold: Collection[tuple[str, str]] = (),
) -> list[ModelSummary]:
    """Per model, sorted by id: its agents' slots and its waiting requests.

    Args:
        agents: the entries of `/api/v1/agents` (each one model's server).
        buffered: requests waiting per model; a model here with no agent (declared, or waiting
            for its first server) gets a summary of its own.
        cold: `(agent_id, model)` of a router's models that are not loaded.
    """
    sums: dict[str, list[int]] = {model: [0, 0, 0, 0] for model in buffered}
    for agent in agents:
        status = agent.status
        model = status.model or UNKNOWN
        counts = sums.setdefault(model, [0, 0, 0, 0])
        counts[2] += status.slots_processing
        if (agent.agent_id, model) in cold:
            counts[3] += status.slots_processing
            continue
        counts[0] += 1
        counts[1] += status.slots_idle
        counts[3] += status.slots_total or status.slots_idle + status.slots_processing
    return [
        ModelSummary(
            model=model,
            agents=count,
            slots_idle=idle,
            slots_processing=processing,
            slots_total=total,
            requests_buffered=buffered.get(model, 0),
        )
        for model, (count, idle, processing, total) in sorted(sums.items())
    ]
