"""Every parser of outside input, fed anything: it answers or refuses, it never crashes.

The parsers: NDJSON status lines (`status_decoder`, what the balancer reads from agents),
llama-server's `/slots` answers (`slots_decoder` and the agent's `status_from_poll` mapping),
its `/props` and `/v1/models` answers and a router's per-model `/slots` (`facts_from_props`,
`model_listing`, `router_status_from_poll`), and `HOST:PORT` addresses (`Address.parse`,
flags and reported addresses).
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

import msgspec
from hypothesis import example, given, settings
from hypothesis import strategies as st

from rower.addresses import Address, AddressError
from rower.agent.llamacpp_probe import (
    MAX_MODELS,
    AgentIdentity,
    ServerFacts,
    SlotsAnswer,
    facts_from_props,
    model_listing,
    models_to_poll,
    router_status_from_poll,
    status_from_poll,
    with_model_list,
)
from rower.llamacpp import slots_decoder
from rower.status import (
    MAX_INTERVAL_MS,
    ModelStatus,
    SlotStatus,
    StatusRefused,
    StatusUpdate,
    checked_status,
    decode_status,
    json_encoder,
    status_decoder,
)

bounded = settings(max_examples=150, deadline=None)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=20,
)
STATUS_KEYS = list(StatusUpdate.__struct_fields__)


def status_like() -> st.SearchStrategy[dict[str, Any]]:
    """Objects with StatusUpdate's keys and values of any JSON type."""
    return st.dictionaries(st.sampled_from(STATUS_KEYS), json_values, max_size=len(STATUS_KEYS))


def _decode_status(line: bytes) -> StatusUpdate | None:
    try:
        return decode_status(line)
    except StatusRefused:
        return None


@bounded
@given(st.binary(max_size=300))
@example(b"")
@example(b"\xff\xfe")
@example(b'{"external_llamacpp_addr": "a:1", "agent_name": "\xff"}')
@example(b'{"external_llamacpp_addr": "a:1", "slots_idle": -1}')
def test_status_line_of_random_bytes_is_parsed_or_refused(line: bytes) -> None:
    _decode_status(line)


@bounded
@given(status_like())
def test_status_line_of_wrongly_typed_fields_is_parsed_or_refused(fields: dict[str, Any]) -> None:
    status = _decode_status(json.dumps(fields).encode())
    if status is not None:
        # Whatever got through obeys the contract the fleet core relies on.
        assert status.slots_idle >= 0
        assert status.slots_processing >= 0
        assert status.monitoring_interval_ms >= 1
        assert 3 <= len(status.external_llamacpp_addr) <= 300


text = st.text(max_size=50)
names = st.text(min_size=1, max_size=30)
slot_statuses = st.lists(
    st.builds(
        SlotStatus,
        st.integers(0, 512),
        st.booleans(),
        st.integers(0, 10**6),
        id_task=st.none() | st.integers(0, 2**63 - 1),
        n_decoded=st.none() | st.integers(0, 2**31),
        n_remain=st.none() | st.integers(-1, 2**31),
    ),
    max_size=8,
)
statuses = st.builds(
    StatusUpdate,
    external_llamacpp_addr=st.text(min_size=3, max_size=300),
    agent_name=st.none() | text,
    error=st.none() | text,
    is_authorized=st.none() | st.booleans(),
    slots_idle=st.integers(0, 10_000),
    slots_processing=st.integers(0, 10_000),
    slots_total=st.integers(0, 10_000),
    model=st.none() | text,
    monitoring_interval_ms=st.integers(1, MAX_INTERVAL_MS),
    sequence=st.integers(0, 2**62),
    is_draining=st.booleans(),
    slots=slot_statuses,
    model_aliases=st.lists(names, max_size=4),
    is_router=st.booleans(),
    models=st.lists(
        st.builds(
            ModelStatus,
            names,
            aliases=st.lists(names, max_size=3),
            is_loaded=st.booleans(),
            error=st.none() | text,
            slots_idle=st.integers(0, 512),
            slots_processing=st.integers(0, 512),
            slots_total=st.integers(0, 512),
            slots=slot_statuses,
        ),
        max_size=4,
    ),
)


@bounded
@given(statuses)
def test_every_status_an_agent_can_send_reads_back_the_same(status: StatusUpdate) -> None:
    assert status_decoder.decode(json_encoder.encode(status)) == status


next_token_objects = st.dictionaries(
    st.sampled_from(["has_next_token", "n_remain", "n_decoded"]) | st.text(max_size=5),
    json_values | st.integers(-(2**70), 2**70),
    max_size=4,
)
slot_objects = st.fixed_dictionaries(
    {"id": st.integers(-(2**40), 2**40), "is_processing": st.booleans()},
    optional={
        "n_ctx": st.integers(-(2**40), 2**40),
        "speculative": st.booleans(),
        "id_task": json_values | st.integers(-(2**70), 2**70),
        # This build's one-element list, older builds' object, or anything else.
        "next_token": st.lists(next_token_objects, max_size=2) | next_token_objects | json_values,
    },
)
slot_bodies = (
    st.binary(max_size=200)
    | st.lists(slot_objects, max_size=6).map(lambda s: json.dumps(s).encode())
    | json_values.map(lambda v: json.dumps(v).encode())
)
IDENTITY = AgentIdentity(external_llamacpp_addr="127.0.0.1:8080", agent_name="gpu")


@bounded
@given(st.integers(100, 599), slot_bodies, st.none() | st.integers(-5, 64))
def test_any_slots_answer_maps_to_a_status_the_balancer_accepts(
    status_code: int, body: bytes, total: int | None
) -> None:
    with contextlib.suppress(msgspec.DecodeError):
        slots_decoder.decode(body)
    status = status_from_poll(
        SlotsAnswer(status_code, body),
        slots_url="http://127.0.0.1:8080/slots",
        identity=IDENTITY,
        facts=ServerFacts(model="m", total_slots=total),
    )
    # The agent never sends a line its balancer would refuse with a 400.
    assert status_decoder.decode(json_encoder.encode(status)) == status
    assert checked_status(status, max_slots=64) == status
    if status.error is None:
        assert status_code == 200
        assert status.slots_idle + status.slots_processing == status.slots_total
        assert status.slots_total == len(status.slots)
        for slot in status.slots:
            assert slot.id_task is None or slot.id_task >= 0
            assert slot.n_decoded is None or slot.n_decoded >= 0
            assert slot.n_remain is None or slot.n_remain >= -1
    else:
        assert (status.slots_idle, status.slots_processing) == (0, 0)


props_bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {},
        optional={
            "role": st.sampled_from(["router", "", "model"]) | json_values,
            "total_slots": st.integers(-5, 64) | json_values,
            "model_alias": st.text(max_size=300) | json_values,
            "model_path": st.text(max_size=300) | json_values,
        },
    ).map(lambda v: json.dumps(v).encode())
)
model_names = st.text(max_size=300) | json_values
listed_models = st.fixed_dictionaries(
    {"id": model_names},
    optional={
        "aliases": st.lists(model_names, max_size=70) | json_values,
        "status": st.fixed_dictionaries(
            {},
            optional={
                "value": st.sampled_from(["loaded", "unloaded", "loading", "sleeping"])
                | json_values,
                "failed": st.booleans() | json_values,
                "exit_code": st.integers(-(2**70), 2**70) | json_values,
            },
        )
        | json_values,
    },
)
models_bodies = (
    st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.lists(listed_models, max_size=8).map(lambda d: json.dumps({"data": d}).encode())
    # More models than a status carries: the loaded ones must be kept.
    | st.integers(MAX_MODELS - 2, MAX_MODELS + 3).map(
        lambda n: json.dumps(
            {
                "data": [
                    {"id": f"m{i}", "status": {"value": "loaded" if i % 7 else "x"}}
                    for i in range(n)
                ]
            }
        ).encode()
    )
)


@bounded
@given(props_bodies, st.integers(100, 599), models_bodies, st.integers(100, 599), slot_bodies)
def test_any_props_and_models_answers_name_a_model_the_balancer_accepts(
    props: bytes, models_code: int, models: bytes, slots_code: int, slots: bytes
) -> None:
    facts = facts_from_props(props)
    if isinstance(facts, str):
        facts = ServerFacts()
    listing = model_listing(SlotsAnswer(models_code, models), models_url="http://h:1/v1/models")
    if isinstance(listing, list) and not facts.is_router:
        facts = with_model_list(facts, listing)
    status = status_from_poll(
        SlotsAnswer(slots_code, slots),
        slots_url="http://h:1/slots",
        identity=IDENTITY,
        facts=facts,
    )
    assert status_decoder.decode(json_encoder.encode(status)) == status
    assert status.model not in status.model_aliases


@bounded
@given(
    models_bodies,
    st.integers(100, 599),
    st.lists(st.tuples(st.integers(100, 599), slot_bodies), max_size=8),
)
def test_any_router_poll_maps_to_a_status_the_balancer_accepts(
    models: bytes, models_code: int, answers: list[tuple[int, bytes]]
) -> None:
    listing = model_listing(SlotsAnswer(models_code, models), models_url="http://h:1/v1/models")
    polled = models_to_poll(listing) if isinstance(listing, list) else []
    model_slots = {
        name: SlotsAnswer(*answers[i % len(answers)]) if answers else SlotsAnswer(200, b"[]")
        for i, name in enumerate(polled)
    }
    status = router_status_from_poll(
        listing, model_slots, base_url="http://h:1", identity=IDENTITY, known_totals={"m1": 3}
    )
    # The agent never sends a line its balancer would refuse.
    assert status_decoder.decode(json_encoder.encode(status)) == status
    assert checked_status(status, max_slots=10**6) == status
    assert status.is_router
    assert status.slots == []
    assert len(status.models) <= MAX_MODELS
    for key in ("slots_idle", "slots_processing", "slots_total"):
        assert getattr(status, key) == sum(getattr(model, key) for model in status.models)
    for model in status.models:
        assert model.slots_idle + model.slots_processing <= model.slots_total
        assert model.model not in model.aliases
        if not model.is_loaded:
            assert (model.slots_total, model.slots) == (0, [])
        if model.error is not None:
            assert (model.slots_idle, model.slots_processing, model.slots) == (0, 0, [])
    if isinstance(listing, list):
        assert status.error is None
        loaded = [model.model for model in status.models if model.is_loaded]
        assert loaded == polled
    else:
        assert status.error is not None
        assert status.models == []


# Host names as `Address.parse` keeps them: lower-case labels of letters, digits and inner '-',
# the last one not a number (which would make the name an IPv4 address).
LABEL = r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?"
hosts = st.from_regex(rf"\A({LABEL}\.){{0,3}}[a-z]([a-z0-9-]{{0,8}}[a-z0-9])?\Z") | st.ip_addresses(
    v=4
).map(str)


@bounded
@given(st.text(max_size=60))
@example("[::1]:8080")
@example("[::1]:")
@example("host:0")
@example("host:65536")
@example("http://host:80")
@example(":80")
def test_address_of_random_text_is_parsed_or_refused(text: str) -> None:
    try:
        address = Address.parse(text)
    except AddressError:
        return
    assert 0 < address.port < 65536
    assert Address.parse(str(address)) == address


@bounded
@given(hosts | st.ip_addresses(v=6).map(str), st.integers(1, 65535))
def test_every_address_reads_back_from_its_text(host: str, port: int) -> None:
    address = Address(host, port)
    assert Address.parse(str(address)) == address
