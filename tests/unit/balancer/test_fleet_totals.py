"""Per-model totals of the fleet view, from a real fleet core fed reports and requests."""

from __future__ import annotations

from rower.balancer.fleet import Fleet
from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.models import ModelRules
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.slot_gate import SlotGate
from rower.status import FleetView, ModelStatus, ModelSummary, SlotStatus, StatusUpdate

NOW = 100.0


def server(port: int, model: str | None, idle: int, processing: int = 0) -> StatusUpdate:
    slots = [SlotStatus(id=i, is_processing=i < processing) for i in range(idle + processing)]
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        model=model,
        slots_idle=idle,
        slots_processing=processing,
        slots_total=idle + processing,
        slots=slots,
    )


def router(port: int, *models: ModelStatus) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        is_router=True,
        models=list(models),
        slots_idle=sum(m.slots_idle for m in models),
        slots_total=sum(m.slots_total for m in models),
    )


def loaded(name: str, total: int) -> ModelStatus:
    slots = [SlotStatus(id=i, is_processing=False) for i in range(total)]
    return ModelStatus(name, is_loaded=True, slots_idle=total, slots_total=total, slots=slots)


def publisher(fleet: Fleet) -> FleetPublisher:
    return FleetPublisher(SlotGate(fleet, buffer_timeout=10.0, clock=lambda: NOW))


def ask(fleet: Fleet, request_id: int, model: str) -> None:
    needs = RequestNeeds("/v1/chat/completions", takes_slot=True, model=model)
    fleet.request_slot(request_id, NOW, needs=needs)


def by_model(view: FleetView) -> dict[str, ModelSummary]:
    return {summary.model: summary for summary in view.models}


def test_each_model_sums_its_servers_and_its_own_buffer() -> None:
    fleet = Fleet(max_buffered=10, models=ModelRules(declared=("embed",)))
    fleet.report("a1", server(8001, "alpha", idle=2), NOW, NOW)
    fleet.report("a2", server(8002, "alpha", idle=1, processing=1), NOW, NOW)
    fleet.report("b1", server(8003, "beta", idle=1), NOW, NOW)
    for request_id in (1, 2, 3, 4, 5):  # alpha: 3 slots free, then 2 wait
        ask(fleet, request_id, "alpha")
    view = publisher(fleet).view()
    assert [m.model for m in view.models] == ["alpha", "beta", "embed"]
    assert by_model(view)["alpha"] == ModelSummary(
        "alpha", agents=2, slots_idle=0, slots_processing=4, slots_total=4, requests_buffered=2
    )
    assert by_model(view)["beta"] == ModelSummary("beta", 1, 1, 0, 1, 0)
    # Declared, no server yet: present with zeros, so an autoscaler's query has a value.
    assert by_model(view)["embed"] == ModelSummary("embed")
    totals = FleetTotals.of(view)
    assert (totals.slots_idle, totals.slots_processing, totals.requests_buffered) == (1, 4, 2)
    assert totals.agents_registered == 3


def test_a_declared_model_buffers_before_its_first_server() -> None:
    fleet = Fleet(max_buffered=10, models=ModelRules(declared=("alpha", "embed")))
    fleet.report("a1", server(8001, "alpha", idle=1), NOW, NOW)
    ask(fleet, 1, "embed")
    ask(fleet, 2, "embed")
    assert by_model(publisher(fleet).view())["embed"] == ModelSummary("embed", requests_buffered=2)


def test_unusable_servers_and_a_routers_unloaded_model_are_no_idle_capacity() -> None:
    fleet = Fleet(max_buffered=10)
    fleet.report("a1", server(8001, "alpha", idle=2), NOW, NOW)
    fleet.report("a2", server(8002, "alpha", idle=3), NOW, NOW)
    fleet.drain("a2")
    fleet.report("r", router(9000, loaded("beta", 2), ModelStatus("gamma")), NOW, NOW)
    assert fleet.upstreams["r/gamma"].cold
    view = publisher(fleet).view()
    models = by_model(view)
    assert models["alpha"] == ModelSummary("alpha", 2, slots_idle=2, slots_total=5)
    assert models["beta"] == ModelSummary("beta", 1, slots_idle=2, slots_total=2)
    # Listed (it may be loaded), but neither idle nor a server of its own.
    assert models["gamma"] == ModelSummary("gamma")
    # Its entry in /api/v1/agents still offers the one request that loads it.
    (gamma,) = [a for a in view.agents if a.status.model == "gamma"]
    assert gamma.slots_free == 1
    assert FleetTotals.of(view).slots_idle == 4
    # The request loading it is busy work on that model.
    ask(fleet, 1, "gamma")
    assert by_model(publisher(fleet).view())["gamma"] == ModelSummary(
        "gamma", slots_processing=1, slots_total=1
    )


def test_servers_that_name_no_model_are_one_summary() -> None:
    fleet = Fleet(max_buffered=10)
    fleet.report("a", server(8001, None, idle=2), NOW, NOW)
    fleet.report("b", server(8002, None, idle=1), NOW, NOW)
    assert publisher(fleet).view().models == [ModelSummary("", 2, 3, 0, 3, 0)]


def test_an_empty_fleet_has_no_models() -> None:
    view = publisher(Fleet(max_buffered=10)).view()
    assert view.models == []
    assert FleetTotals.of(view) == FleetTotals(0, 0, 0, 0)
