"""Prometheus metrics from a real fleet core and proxy outcomes, parsed back as Prometheus does."""

from __future__ import annotations

from msgspec.structs import replace
from prometheus_client.parser import text_string_to_metric_families

from rower.balancer.fleet import Decision, Dispatch, Fleet
from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.metrics import BalancerMetrics
from rower.balancer.models import ModelRules
from rower.balancer.outcome import Failure, ProxyOutcome
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.slot_gate import SlotGate
from rower.status import ModelStatus, StatusUpdate


def samples(metrics: BalancerMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def make_metrics() -> tuple[SlotGate, BalancerMetrics]:
    gate = SlotGate(Fleet(max_buffered=4), buffer_timeout=1.0)
    return gate, BalancerMetrics(FleetPublisher(gate))


def status(name: str, idle: int, processing: int, **flags: object) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{8000 + len(name)}",
        agent_name=name,
        slots_idle=idle,
        slots_processing=processing,
        slots_total=idle + processing,
        **flags,  # type: ignore[arg-type]
    )


def test_fleet_gauges_are_computed_at_scrape_time() -> None:
    gate, metrics = make_metrics()
    assert samples(metrics)[("rower_slots_idle", ())] == 0
    gate.report("a", status("alpha", 3, 1))
    gate.report("b", status("beta", 2, 0))
    got = samples(metrics)
    assert got[("rower_slots_idle", ())] == 5
    assert got[("rower_slots_processing", ())] == 1
    assert got[("rower_requests_buffered", ())] == 0
    assert got[("rower_agents_registered", ())] == 2
    alpha = (("agent_id", "a"), ("agent_name", "alpha"), ("model", "(unnamed)"))
    assert got[("rower_agent_slots_idle", alpha)] == 3
    assert got[("rower_agent_slots_processing", alpha)] == 1
    assert got[("rower_agent_slots_total", alpha)] == 4
    assert got[("rower_agent_usable", alpha)] == 1
    gate.remove_agent("b")
    got = samples(metrics)
    assert got[("rower_agents_registered", ())] == 1
    assert not [key for key in got if ("agent_id", "b") in key[1]]


def test_agent_with_an_issue_is_not_usable_and_quarantines_are_counted() -> None:
    gate, metrics = make_metrics()
    gate.report("a", status("alpha", 0, 0, error="Unauthorized", is_authorized=False))
    gate.report("b", status("beta", 2, 0))
    gate.quarantine("b")
    gate.quarantine("b")  # already quarantined: not a new quarantine
    got = samples(metrics)
    unnamed = ("model", "(unnamed)")
    assert got[("rower_agent_usable", (("agent_id", "a"), ("agent_name", "alpha"), unnamed))] == 0
    assert got[("rower_agent_usable", (("agent_id", "b"), ("agent_name", "beta"), unnamed))] == 0
    assert got[("rower_upstream_quarantines_total", ())] == 1


def outcome(
    path: str,
    status: int,
    upstream: str | None,
    waited: float,
    first_byte: float | None,
    total: float,
    failure: Failure | None = None,
) -> ProxyOutcome:
    return ProxyOutcome(
        request_id="r",
        client="127.0.0.1",
        method="POST",
        path=path,
        status=status,
        upstream=upstream,
        seconds_waiting=waited,
        seconds_to_first_byte=first_byte,
        seconds_total=total,
        failure=failure,
        error=None if failure is None else str(failure),
    )


def test_outcomes_are_counted_by_path_class_and_status() -> None:
    _, metrics = make_metrics()
    upstream = "127.0.0.1:1"
    metrics.observe(outcome("/v1/chat/completions", 200, upstream, 0.2, 0.3, 1.5))
    metrics.observe(outcome("//v1/chat/completions/", 200, upstream, 0.0, 0.1, 0.4))
    metrics.observe(outcome("/v1/models", 200, upstream, 0.0, 0.01, 0.02))
    metrics.observe(outcome("/completion", 429, None, 0.0, None, 0.001, Failure.BUFFER_FULL))
    metrics.observe(outcome("/completion", 504, None, 0.0, None, 1.0, Failure.BUFFER_TIMEOUT))
    metrics.observe(outcome("/completion", 502, None, 0.0, None, 0.1, Failure.UPSTREAMS_REFUSED))
    metrics.observe(outcome("/completion", 200, upstream, 0.0, 0.1, 2.0, Failure.UPSTREAM_CUT))
    metrics.observe(outcome("/props", 503, None, 0.0, None, 0.0, Failure.NO_UPSTREAM))
    metrics.observe(
        outcome("/completion", 200, upstream, 0.0, 0.1, 3.0, Failure.CLIENT_DISCONNECTED)
    )
    metrics.observe(outcome("/completion", 499, None, 0.5, None, 0.5, Failure.CLIENT_DISCONNECTED))
    got = samples(metrics)
    chat = "/v1/chat/completions"
    assert got[("rower_proxied_requests_total", (("path", chat), ("status", "200")))] == 2
    assert got[("rower_proxied_requests_total", (("path", "other"), ("status", "200")))] == 1
    assert got[("rower_proxied_requests_total", (("path", "/completion"), ("status", "429")))] == 1
    assert got[("rower_buffer_full_rejections_total", ())] == 1
    assert got[("rower_buffer_timeouts_total", ())] == 1
    assert got[("rower_upstream_errors_total", ())] == 2
    # A client that leaves is not an upstream's failure.
    assert got[("rower_client_disconnects_total", ())] == 2
    # Buffer wait: only requests that were dispatched on a slot-taking path.
    assert got[("rower_buffer_wait_seconds_count", ())] == 4
    assert got[("rower_buffer_wait_seconds_sum", ())] == 0.2
    assert got[("rower_request_duration_seconds_count", (("path", chat),))] == 2
    assert got[("rower_time_to_first_byte_seconds_count", (("path", "other"),))] == 1
    assert got[("rower_time_to_first_byte_seconds_bucket", (("le", "0.25"), ("path", chat)))] == 1


# Per model.


def two_model_metrics() -> tuple[Fleet, BalancerMetrics]:
    fleet = Fleet(max_buffered=1, models=ModelRules(declared=("embed",)))
    gate = SlotGate(fleet, buffer_timeout=1.0, clock=lambda: 0.0)
    for agent_id, port, model in (("a", 8001, "alpha"), ("b", 8002, "beta")):
        gate.report(
            agent_id,
            StatusUpdate(
                external_llamacpp_addr=f"127.0.0.1:{port}",
                agent_name=agent_id,
                model=model,
                slots_idle=1,
                slots_total=1,
            ),
        )
    return fleet, BalancerMetrics(FleetPublisher(gate))


def asked(fleet: Fleet, request_id: int, model: str | None) -> tuple[RequestNeeds, Decision]:
    needs = RequestNeeds("/v1/chat/completions", takes_slot=True, model=model)
    return needs, fleet.request_slot(request_id, 0.0, needs=needs)


def test_model_gauges_per_model_and_declared_ones_at_zero() -> None:
    fleet, metrics = two_model_metrics()
    asked(fleet, 1, "alpha")
    asked(fleet, 2, "alpha")  # waits in alpha's buffer
    got = samples(metrics)
    alpha, beta, embed = (("model", "alpha"),), (("model", "beta"),), (("model", "embed"),)
    assert got[("rower_model_slots_idle", alpha)] == 0
    assert got[("rower_model_slots_processing", alpha)] == 1
    assert got[("rower_model_requests_buffered", alpha)] == 1
    assert got[("rower_model_slots_idle", beta)] == 1
    assert got[("rower_model_slots_total", beta)] == 1
    assert got[("rower_model_agents", beta)] == 1
    assert got[("rower_model_requests_buffered", beta)] == 0
    assert got[("rower_model_requests_buffered", embed)] == 0
    assert got[("rower_model_agents", embed)] == 0
    # The fleet totals are the sums, under their old names.
    assert got[("rower_slots_idle", ())] == 1
    assert got[("rower_requests_buffered", ())] == 1
    assert got[("rower_agent_slots_idle", (("agent_id", "b"), ("agent_name", "b"), beta[0]))] == 1


def test_requests_are_counted_by_model_and_unknown_names_share_one_series() -> None:
    fleet, metrics = two_model_metrics()
    needs, dispatch = asked(fleet, 1, "alpha")
    assert isinstance(dispatch, Dispatch)
    answered = outcome("/v1/chat/completions", 200, dispatch.upstream, 0.2, 0.3, 1.0)
    metrics.observe(replace(answered, needs=needs, dispatch=dispatch))
    waited = outcome("/v1/chat/completions", 504, None, 1.0, None, 1.0, Failure.BUFFER_TIMEOUT)
    metrics.observe(replace(waited, needs=needs))
    for name in ("gpt-4o", "claude", "x" * 200):
        unknown = outcome("/v1/chat/completions", 404, None, 0, None, 0, Failure.MODEL_UNKNOWN)
        metrics.observe(replace(unknown, needs=replace(needs, model=name)))
    unnamed = outcome("/v1/chat/completions", 400, None, 0, None, 0, Failure.MODEL_MISSING)
    metrics.observe(replace(unnamed, needs=replace(needs, model=None)))
    metrics.observe(outcome("/v1/models", 200, dispatch.upstream, 0.0, 0.01, 0.02))
    got = samples(metrics)
    requests = {
        labels: value
        for (name, labels), value in got.items()
        if name == "rower_model_proxied_requests_total"
    }
    assert requests == {
        (("model", "alpha"), ("status", "200")): 1,
        (("model", "alpha"), ("status", "504")): 1,
        (("model", "(unknown)"), ("status", "404")): 3,
        (("model", "(unknown)"), ("status", "400")): 1,
    }
    alpha = (("model", "alpha"),)
    assert got[("rower_model_buffer_wait_seconds_count", alpha)] == 1
    assert got[("rower_model_buffer_wait_seconds_sum", alpha)] == 0.2
    assert got[("rower_model_time_to_first_byte_seconds_count", alpha)] == 1
    assert got[("rower_model_time_to_first_byte_seconds_bucket", (("le", "0.5"), *alpha))] == 1
    assert not [key for key in got if ("model", "gpt-4o") in key[1]]


def test_each_model_of_a_router_is_its_own_series() -> None:
    gate, metrics = make_metrics()
    models = [ModelStatus(name, is_loaded=True, slots_idle=2, slots_total=2) for name in ("a", "b")]
    gate.report(
        "r",
        StatusUpdate(
            external_llamacpp_addr="127.0.0.1:9000",
            agent_name="router",
            is_router=True,
            models=models,
            slots_idle=4,
            slots_total=4,
        ),
    )
    # Parsing fails on a duplicate series, so this also proves there is none.
    got = samples(metrics)
    for model in ("a", "b"):
        labels = (("agent_id", "r"), ("agent_name", "router"), ("model", model))
        assert got[("rower_agent_slots_idle", labels)] == 2
        assert got[("rower_model_slots_idle", (("model", model),))] == 2
