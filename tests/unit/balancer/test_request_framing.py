"""Request heads the listeners refuse before any handler: the rules, one by one, then anything."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.request_framing import refusal

OK = ("GET", (1, 1), "/v1/models", [("Host", "x")])


def test_a_plain_request_is_served() -> None:
    assert refusal(*OK) is None
    assert refusal("POST", (1, 0), "/completion", [("Content-Length", "2")]) is None
    assert refusal("POST", (1, 1), "/completion", [("Transfer-Encoding", "Chunked")]) is None
    assert refusal("GET", (1, 1), "http://elsewhere/v1/models", []) is None


@pytest.mark.parametrize(
    ("method", "version", "target", "headers", "status", "words"),
    [
        ("GET", (0, 9), "/v1/models", [], 400, "HTTP/0.9"),
        ("GET", (2, 0), "/v1/models", [], 505, "HTTP/2.0"),
        ("GET", (1, 2), "/v1/models", [], 505, "HTTP/1.2"),
        ("CONNECT", (1, 1), "127.0.0.1:22", [], 405, "CONNECT"),
        ("OPTIONS", (1, 1), "*", [], 400, "path"),
        ("GET", (1, 1), "127.0.0.1:22", [], 400, "path"),
        ("GET", (1, 1), "/v1/models#top", [], 400, "path"),
        ("POST", (1, 0), "/x", [("Transfer-Encoding", "chunked")], 400, "RFC 9112"),
        ("POST", (1, 1), "/x", [("Transfer-Encoding", "gzip, chunked")], 501, "gzip, chunked"),
        ("POST", (1, 1), "/x", [("Transfer-Encoding", "chunked, chunked")], 501, "chunked"),
        ("POST", (1, 1), "/x", [("Transfer-Encoding", "identity")], 501, "identity"),
        (
            "POST",
            (1, 1),
            "/x",
            [("Transfer-Encoding", "chunked"), ("Transfer-Encoding", "chunked")],
            501,
            "chunked",
        ),
        (
            "POST",
            (1, 1),
            "/x",
            [("Content-Length", "2"), ("Transfer-Encoding", "chunked")],
            400,
            "together",
        ),
        ("POST", (1, 1), "/x", [("Content-Length", "2"), ("content-length", "2")], 400, "once"),
        ("POST", (1, 1), "/x", [("Transfer_Encoding", "chunked")], 400, "Transfer-Encoding"),
        ("POST", (1, 1), "/x", [("content_length", "5")], 400, "Content-Length"),
    ],
)
def test_refused(
    method: str,
    version: tuple[int, int],
    target: str,
    headers: list[tuple[str, str]],
    status: int,
    words: str,
) -> None:
    refused = refusal(method, version, target, headers)
    assert refused is not None
    assert refused.status == status
    assert words in refused.message


header_names = st.sampled_from(["Host", "Content-Length", "Transfer-Encoding", "X"]) | st.text(
    max_size=8
)


@given(
    st.text(max_size=10),
    st.tuples(st.integers(0, 3), st.integers(0, 12)),
    st.text(max_size=200),
    st.lists(st.tuples(header_names, st.text(max_size=30)), max_size=6),
)
def test_any_head_is_served_or_refused_with_a_4xx_or_5xx_that_says_why(
    method: str, version: tuple[int, int], target: str, headers: list[tuple[str, str]]
) -> None:
    refused = refusal(method, version, target, headers)
    if refused is None:
        assert version in ((1, 0), (1, 1))
        assert target.startswith("/") or target.lower().startswith(("http://", "https://"))
        return
    assert refused.status in (400, 405, 501, 505)
    assert refused.message
    # The target is quoted in a message at most in part: the answer stays short.
    assert len(refused.message) < 400
