"""The fleet as `/api/v1/agents` shows it: capacity nothing may be sent to is not idle."""

from __future__ import annotations

from rower.balancer.fleet import Fleet
from rower.status import StatusUpdate


def status(port: int, *, idle: int = 2, **fields: object) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        slots_idle=idle,
        slots_total=idle,
        **fields,  # type: ignore[arg-type]
    )


def test_unusable_upstreams_show_no_idle_slots_and_say_why() -> None:
    fleet = Fleet(max_buffered=0)
    fleet.report("usable", status(1, idle=2), 0.0, 0.0)
    fleet.report("issue", status(2, idle=0, error="Unauthorized"), 0.0, 0.0)
    fleet.report("stale", status(3, idle=4, monitoring_interval_ms=100), 0.0, 0.0)
    fleet.report("drained", status(4, idle=8), 0.0, 0.0)
    fleet.drain("drained")
    fleet.report("stopping", status(5, idle=16, is_draining=True), 0.0, 0.0)
    fleet.report("refused", status(6, idle=32), 0.0, 0.0)
    fleet.quarantine("refused", 0.0)

    views = {view.agent_id: view for view in fleet.views(1.0)}
    reasons = {agent_id: view.unusable_reasons for agent_id, view in views.items()}
    assert reasons == {
        "usable": [],
        "issue": ["issue"],
        "stale": ["stale"],
        "drained": ["draining"],
        "stopping": ["draining"],
        "refused": ["quarantined"],
    }
    idle = {agent_id: view.status.slots_idle for agent_id, view in views.items()}
    assert idle == {"usable": 2, "issue": 0, "stale": 0, "drained": 0, "stopping": 0, "refused": 0}
    assert all(view.slots_free == 0 for view in views.values() if view.unusable_reasons)
    # StatsD and Prometheus sum these entries: what autoscalers read is usable capacity.
    assert sum(view.status.slots_idle for view in views.values()) == 2

    # Back in use: the slots are idle again.
    fleet.report("stale", status(3, idle=4, monitoring_interval_ms=100), 1.0, 1.0)
    fleet.report("refused", status(6, idle=32), 1.0, 1.0)
    views = {view.agent_id: view for view in fleet.views(1.0)}
    assert views["stale"].status.slots_idle == 4
    assert views["refused"].unusable_reasons == []
    assert views["refused"].status.slots_idle == 32
