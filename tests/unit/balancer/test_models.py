"""Which model a request goes to, and the fleet's pools per model."""

from __future__ import annotations

import pytest

from rower.balancer.fleet import Buffered, Dispatch, Fleet, Rejected, RejectReason
from rower.balancer.model_listing import listing
from rower.balancer.models import UNKNOWN, ModelNames, ModelProblem, ModelRefusal, ModelRules
from rower.balancer.request_needs import RequestNeeds
from rower.status import ModelStatus, SlotStatus, StatusUpdate


def names(*servers: tuple[str, list[str]], declared: tuple[str, ...] = ()) -> ModelNames:
    return ModelNames.of(servers, declared)


def test_a_single_model_fleet_takes_any_name_or_none() -> None:
    one = names(("llama", ["chat"]))
    rules = ModelRules()
    assert [one.resolve(n, rules) for n in (None, "llama", "gpt-4o", "")] == ["llama"] * 4
    assert names().resolve("anything", rules) == UNKNOWN


def test_several_models_route_by_id_alias_and_rename() -> None:
    fleet = names(("llama", ["chat"]), ("qwen", []), declared=("embed",))
    rules = ModelRules(renames={"gpt-4o": "chat", "text-embedding-3-small": "embed"})
    assert fleet.models == ("embed", "llama", "qwen")
    assert fleet.resolve("chat", rules) == "llama"
    assert fleet.resolve("qwen", rules) == "qwen"
    assert fleet.resolve("gpt-4o", rules) == "llama"
    assert fleet.resolve("text-embedding-3-small", rules) == "embed"


def test_several_models_refuse_unnamed_and_unknown_requests_listing_what_is_served() -> None:
    fleet = names(("a", []), ("b", []))
    assert fleet.resolve(None, ModelRules()) == ModelRefusal(ModelProblem.UNNAMED, None, ("a", "b"))
    assert fleet.resolve("c", ModelRules()) == ModelRefusal(ModelProblem.UNKNOWN, "c", ("a", "b"))
    assert fleet.resolve(None, ModelRules(default="b")) == "b"


def test_an_alias_never_takes_another_models_id() -> None:
    fleet = names(("a", ["b"]), ("b", []))
    assert fleet.resolve("b", ModelRules()) == "b"


def status(
    port: int, model: str | None, total: int = 1, *, aliases: list[str] | None = None
) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        slots_idle=total,
        slots_total=total,
        model=model,
        model_aliases=aliases or [],
        slots=[SlotStatus(id=i, is_processing=False) for i in range(total)],
    )


def ask(fleet: Fleet, request_id: int, model: str | None) -> Dispatch | Buffered | Rejected:
    return fleet.request_slot(request_id, 0.0, needs=RequestNeeds("/completion", True, model=model))


def two_model_fleet(**kwargs: object) -> Fleet:
    fleet = Fleet(max_buffered=2, **kwargs)  # type: ignore[arg-type]
    fleet.report("a", status(8000, "alpha"), 0.0, 0.0)
    fleet.report("b", status(8001, "beta", aliases=["b-chat"]), 0.0, 0.0)
    return fleet


def test_requests_go_only_to_servers_of_their_model() -> None:
    fleet = two_model_fleet()
    first = ask(fleet, 1, "b-chat")
    assert isinstance(first, Dispatch)
    assert (first.agent_id, first.model) == ("b", "beta")
    # beta is full: the next beta request waits although alpha is idle.
    assert isinstance(ask(fleet, 2, "beta"), Buffered)
    assert fleet.pick(0.0, "alpha") is not None
    assert fleet.buffered_by_model() == {"alpha": 0, "beta": 1}


def test_no_head_of_line_blocking_between_models() -> None:
    fleet = two_model_fleet()
    assert isinstance(ask(fleet, 1, "alpha"), Dispatch)
    assert isinstance(ask(fleet, 2, "alpha"), Buffered)
    assert isinstance(ask(fleet, 3, "alpha"), Buffered)
    assert ask(fleet, 4, "alpha") == Rejected(4, RejectReason.BUFFER_FULL, "alpha")
    # alpha's buffer is full: beta is served at once.
    beta = ask(fleet, 5, "beta")
    assert isinstance(beta, Dispatch)
    # A slot freed on beta goes to no alpha waiter.
    assert fleet.release(5, 0.0) == []
    (next_alpha,) = fleet.release(1, 0.0)
    assert next_alpha.request_id == 2


def test_wrong_models_are_rejected_with_what_the_fleet_serves() -> None:
    fleet = two_model_fleet()
    assert ask(fleet, 1, None) == Rejected(1, RejectReason.MODEL_UNNAMED, None, ("alpha", "beta"))
    assert ask(fleet, 2, "gamma") == Rejected(
        2, RejectReason.MODEL_UNKNOWN, "gamma", ("alpha", "beta")
    )
    assert fleet.requests_buffered == 0


def test_a_declared_model_waits_for_its_first_server() -> None:
    fleet = Fleet(max_buffered=5, models=ModelRules(declared=("alpha", "beta")))
    fleet.report("a", status(8000, "alpha"), 0.0, 0.0)
    waiting = ask(fleet, 1, "beta")
    assert waiting == Buffered(1, model="beta")
    assert fleet.buffered_by_model() == {"alpha": 0, "beta": 1}
    (served,) = fleet.report("b", status(8001, "beta"), 1.0, 1.0)
    assert (served.request_id, served.agent_id) == (1, "b")


def test_requests_that_waited_for_a_fleet_with_no_model_go_to_its_first_model() -> None:
    fleet = Fleet(max_buffered=5)
    assert isinstance(ask(fleet, 1, "whatever"), Buffered)
    assert isinstance(ask(fleet, 2, None), Buffered)
    dispatched = fleet.report("a", status(8000, "alpha", total=2), 0.0, 0.0)
    assert [d.request_id for d in dispatched] == [1, 2]


def test_per_model_buffer_limits() -> None:
    fleet = two_model_fleet(models=ModelRules(max_buffered={"beta": 0}))
    assert isinstance(ask(fleet, 1, "beta"), Dispatch)
    assert ask(fleet, 2, "beta") == Rejected(2, RejectReason.BUFFER_DISABLED, "beta")
    assert isinstance(ask(fleet, 3, "alpha"), Dispatch)
    assert isinstance(ask(fleet, 4, "alpha"), Buffered)


def test_a_server_that_changes_model_moves_to_that_models_pool() -> None:
    fleet = two_model_fleet()
    fleet.report("a", status(8000, "beta"), 1.0, 1.0)
    assert fleet.names.models == ("beta",)
    assert isinstance(ask(fleet, 1, "beta"), Dispatch)
    assert isinstance(ask(fleet, 2, "alpha"), Dispatch)  # one model left: any name goes


def router(port: int, *models: ModelStatus) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        is_router=True,
        models=list(models),
        slots_idle=sum(m.slots_idle for m in models),
        slots_total=sum(m.slots_total for m in models),
    )


def loaded(name: str, total: int = 2) -> ModelStatus:
    slots = [SlotStatus(id=i, is_processing=False) for i in range(total)]
    return ModelStatus(name, is_loaded=True, slots_idle=total, slots_total=total, slots=slots)


def test_each_loaded_model_of_a_router_is_its_own_upstream() -> None:
    fleet = Fleet(max_buffered=2)
    fleet.report("r", router(9000, loaded("alpha", 1), loaded("beta", 1)), 0.0, 0.0)
    assert sorted(fleet.upstreams) == ["r/alpha", "r/beta"]
    alpha, beta = ask(fleet, 1, "alpha"), ask(fleet, 2, "beta")
    assert isinstance(alpha, Dispatch)
    assert isinstance(beta, Dispatch)
    assert alpha.upstream == beta.upstream == "127.0.0.1:9000"
    assert isinstance(ask(fleet, 3, "alpha"), Buffered)
    # The router unloads beta: the request on it runs on and is released.
    fleet.report("r", router(9000, loaded("alpha", 1), ModelStatus("beta")), 1.0, 1.0)
    assert fleet.upstreams["r/beta"].cold
    assert fleet.release(2, 1.0) == []
    (third,) = fleet.release(1, 1.0)
    assert third.request_id == 3
    assert fleet.drain("r")
    fleet.remove_agent("r")
    assert fleet.upstreams == {}


def test_a_model_no_server_has_loaded_is_loaded_by_one_request_on_a_router() -> None:
    fleet = Fleet(max_buffered=5)
    fleet.report("r", router(9000, loaded("alpha", 1), ModelStatus("gamma")), 0.0, 0.0)
    assert fleet.names.models == ("alpha", "gamma")
    # Not free capacity in the views: its one slot is for loading it.
    cold = next(v for v in fleet.views(0.0) if v.status.model == "gamma")
    assert cold.status.slots_idle == 0
    first = ask(fleet, 1, "gamma")
    assert isinstance(first, Dispatch)
    assert first.upstream == "127.0.0.1:9000"
    # One request loads it; the others wait for the model's real slots.
    assert isinstance(ask(fleet, 2, "gamma"), Buffered)
    (second,) = fleet.report("r", router(9000, loaded("alpha", 1), loaded("gamma", 2)), 1.0, 1.0)
    assert second.request_id == 2
    assert not fleet.upstreams["r/gamma"].cold


def test_a_router_is_not_asked_to_load_a_model_another_server_has_loaded() -> None:
    fleet = Fleet(max_buffered=5)
    fleet.report("s", status(8000, "gamma"), 0.0, 0.0)
    fleet.report("r", router(9000, loaded("alpha", 1), ModelStatus("gamma")), 0.0, 0.0)
    assert sorted(fleet.upstreams) == ["r/alpha", "s"]
    assert isinstance(ask(fleet, 1, "gamma"), Dispatch)
    assert isinstance(ask(fleet, 2, "gamma"), Buffered)


def test_a_router_with_an_issue_keeps_its_models_unusable() -> None:
    fleet = Fleet(max_buffered=2)
    fleet.report("r", router(9000, loaded("alpha")), 0.0, 0.0)
    broken = StatusUpdate(
        external_llamacpp_addr="127.0.0.1:9000", is_router=True, error="Unauthorized"
    )
    fleet.report("r", broken, 1.0, 1.0)
    (unit,) = fleet.upstreams.values()
    assert not unit.is_usable(1.0)
    assert unit.model == "alpha"


@pytest.mark.parametrize("model", ["alpha", None])
def test_a_restarted_router_agent_supersedes_the_old_one_per_model(model: str | None) -> None:
    fleet = Fleet(max_buffered=2)
    fleet.report("old", router(9000, loaded("alpha", 1)), 0.0, 0.0)
    assert isinstance(ask(fleet, 1, model), Dispatch)
    fleet.report("new", router(9000, loaded("alpha", 1)), 1.0, 1.0)
    assert list(fleet.upstreams) == ["new/alpha"]
    assert fleet.superseded_by_last_report == ["old"]
    assert fleet.is_superseded("old")
    # The request in flight moved to the newcomer: no free slot is seen twice.
    assert isinstance(ask(fleet, 2, model), Buffered)
    fleet.report("old", router(9000, loaded("alpha", 1)), 2.0, 2.0)
    assert list(fleet.upstreams) == ["new/alpha"]


def test_v1_models_lists_the_whole_fleet() -> None:
    fleet = Fleet(max_buffered=5, models=ModelRules(declared=("embed",)))
    fleet.report("a", status(8000, "alpha", 2, aliases=["chat"]), 0.0, 100.0)
    fleet.report("b", status(8001, "alpha", 1), 0.0, 50.0)
    fleet.report("r", router(9000, loaded("beta", 1), ModelStatus("gamma")), 0.0, 70.0)
    ask(fleet, 1, "embed")
    body = listing(fleet, 0.0, 200.0)
    assert [m["id"] for m in body["data"]] == ["alpha", "beta", "embed", "gamma"]
    alpha, beta, embed, gamma = body["data"]
    assert alpha["aliases"] == ["chat"]
    assert (alpha["object"], alpha["owned_by"], alpha["created"]) == ("model", "llamacpp", 50)
    assert alpha["rower"] == {
        "state": "ready",
        "servers": 2,
        "slots_total": 3,
        "slots_free": 3,
        "requests_buffered": 0,
    }
    assert beta["rower"]["state"] == "ready"
    assert (embed["rower"]["state"], embed["rower"]["requests_buffered"]) == ("declared", 1)
    assert gamma["rower"]["state"] == "loadable"
    assert body["object"] == "list"
    assert [m["name"] for m in body["models"]] == ["alpha", "beta", "embed", "gamma"]
