"""The balancer's gate for status lines: what it decodes, what it refuses and why."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.status import SlotStatus, StatusRefused, StatusUpdate, checked_status, decode_status


def line(**fields: object) -> bytes:
    return json.dumps({"external_llamacpp_addr": "127.0.0.1:8080", **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff\xfe", "not JSON"),
        (b'{"external_llamacpp_addr": "127.0.0.1:8080", "agent_name": "\xff"}', "not UTF-8"),
        (b'{"external_llamacpp_addr": "127.0.0.1:8080", "model": "\\ud800"}', "not JSON"),
        (b'{"slots_idle": 1}', "invalid status update"),
        (line(slots_idle=-1), "invalid status update"),
        (line(poll_age_ms=-0.5), r"Expected `float` >= 0.0 - at `\$.poll_age_ms`"),
        (line(poll_age_ms=10**9), r"Expected `float` <= 120000.0 - at `\$.poll_age_ms`"),
        (line(poll_age_ms="3"), r"Expected `float \| null`, got `str` - at `\$.poll_age_ms`"),
    ],
)
def test_lines_that_are_not_status_updates(raw: bytes, words: str) -> None:
    with pytest.raises(StatusRefused, match=words):
        decode_status(raw)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        ({"external_llamacpp_addr": "127.0.0.1:8088/slots?x="}, "external_llamacpp_addr refused"),
        ({"external_llamacpp_addr": "not a host:80"}, "external_llamacpp_addr refused"),
        ({"external_llamacpp_addr": "127.0.0.1:99999"}, "external_llamacpp_addr refused"),
        ({"external_llamacpp_addr": "0.0.0.0:8080"}, "every local address"),
        ({"slots_total": 10**12, "slots_idle": 10**12}, "slots_total is 1000000000000"),
        ({"slots_idle": 5}, "at most 4 slots"),
        ({"slots_idle": 2, "slots_processing": 3}, "slots_idle + slots_processing is 5"),
        ({"slots_total": 2, "slots_idle": 3}, "more than slots_total"),
        ({"slots": [{"id": i, "is_processing": False} for i in range(5)]}, "the slots list is 5"),
    ],
)
def test_refused_with_what_and_why(fields: dict[str, object], words: str) -> None:
    status = decode_status(line(**fields))
    with pytest.raises(StatusRefused, match=words.replace("+", r"\+")):
        checked_status(status, max_slots=4)


def test_the_age_of_the_poll_is_optional() -> None:
    # Older agents send none; an age may have a fraction of a millisecond.
    assert decode_status(line()).poll_age_ms is None
    assert decode_status(line(poll_age_ms=0.731)).poll_age_ms == 0.731
    assert decode_status(line(poll_age_ms=3)).poll_age_ms == 3


def test_the_address_comes_back_in_its_one_spelling() -> None:
    status = decode_status(line(external_llamacpp_addr="GPU-7.Example:8080", slots_idle=1))
    assert checked_status(status, max_slots=4).external_llamacpp_addr == "gpu-7.example:8080"
    same = decode_status(line(slots_idle=1))
    assert checked_status(same, max_slots=4) is same


@given(
    st.text(max_size=40),
    st.integers(0, 10),
    st.integers(0, 10),
    st.integers(0, 12),
    st.lists(st.booleans(), max_size=10),
)
def test_what_passes_is_bounded_and_consistent(
    address: str, idle: int, processing: int, total: int, slots: list[bool]
) -> None:
    status = StatusUpdate(
        external_llamacpp_addr=address,
        slots_idle=idle,
        slots_processing=processing,
        slots_total=total,
        slots=[SlotStatus(i, busy) for i, busy in enumerate(slots)],
    )
    try:
        checked = checked_status(status, max_slots=8)
    except StatusRefused:
        return  # refusing is always allowed; what passes must be sound
    assert idle + processing <= 8
    assert total <= 8
    assert len(slots) <= 8
    assert not total or idle + processing <= total
    assert not any(mark in checked.external_llamacpp_addr for mark in "/?#@ ")
