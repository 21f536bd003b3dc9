"""Placements between balancers: what goes on the wire comes back, and nothing else is believed."""

from __future__ import annotations

import base64
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.placement_wire import MAX_BLOCKS, BadPlacement, decode, encode
from rower.balancer.prefix_memory import Placement

servers = st.from_regex(r"[a-z0-9.-]{1,40}:[0-9]{1,5}(/[A-Za-z0-9._-]{1,20})?", fullmatch=True)
prefixes = st.lists(st.integers(0, 2**64 - 1), min_size=1, max_size=64).map(tuple)


@given(servers, prefixes)
def test_a_placement_comes_back_as_it_was_sent(server: str, prefix: tuple[int, ...]) -> None:
    line = encode(Placement(server, prefix))
    assert line.endswith(b"\n")
    assert line.count(b"\n") == 1
    assert decode(line.rstrip(b"\n")) == Placement(server, prefix)


def test_a_prefix_longer_than_any_context_is_told_by_its_head() -> None:
    prefix = tuple(range(MAX_BLOCKS + 10))
    assert decode(encode(Placement("h:1", prefix))).prefix == prefix[:MAX_BLOCKS]


def line(**fields: object) -> bytes:
    return json.dumps(fields).encode()


EIGHT = base64.b64encode(bytes(8)).decode()


@pytest.mark.parametrize(
    ("sent", "says"),
    [
        (b"not json", "not a JSON object"),
        (b"[1, 2]", "not a JSON object"),
        (line(server="h:1"), "not a JSON object"),
        (line(server="h:1", prefix=EIGHT, extra=1), "not a JSON object"),
        (line(server=1, prefix=EIGHT), "not a JSON object"),
        (line(server="", prefix=EIGHT), "server must be"),
        (line(server="h:1\n", prefix=EIGHT), "server must be"),
        (line(server="h" * 600, prefix=EIGHT), "server must be"),
        (line(server="h:1", prefix="***"), "not base64"),
        (line(server="h:1", prefix=""), "block hashes of 8 bytes"),
        (line(server="h:1", prefix=base64.b64encode(bytes(7)).decode()), "8 bytes"),
        (b" " * 200_000, "longer than"),
    ],
)
def test_a_line_that_is_not_a_placement_is_refused_saying_why(sent: bytes, says: str) -> None:
    with pytest.raises(BadPlacement, match=says):
        decode(sent)


def test_too_many_blocks_are_refused() -> None:
    packed = base64.b64encode(bytes(8 * (MAX_BLOCKS + 1))).decode()
    with pytest.raises(BadPlacement, match="block hashes"):
        decode(line(server="h:1", prefix=packed))
