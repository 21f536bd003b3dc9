"""Client request heads and chunked request bodies as the public listener reads them."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.request_head import (
    MAX_HEADERS,
    ChunkedBody,
    HeadRefused,
    RequestHead,
    head_end,
    parse_head,
)

LIMIT = 8190

CHAT = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    b"Host: balancer:8080\r\n"
    b"Content-Type: application/json\r\n"
    b"Content-Length: 42\r\n"
    b"X-Request-Id: abc\r\n"
    b"\r\n"
)


def parsed(data: bytes) -> RequestHead:
    end = head_end(data, LIMIT)
    assert end == len(data)
    return parse_head(data, LIMIT)


def refused(data: bytes) -> HeadRefused:
    try:
        end = head_end(data, LIMIT)
        parse_head(data[:end] if end >= 0 else data + b"\r\n\r\n", LIMIT)
    except HeadRefused as refusal:
        return refusal
    raise AssertionError(f"not refused: {data[:80]!r}")


def test_a_chat_request_head() -> None:
    head = parsed(CHAT)
    assert (head.method, head.target, head.version) == ("POST", "/v1/chat/completions", (1, 1))
    assert head.length == 42
    assert not head.chunked
    assert head.keep_alive
    assert head.has_body
    assert list(head.headers.items())[-1] == ("X-Request-Id", "abc")


def test_an_incomplete_head_is_waited_for() -> None:
    assert head_end(CHAT[:-2], LIMIT) == -1
    assert head_end(b"POS", LIMIT) == -1


@pytest.mark.parametrize(
    ("data", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\n\r\n", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n", True),
        (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, keep-alive\r\n\r\n", True),
    ],
)
def test_keep_alive_follows_the_version_and_connection(data: bytes, keep_alive: bool) -> None:
    assert parsed(data).keep_alive is keep_alive


def test_chunked_and_expect_continue() -> None:
    head = parsed(
        b"POST /completion HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked\r\n"
        b"Expect: 100-continue\r\n\r\n"
    )
    assert head.chunked
    assert head.expects_continue
    assert head.length is None


def test_bytes_that_are_not_utf8_pass_through_unchanged() -> None:
    head = parsed(b"GET /caf%C3%A9 HTTP/1.1\r\nHost: x\r\nX-Raw: \xff\xfe\r\n\r\n")
    assert head.target == "/caf%C3%A9"
    assert head.headers["X-Raw"].encode("utf-8", "surrogateescape") == b"\xff\xfe"


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-A: a\r\n  folded\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost : x\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX: a\0b\r\n\r\n", 400),
        (b"GET /v1/\0models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", 400),
        (b"GET /v1/models HTTP/1.2\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/models http/1.1\r\nHost: x\r\n\r\n", 400),
        (b"GET /v1/models HTTP/3.0\r\nHost: x\r\n\r\n", 400),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
        (b"FOO /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"get /v1/models HTTP/1.1\r\nHost: x\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 2, 2\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 400),
        (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
         b"Transfer-Encoding: chunked\r\n\r\n", 400),
        (b"GET /" + b"x" * LIMIT + b" HTTP/1.1\r\nHost: x\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"y" * LIMIT + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: x\r\n"
         + b"".join(b"X-%d: y\r\n" % i for i in range(MAX_HEADERS)) + b"\r\n", 431),
    ],
)  # fmt: skip
def test_what_llhttp_refuses_is_refused(data: bytes, status: int) -> None:
    assert refused(data).status == status


@pytest.mark.parametrize(
    "start",
    [
        bytes.fromhex("16030100a5010000a10303") + bytes(40),  # TLS on the plain port
        b"GET /v1/models HTTP/1.1\nHost",  # a bare LF
        b"GET /" + b"x" * (LIMIT + 10),  # a request line that will not end
    ],
)
def test_a_bad_start_is_refused_before_the_head_ends(start: bytes) -> None:
    with pytest.raises(HeadRefused):
        head_end(start, LIMIT)


def test_http_0_9_and_2_0_parse_for_request_framing_to_refuse() -> None:
    assert parsed(b"GET /v1/models\r\n\r\n").version == (0, 9)
    assert parsed(b"GET / HTTP/2.0\r\nHost: x\r\n\r\n").version == (2, 0)


def chunked(pieces: list[bytes], end: bytes = b"0\r\n\r\n") -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + end


def decode(data: bytes, splits: list[int]) -> tuple[bytes, bytes, bool]:
    body = ChunkedBody()
    out: list[bytes] = []
    rest = b""
    at = 0
    for cut in [*sorted(splits), len(data)]:
        pieces, rest = body.feed(data[at:cut])
        out.extend(pieces)
        at = cut
        if body.ended:
            rest += data[cut:]
            break
    return b"".join(out), rest, body.ended


pieces = st.lists(st.binary(min_size=1, max_size=40), max_size=5)
ends = st.sampled_from([b"0\r\n\r\n", b"000\r\n\r\n", b"0;x=y\r\nX-Trailer: 1\r\n\r\n"])


@given(pieces=pieces, end=ends, cuts=st.lists(st.integers(0, 400), max_size=6))
def test_any_split_of_a_chunked_body_decodes_the_same(
    pieces: list[bytes], end: bytes, cuts: list[int]
) -> None:
    after = b"GET /next HTTP/1.1\r\n\r\n"
    data = chunked(pieces, end) + after
    splits = [cut for cut in cuts if cut <= len(data)]
    body, rest, ended = decode(data, splits)
    assert ended
    assert body == b"".join(pieces)
    assert rest == after


@given(head=st.sampled_from([CHAT, b"GET /v1/models HTTP/1.0\r\n\r\n"]), cut=st.integers(0, 200))
def test_any_split_of_a_head_finds_the_same_end(head: bytes, cut: int) -> None:
    cut = min(cut, len(head) - 1)
    assert head_end(head[:cut], LIMIT) == -1
    assert head_end(head + b"{}", LIMIT) == len(head)


@pytest.mark.parametrize(
    "data",
    [
        b"zz\r\n{}\r\n0\r\n\r\n",
        b"1\r\n{}\r\n0\r\n\r\n",
        b"f" * 20 + b"\r\n{}\r\n",
        b"5 \r\nhello\r\n0\r\n\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"0x5\r\nhello\r\n0\r\n\r\n",
        b"-1\r\nx\r\n0\r\n\r\n",
        b"2\r\n{}\r\n0\n\n",
    ],
)
def test_malformed_chunks_are_refused(data: bytes) -> None:
    with pytest.raises(HeadRefused) as caught:
        ChunkedBody().feed(data)
    assert caught.value.status == 400


def test_size_counts_the_chunks_announced() -> None:
    body = ChunkedBody()
    body.feed(b"10\r\nabc")
    assert body.size == 16
    assert not body.ended


def test_a_target_is_visible_ascii_only() -> None:
    assert refused(b"GET /\x80 HTTP/1.1\r\nHost: x\r\n\r\n").status == 400
    assert parsed(b"GET /%C3%A9?q=%20 HTTP/1.1\r\nHost: x\r\n\r\n").target == "/%C3%A9?q=%20"
