"""Which client request ids are kept, and what replaces the others."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.request_ids import MAX_LENGTH, request_id

NEW_ID = re.compile(r"[0-9a-f]{32}")


@pytest.mark.parametrize(
    "sent", ["abc", "4f0c2a9e-1d2b-4c3e-8f00-123456789abc", "a" * MAX_LENGTH, "with space ok"]
)
def test_a_printable_ascii_id_is_kept(sent: str) -> None:
    assert request_id(sent) == sent


@pytest.mark.parametrize(
    "sent", [None, "", "a" * (MAX_LENGTH + 1), "tab\there", "new\nline", "naïve", "\x00"]
)
def test_anything_else_is_replaced_by_a_new_id(sent: str | None) -> None:
    assert NEW_ID.fullmatch(request_id(sent))


def test_new_ids_differ() -> None:
    ids = {request_id(None) for _ in range(1000)}
    assert len(ids) == 1000


def test_new_ids_of_one_balancer_share_its_random_half() -> None:
    first, second = request_id(None), request_id(None)
    assert first[:16] == second[:16]
    assert int(second[16:], 16) == int(first[16:], 16) + 1


@given(st.text(max_size=200))
def test_an_id_is_always_printable_ascii_and_short(sent: str) -> None:
    kept = request_id(sent)
    assert 0 < len(kept) <= MAX_LENGTH
    assert kept.isascii()
    assert kept.isprintable()
