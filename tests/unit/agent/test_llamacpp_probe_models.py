"""What a server serves (`/props`, `/v1/models`) and what one poll of a router means.

The JSON is what llama-server (build 11434) answered, shortened to the keys that matter; the
e2e facts in tests/e2e/test_llama_server_facts.py check the same shapes on the real server.
"""

from __future__ import annotations

import msgspec
import pytest

from rower.agent.llamacpp_probe import (
    MAX_ALIASES,
    MAX_MODELS,
    AgentIdentity,
    ListedModel,
    ListingIssue,
    ServerFacts,
    SlotsAnswer,
    SlotsFailure,
    SlotsOutcome,
    TransportFailure,
    facts_from_props,
    model_listing,
    model_slots_path,
    models_to_poll,
    read_model_list,
    router_status_from_poll,
    status_from_poll,
    with_model_list,
)
from rower.status import ModelStatus, SlotStatus, StatusUpdate, checked_status, json_encoder
from rower.status import status_decoder as decoder

BASE = "http://127.0.0.1:8088"
MODELS_URL = f"{BASE}/v1/models"
IDENTITY = AgentIdentity("10.0.0.5:8088", agent_name="router-1")

PROPS_WITH_ALIAS = (
    b'{"total_slots":2,"model_alias":"tiny-chat",'
    b'"model_path":"/root/.cache/rower/models/tiny.gguf","is_sleeping":false}'
)
PROPS_WITHOUT_ALIAS = (
    b'{"total_slots":2,"model_alias":"/root/.cache/rower/models/tiny.gguf",'
    b'"model_path":"/root/.cache/rower/models/tiny.gguf"}'
)
PROPS_OF_A_ROUTER = (
    b'{"role":"router","max_instances":2,"models_autoload":true,"model_alias":"llama-server",'
    b'"model_path":"none","default_generation_settings":{"params":null,"n_ctx":0}}'
)
# llama-server -m tiny.gguf --alias tiny-chat,tiny-fast
MODELS_WITH_ALIASES = (
    b'{"models":[{"name":"tiny-chat","model":"tiny-chat"}],"object":"list","data":[{"id":'
    b'"tiny-chat","aliases":["tiny-chat","tiny-fast"],"tags":[],"object":"model",'
    b'"owned_by":"llamacpp","meta":{"n_ctx":4096}}]}'
)
MODELS_WITHOUT_ALIAS = (
    b'{"object":"list","data":[{"id":"/root/.cache/rower/models/tiny.gguf",'
    b'"aliases":["/root/.cache/rower/models/tiny.gguf"],"object":"model"}]}'
)


def router_models(*entries: tuple[str, str]) -> bytes:
    """A router's `/v1/models`: one entry per `(name, status.value)`."""
    return msgspec.json.encode(
        {
            "data": [
                {
                    "id": name,
                    "aliases": [],
                    "tags": [],
                    "object": "model",
                    "owned_by": "llamacpp",
                    "status": {"value": value, "args": ["llama-server", "--alias", name]},
                    "source": "models_dir",
                }
                for name, value in entries
            ],
            "object": "list",
        }
    )


IDLE_SLOTS = (
    b'[{"id":0,"n_ctx":4096,"speculative":false,"is_processing":false},'
    b'{"id":1,"n_ctx":4096,"speculative":false,"is_processing":false,"id_task":0,'
    b'"next_token":[{"has_next_token":false,"has_new_line":false,"n_remain":-1,"n_decoded":0}]}]'
)
BUSY_SLOT = (
    b'[{"id":0,"n_ctx":4096,"is_processing":true,"id_task":5,'
    b'"next_token":[{"has_next_token":true,"n_remain":90,"n_decoded":10}]}]'
)
NOT_LOADED_400 = (
    b'{"error":{"code":400,"message":"model is not loaded","type":"invalid_request_error"}}'
)


def router_poll(
    listing: SlotsOutcome,
    slots: dict[str, SlotsOutcome] | None = None,
    *,
    known_totals: dict[str, int] | None = None,
) -> StatusUpdate:
    status = router_status_from_poll(
        model_listing(listing, models_url=MODELS_URL),
        slots or {},
        base_url=BASE,
        identity=IDENTITY,
        sequence=4,
        known_totals=known_totals,
    )
    # Whatever the agent reports, a balancer must accept it.
    assert decoder.decode(json_encoder.encode(status)) == status
    assert checked_status(status, max_slots=1024) == status
    assert status.is_router is True
    assert (status.model, status.model_aliases, status.slots) == (None, [], [])
    for key in ("slots_idle", "slots_processing", "slots_total"):
        assert getattr(status, key) == sum(getattr(model, key) for model in status.models)
    return status


# --- /props and /v1/models of a single-model server ------------------------------------------


def test_props_name_the_model_by_its_alias() -> None:
    assert facts_from_props(PROPS_WITH_ALIAS) == ServerFacts(model="tiny-chat", total_slots=2)


def test_props_without_alias_name_the_model_by_its_path_as_llama_server_does() -> None:
    facts = facts_from_props(PROPS_WITHOUT_ALIAS)
    assert facts == ServerFacts(model="/root/.cache/rower/models/tiny.gguf", total_slots=2)


def test_props_with_an_empty_alias_fall_back_to_the_file_name() -> None:
    body = b'{"total_slots":1,"model_alias":"","model_path":"C:\\\\m\\\\q.gguf"}'
    assert facts_from_props(body) == ServerFacts(model="q.gguf", total_slots=1)


def test_props_of_a_router_name_no_model() -> None:
    # Its model_alias "llama-server" is a placeholder, not a name clients can send.
    assert facts_from_props(PROPS_OF_A_ROUTER) == ServerFacts(is_router=True)


@pytest.mark.parametrize("body", [b"", b"[]", b'{"total_slots":"2"}', b"<html>"])
def test_unreadable_props_say_why(body: bytes) -> None:
    assert isinstance(facts_from_props(body), str)


def test_the_model_id_and_its_other_names_come_from_v1_models() -> None:
    listed = read_model_list(MODELS_WITH_ALIASES)
    assert listed == [ListedModel("tiny-chat", ("tiny-fast",))]
    facts = with_model_list(ServerFacts(model="tiny-chat", total_slots=2), listed)
    assert facts == ServerFacts(model="tiny-chat", total_slots=2, aliases=("tiny-fast",))
    status = status_from_poll(
        SlotsAnswer(200, IDLE_SLOTS), slots_url=f"{BASE}/slots", identity=IDENTITY, facts=facts
    )
    assert (status.model, status.model_aliases, status.is_router) == (
        "tiny-chat",
        ["tiny-fast"],
        False,
    )
    assert status.models == []


def test_a_server_without_alias_has_only_its_path_as_name() -> None:
    listed = read_model_list(MODELS_WITHOUT_ALIAS)
    assert listed == [ListedModel("/root/.cache/rower/models/tiny.gguf")]
    facts = with_model_list(ServerFacts(model="x", total_slots=2), listed)
    assert (facts.model, facts.aliases) == ("/root/.cache/rower/models/tiny.gguf", ())


def test_an_empty_model_list_keeps_what_props_said() -> None:
    facts = ServerFacts(model="tiny-chat", total_slots=2)
    assert with_model_list(facts, []) == facts


def test_odd_names_are_left_out_not_the_whole_list() -> None:
    long = "x" * 257
    body = msgspec.json.encode(
        {
            "data": [
                {"id": 7, "aliases": ["seven"]},
                {"id": "", "aliases": []},
                {"id": long},
                {"id": "good", "aliases": ["good", "", None, 3, long, "g", "g", "gd"]},
                {"id": "good", "aliases": ["again"]},
                {"id": "bare", "aliases": "not a list"},
                {"id": "many", "aliases": [f"m{i}" for i in range(100)]},
            ]
        }
    )
    listed = read_model_list(body)
    assert isinstance(listed, list)
    assert [(model.name, model.aliases[:2]) for model in listed] == [
        ("good", ("g", "gd")),
        ("bare", ()),
        ("many", ("m0", "m1")),
    ]
    assert len(listed[2].aliases) == MAX_ALIASES


@pytest.mark.parametrize("body", [b"", b"{}", b"[]", b'{"data":{}}', b'{"data":[1]}', b"\xff"])
def test_a_body_that_is_not_a_list_of_models_says_why(body: bytes) -> None:
    assert isinstance(read_model_list(body), str)
    issue = model_listing(SlotsAnswer(200, body), models_url=MODELS_URL)
    assert isinstance(issue, ListingIssue)
    assert issue.error.startswith(f"Llama.cpp's {MODELS_URL} answer is not a list of models: ")
    assert issue.flags["is_deserialize_error"] is True


# --- router mode --------------------------------------------------------------------------------


def test_router_load_states_are_read_from_status_value() -> None:
    body = router_models(
        ("a", "loaded"), ("b", "unloaded"), ("c", "loading"), ("d", "sleeping"), ("e", "?")
    )
    listed = read_model_list(body)
    assert isinstance(listed, list)
    assert [(model.name, model.state, model.is_loaded) for model in listed] == [
        ("a", "loaded", True),
        ("b", "unloaded", False),
        ("c", "loading", False),
        ("d", "sleeping", False),
        ("e", "?", False),
    ]
    # Only a loaded model is asked for its slots: asking loads an unloaded one, wakes a
    # sleeping one, and waits for a loading one.
    assert models_to_poll(listed) == ["a"]


def test_a_models_slots_are_asked_for_without_autoload() -> None:
    assert model_slots_path("tiny-a") == "/slots?model=tiny-a&autoload=false"
    assert model_slots_path("a b&c=d/é") == "/slots?model=a+b%26c%3Dd%2F%C3%A9&autoload=false"


def test_a_router_with_no_model_loaded_is_healthy_with_no_slots() -> None:
    status = router_poll(
        SlotsAnswer(200, router_models(("tiny-a", "unloaded"), ("tiny-b", "unloaded")))
    )
    assert status.error is None
    assert status.is_authorized is True
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (0, 0, 0)
    assert status.models == [ModelStatus("tiny-a"), ModelStatus("tiny-b")]
    assert status.sequence == 4


def test_each_loaded_model_reports_its_own_slots_and_the_top_level_sums_them() -> None:
    listing = SlotsAnswer(
        200, router_models(("tiny-a", "loaded"), ("tiny-b", "loaded"), ("tiny-c", "unloaded"))
    )
    status = router_poll(
        listing, {"tiny-a": SlotsAnswer(200, IDLE_SLOTS), "tiny-b": SlotsAnswer(200, BUSY_SLOT)}
    )
    assert status.error is None
    a, b, c = status.models
    assert (a.model, a.is_loaded, a.error, a.slots_idle, a.slots_processing, a.slots_total) == (
        "tiny-a",
        True,
        None,
        2,
        0,
        2,
    )
    assert a.slots == [SlotStatus(0, False, 4096), SlotStatus(1, False, 4096, 0, 0, -1)]
    assert (b.slots_idle, b.slots_processing, b.slots_total) == (0, 1, 1)
    assert b.slots == [SlotStatus(0, True, 4096, id_task=5, n_decoded=10, n_remain=90)]
    assert c == ModelStatus("tiny-c")
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (2, 1, 3)


def test_a_loaded_model_whose_slots_fail_has_its_own_error_not_the_server() -> None:
    listing = SlotsAnswer(200, router_models(("a", "loaded"), ("b", "loaded"), ("c", "loaded")))
    status = router_poll(
        listing,
        {
            "a": SlotsAnswer(200, IDLE_SLOTS),
            "b": SlotsFailure(TransportFailure.REQUEST, "timed out after 3 s"),
            "c": SlotsAnswer(400, NOT_LOADED_400),
        },
        known_totals={"b": 4},
    )
    assert status.error is None
    a, b, c = status.models
    assert a.error is None
    assert b.error == (
        f"Request to {BASE}/slots?model=b&autoload=false failed: timed out after 3 s"
    )
    # It still has its slots, they are just unusable now.
    assert (b.is_loaded, b.slots_idle, b.slots_processing, b.slots_total, b.slots) == (
        True,
        0,
        0,
        4,
        [],
    )
    assert c.error == (
        f"Unexpected response status 400 from {BASE}/slots?model=c&autoload=false: "
        "model is not loaded"
    )
    assert (c.slots_idle, c.slots_total) == (0, 0)
    assert (status.slots_idle, status.slots_total) == (2, 6)


def test_a_loaded_model_whose_slots_are_unreadable_or_were_not_asked_has_an_error() -> None:
    listing = SlotsAnswer(200, router_models(("a", "loaded"), ("b", "loaded")))
    status = router_poll(listing, {"a": SlotsAnswer(200, b'{"slots":1}')})
    a, b = status.models
    assert a.error is not None
    assert a.error.startswith(f"Llama.cpp's {BASE}/slots?model=a&autoload=false answer is not")
    assert b.error == f"{BASE}/slots?model=b&autoload=false was not asked"


def test_a_model_that_failed_to_load_says_so() -> None:
    body = msgspec.json.encode(
        {
            "data": [
                {
                    "id": "broken",
                    "aliases": [],
                    "status": {"value": "unloaded", "failed": True, "exit_code": 1},
                }
            ]
        }
    )
    (model,) = router_poll(SlotsAnswer(200, body)).models
    assert model.is_loaded is False
    assert model.error == (
        "llama-server could not load this model (its process exited with status 1); see its log"
    )


def test_router_aliases_are_reported_per_model() -> None:
    body = msgspec.json.encode(
        {"data": [{"id": "qwen", "aliases": ["qwen-7b", "chat"], "status": {"value": "loaded"}}]}
    )
    (model,) = router_poll(SlotsAnswer(200, body), {"qwen": SlotsAnswer(200, IDLE_SLOTS)}).models
    assert (model.model, model.aliases, model.slots_idle) == ("qwen", ["qwen-7b", "chat"], 2)


@pytest.mark.parametrize(
    ("listing", "error", "flag"),
    [
        (SlotsAnswer(401, b"{}"), "Unauthorized", "is_authorized"),
        (
            SlotsAnswer(500, b"{}"),
            "Unexpected response status 500",
            "is_unexpected_response_status",
        ),
        (
            SlotsFailure(TransportFailure.CONNECT, "connection refused"),
            f"Request to {MODELS_URL} failed: connection refused",
            "is_connect_error",
        ),
        (
            SlotsAnswer(200, b"[]"),
            f"Llama.cpp's {MODELS_URL} answer is not",
            "is_deserialize_error",
        ),
    ],
)
def test_a_router_whose_model_list_fails_has_an_issue(
    listing: SlotsOutcome, error: str, flag: str
) -> None:
    status = router_poll(listing)
    assert status.error is not None
    assert status.error.startswith(error)
    assert getattr(status, flag) is (flag != "is_authorized")
    assert (status.slots_idle, status.slots_total, status.models) == (0, 0, [])


def test_a_router_with_more_models_than_a_status_carries_keeps_the_loaded_ones() -> None:
    entries = [(f"m{i:03}", "unloaded") for i in range(MAX_MODELS + 10)]
    entries.append(("late", "loaded"))
    listing = SlotsAnswer(200, router_models(*entries))
    listed = read_model_list(listing.body)
    assert isinstance(listed, list)
    assert models_to_poll(listed) == ["late"]
    status = router_poll(listing, {"late": SlotsAnswer(200, IDLE_SLOTS)})
    assert len(status.models) == MAX_MODELS
    assert status.models[0].model == "late"
    assert status.slots_idle == 2
