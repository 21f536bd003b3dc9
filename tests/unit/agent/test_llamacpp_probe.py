"""The mapping from one poll of llama-server to a `StatusUpdate` (SPEC 2's table)."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rower.agent.llamacpp_probe import (
    LOADING_ERROR,
    MAX_TEXT,
    AgentIdentity,
    Health,
    ServerFacts,
    SlotsAnswer,
    SlotsFailure,
    SlotsOutcome,
    TransportFailure,
    restarted,
    status_from_poll,
)
from rower.status import SlotStatus, StatusUpdate, json_encoder, status_decoder

URL = "http://127.0.0.1:8088/slots"
IDENTITY = AgentIdentity("10.0.0.5:8088", agent_name="gpu-1", monitoring_interval_ms=500)
FACTS = ServerFacts(model="tiny.gguf", total_slots=2)

# Exactly what llama-server answers (LLAMACPP.md).
IDLE_SLOTS = (
    b'[{"id":0,"n_ctx":2048,"speculative":false,"is_processing":false},'
    b'{"id":1,"n_ctx":2048,"speculative":false,"is_processing":false}]'
)
BUSY_SLOT = (
    b'[{"id":0,"n_ctx":2048,"speculative":false,"is_processing":true,"id_task":7,'
    b'"n_prompt_tokens":28,"n_prompt_tokens_cache":0,"params":{"n_predict":1900},'
    b'"next_token":[{"has_next_token":true,"has_new_line":false,"n_remain":1800,"n_decoded":100}]},'
    b'{"id":1,"n_ctx":2048,"speculative":false,"is_processing":false}]'
)
NO_SLOTS_501 = (
    b'{"error":{"code":501,"message":"This server does not support slots endpoint. '
    b'Start it with `--slots`","type":"not_supported_error"}}'
)
LOADING_503 = b'{"error":{"code":503,"message":"Loading model","type":"unavailable_error"}}'
TRANSPORT_FLAGS = ("is_connect_error", "is_decode_error", "is_request_error")
STATUS_FLAGS = (
    "is_authorized",
    "is_deserialize_error",
    "is_slots_endpoint_enabled",
    "is_unexpected_response_status",
)


def poll(
    outcome: SlotsOutcome,
    *,
    facts: ServerFacts = FACTS,
    health: Health = Health.UNKNOWN,
    sequence: int = 3,
) -> StatusUpdate:
    status = status_from_poll(
        outcome, slots_url=URL, identity=IDENTITY, facts=facts, health=health, sequence=sequence
    )
    # Whatever the agent reports, a balancer must accept it.
    assert status_decoder.decode(json_encoder.encode(status)) == status
    return status


def test_idle_server_is_healthy_with_every_slot_idle() -> None:
    status = poll(SlotsAnswer(200, IDLE_SLOTS))
    assert status == StatusUpdate(
        external_llamacpp_addr="10.0.0.5:8088",
        agent_name="gpu-1",
        error=None,
        is_authorized=True,
        is_connect_error=False,
        is_decode_error=False,
        is_deserialize_error=False,
        is_request_error=False,
        is_slots_endpoint_enabled=True,
        is_unexpected_response_status=False,
        slots_idle=2,
        slots_processing=0,
        slots_total=2,
        model="tiny.gguf",
        monitoring_interval_ms=500,
        sequence=3,
        slots=[SlotStatus(0, False, 2048), SlotStatus(1, False, 2048)],
    )
    assert not status.has_issue


def test_processing_slots_are_counted_and_extra_keys_ignored() -> None:
    status = poll(SlotsAnswer(200, BUSY_SLOT))
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (1, 1, 2)
    assert status.slots == [
        SlotStatus(0, True, 2048, id_task=7, n_decoded=100, n_remain=1800),
        SlotStatus(1, False, 2048),
    ]


def one_slot(**keys: object) -> bytes:
    return msgspec.json.encode([{"id": 0, "is_processing": True, "n_ctx": 512, **keys}])


def progress(**keys: object) -> tuple[int | None, int | None, int | None]:
    """`(id_task, n_decoded, n_remain)` the agent reports for one slot with these keys."""
    status = poll(SlotsAnswer(200, one_slot(**keys)))
    assert status.error is None, status.error
    (slot,) = status.slots
    return slot.id_task, slot.n_decoded, slot.n_remain


def test_progress_of_this_build_is_a_one_element_list() -> None:
    next_token = [{"has_next_token": True, "has_new_line": False, "n_remain": 5, "n_decoded": 3}]
    assert progress(id_task=12, next_token=next_token) == (12, 3, 5)


def test_progress_of_older_builds_is_an_object() -> None:
    next_token = {"has_next_token": True, "n_remain": 40, "n_decoded": 0, "stopped_eos": False}
    assert progress(id_task=0, next_token=next_token) == (0, 0, 40)


def test_unlimited_generation_keeps_n_remain_minus_one() -> None:
    assert progress(id_task=3, next_token=[{"n_remain": -1, "n_decoded": 77}]) == (3, 77, -1)


def test_slot_that_never_had_a_task_has_no_progress() -> None:
    assert progress() == (None, None, None)


@pytest.mark.parametrize(
    "next_token",
    [
        None,
        "soon",
        7,
        [],
        [1],
        [{"n_remain": 1, "n_decoded": 1}, {"n_remain": 2, "n_decoded": 2}],
        [{"n_remain": "5", "n_decoded": 1.5}],
        [{"n_remain": True, "n_decoded": False}],
        [{"n_remain": -2, "n_decoded": -1}],
        [{"n_remain": 2**64, "n_decoded": 2**63}],
    ],
)
def test_malformed_progress_is_left_out_and_the_server_stays_healthy(next_token: object) -> None:
    _, n_decoded, n_remain = progress(id_task=1, next_token=next_token)
    assert (n_decoded, n_remain) == (None, None)


@pytest.mark.parametrize("id_task", [-1, "7", 1.0, True, None, [7]])
def test_malformed_task_id_is_left_out(id_task: object) -> None:
    assert progress(id_task=id_task, next_token=[{"n_remain": 1, "n_decoded": 2}]) == (None, 2, 1)


def slot_with_task(slot_id: int, id_task: int | None) -> SlotStatus:
    return SlotStatus(slot_id, False, 512, id_task=id_task)


def test_restart_is_seen_when_a_task_id_goes_back_or_vanishes() -> None:
    before = [slot_with_task(0, 40), slot_with_task(1, None)]
    assert not restarted(before, [slot_with_task(0, 40), slot_with_task(1, None)])
    assert not restarted(before, [slot_with_task(0, 41), slot_with_task(1, 42)])
    assert restarted(before, [slot_with_task(0, 3), slot_with_task(1, None)])
    assert restarted(before, [slot_with_task(0, None), slot_with_task(1, None)])
    # Nothing known before (first poll, or after an error): nothing to compare.
    assert not restarted([], [slot_with_task(0, 0)])
    # A slot that is gone tells nothing by itself (the slot count says it).
    assert not restarted(before, [slot_with_task(1, 5)])


def test_slot_count_comes_from_slots_not_props_when_healthy() -> None:
    status = poll(SlotsAnswer(200, IDLE_SLOTS), facts=ServerFacts(total_slots=8))
    assert status.slots_total == 2
    assert status.model is None


def test_empty_list_is_healthy_with_no_slots() -> None:
    status = poll(SlotsAnswer(200, b"[]"))
    assert status.error is None
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (0, 0, 0)


def assert_no_capacity(status: StatusUpdate) -> None:
    assert status.error
    assert status.has_issue
    assert (status.slots_idle, status.slots_processing) == (0, 0)
    assert status.slots == []
    # The server's size is still known from /props.
    assert status.slots_total == 2


def test_401_is_unauthorized() -> None:
    status = poll(SlotsAnswer(401, b'{"error":{"code":401,"message":"Invalid API Key"}}'))
    assert_no_capacity(status)
    assert status.error == "Unauthorized"
    assert status.is_authorized is False
    assert status.is_unexpected_response_status is False
    assert all(getattr(status, flag) is False for flag in TRANSPORT_FLAGS)
    assert status.is_slots_endpoint_enabled is None
    assert status.is_deserialize_error is None


def test_501_is_slots_endpoint_disabled() -> None:
    status = poll(SlotsAnswer(501, NO_SLOTS_501))
    assert_no_capacity(status)
    assert status.error == "Not implemented"
    assert status.is_slots_endpoint_enabled is False
    assert status.is_authorized is True
    assert status.is_unexpected_response_status is False
    assert all(getattr(status, flag) is False for flag in TRANSPORT_FLAGS)


@pytest.mark.parametrize("code", [201, 204, 301, 400, 403, 404, 500, 502, 503, 504])
def test_any_other_status_is_unexpected(code: int) -> None:
    status = poll(SlotsAnswer(code, b'{"error":{"code":500}}'))
    assert_no_capacity(status)
    assert status.error == f"Unexpected response status {code}"
    assert status.is_unexpected_response_status is True
    assert all(getattr(status, flag) is False for flag in TRANSPORT_FLAGS)
    assert status.is_authorized is None
    assert status.is_slots_endpoint_enabled is None


@pytest.mark.parametrize("health", [Health.UNKNOWN, Health.OK])
def test_503_without_loading_health_is_unexpected(health: Health) -> None:
    status = poll(SlotsAnswer(503, LOADING_503), health=health)
    assert status.error == "Unexpected response status 503"


def test_503_while_health_says_loading_is_loading() -> None:
    status = poll(SlotsAnswer(503, LOADING_503), health=Health.LOADING)
    assert_no_capacity(status)
    assert status.error == LOADING_ERROR == "Llama.cpp is loading the model"
    assert status.is_unexpected_response_status is True


@pytest.mark.parametrize(
    ("kind", "flag"),
    [
        (TransportFailure.CONNECT, "is_connect_error"),
        (TransportFailure.REQUEST, "is_request_error"),
        (TransportFailure.DECODE, "is_decode_error"),
    ],
)
def test_transport_failure_sets_exactly_its_flag(kind: TransportFailure, flag: str) -> None:
    status = poll(SlotsFailure(kind, "connection refused"))
    assert_no_capacity(status)
    assert status.error == f"Request to {URL} failed: connection refused"
    for name in TRANSPORT_FLAGS:
        assert getattr(status, name) is (name == flag)
    # Nothing is known about what the server would have answered.
    for name in STATUS_FLAGS:
        assert getattr(status, name) is None


def test_transport_failure_while_loading_is_loading() -> None:
    status = poll(SlotsFailure(TransportFailure.REQUEST, "timed out"), health=Health.LOADING)
    assert status.error == LOADING_ERROR
    assert status.is_request_error is True


def test_connection_refused_sentence_matches_the_spec() -> None:
    status = poll(SlotsFailure(TransportFailure.CONNECT, "connection refused"))
    assert status.error == "Request to http://127.0.0.1:8088/slots failed: connection refused"
    assert status.is_connect_error is True


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"null",
        b"{}",
        LOADING_503,
        b'[{"id":0}]',
        b'[{"id":"0","is_processing":false}]',
        b'[{"id":-1,"is_processing":false}]',
        b'[{"id":0,"is_processing":false,"n_ctx":-5}]',
        b"<html>hello</html>",
        b"[1, 2",
    ],
)
def test_200_that_is_not_a_list_of_slots_is_a_deserialize_error(body: bytes) -> None:
    status = poll(SlotsAnswer(200, body))
    assert_no_capacity(status)
    assert status.is_deserialize_error is True
    assert status.is_authorized is True
    assert status.is_slots_endpoint_enabled is True
    assert status.is_unexpected_response_status is False
    assert all(getattr(status, flag) is False for flag in TRANSPORT_FLAGS)
    assert status.error is not None
    assert status.error.startswith(f"Llama.cpp's {URL} answer is not a list of slots: ")


def test_unknown_slot_count_is_zero_on_error() -> None:
    status = poll(SlotsFailure(TransportFailure.CONNECT, "refused"), facts=ServerFacts())
    assert status.slots_total == 0
    assert status.model is None


def test_long_texts_are_clipped_to_what_a_balancer_accepts() -> None:
    long = "x" * 10_000
    status = status_from_poll(
        SlotsFailure(TransportFailure.REQUEST, long),
        slots_url=URL,
        identity=AgentIdentity("h:1", agent_name=long),
        facts=ServerFacts(model=long),
    )
    assert status.error is not None
    assert len(status.error) == MAX_TEXT
    assert status.agent_name is not None
    assert len(status.agent_name) == MAX_TEXT
    assert status.model is not None
    assert len(status.model) == MAX_TEXT
    assert status_decoder.decode(json_encoder.encode(status)) == status


def test_draining_flag_passes_through() -> None:
    status = status_from_poll(
        SlotsAnswer(200, IDLE_SLOTS), slots_url=URL, identity=IDENTITY, is_draining=True
    )
    assert status.is_draining is True


@given(st.binary(max_size=300))
def test_random_body_never_raises(body: bytes) -> None:
    status = poll(SlotsAnswer(200, body))
    try:
        msgspec.json.decode(body, type=list[SlotStatus])
    except msgspec.DecodeError:
        assert status.is_deserialize_error is True
        assert (status.slots_idle, status.slots_processing) == (0, 0)
    else:
        assert status.is_deserialize_error is False


@given(st.binary(max_size=300))
def test_random_non_json_body_is_a_deserialize_error(body: bytes) -> None:
    status = poll(SlotsAnswer(200, b"\xff" + body))
    assert status.is_deserialize_error is True
    assert (status.slots_idle, status.slots_processing) == (0, 0)


progress_values = st.integers() | st.none() | st.booleans() | st.text(max_size=3) | st.floats()
next_tokens = st.fixed_dictionaries(
    {}, optional={"n_remain": progress_values, "n_decoded": progress_values}
)
slot_dicts = st.fixed_dictionaries(
    {
        "id": st.integers(min_value=0, max_value=1000),
        "is_processing": st.booleans(),
        "n_ctx": st.integers(min_value=0, max_value=1 << 20),
    },
    optional={
        "speculative": st.booleans(),
        "id_task": progress_values,
        "next_token": next_tokens | st.lists(next_tokens, max_size=2) | progress_values,
    },
)


def well_formed(value: object, least: int = 0) -> int | None:
    ok = isinstance(value, int) and not isinstance(value, bool) and least <= value < 2**63
    return value if ok else None  # type: ignore[return-value]


# No deadline: on a machine busy with builds one example of 64 slots can take 200 ms.
@settings(deadline=None)
@given(st.lists(slot_dicts, max_size=64))
def test_counts_add_up_for_any_list_of_slots(slots: list[dict[str, object]]) -> None:
    status = poll(SlotsAnswer(200, msgspec.json.encode(slots)))
    busy = sum(1 for slot in slots if slot["is_processing"])
    assert status.error is None
    assert status.slots_processing == busy
    assert status.slots_idle == len(slots) - busy
    assert status.slots_total == len(slots) == len(status.slots)
    for sent, seen in zip(slots, status.slots, strict=True):
        assert seen.id_task == well_formed(sent.get("id_task"))
        next_token = sent.get("next_token")
        if isinstance(next_token, list):
            next_token = next_token[0] if len(next_token) == 1 else None
        progress = next_token if isinstance(next_token, dict) else {}
        assert seen.n_decoded == well_formed(progress.get("n_decoded"))
        assert seen.n_remain == well_formed(progress.get("n_remain"), least=-1)


outcomes = st.one_of(
    st.builds(SlotsAnswer, st.integers(min_value=100, max_value=599), st.binary(max_size=200)),
    st.builds(SlotsFailure, st.sampled_from(TransportFailure), st.text(max_size=50)),
)


@given(
    outcomes,
    st.sampled_from(Health),
    st.builds(
        ServerFacts,
        st.none() | st.text(max_size=50),
        st.none() | st.integers(min_value=-3, max_value=64),
    ),
    st.integers(min_value=0, max_value=1 << 40),
)
def test_every_status_follows_the_rules(
    outcome: SlotsOutcome, health: Health, facts: ServerFacts, sequence: int
) -> None:
    status = poll(outcome, facts=facts, health=health, sequence=sequence)
    assert status.sequence == sequence
    assert status.external_llamacpp_addr == IDENTITY.external_llamacpp_addr
    assert status.monitoring_interval_ms == 500
    answered = isinstance(outcome, SlotsAnswer)
    if answered:
        assert all(getattr(status, flag) is False for flag in TRANSPORT_FLAGS)
    else:
        assert sum(getattr(status, flag) is True for flag in TRANSPORT_FLAGS) == 1
    if status.error is not None:
        assert (status.slots_idle, status.slots_processing, status.slots) == (0, 0, [])
    else:
        assert answered
        assert outcome.status == 200
        assert status.slots_idle + status.slots_processing == status.slots_total
