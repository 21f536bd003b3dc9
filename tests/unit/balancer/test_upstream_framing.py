"""Answer heads and chunked bodies as the stream relay reads them from llama-server."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.upstream_framing import (
    MAX_HEAD,
    BadAnswer,
    ChunkedBody,
    Framing,
    head_end,
    parse_head,
)

LLAMA_SERVER_HEAD = (
    b"HTTP/1.1 200 OK\r\n"
    b"Keep-Alive: timeout=5, max=100\r\n"
    b"Content-Type: text/event-stream\r\n"
    b"Server: llama.cpp\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"\r\n"
)


def chunked(pieces: list[bytes]) -> bytes:
    return b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in pieces if p)


def test_llama_servers_stream_head() -> None:
    assert head_end(LLAMA_SERVER_HEAD + b"5\r\n") == len(LLAMA_SERVER_HEAD)
    head = parse_head(LLAMA_SERVER_HEAD)
    assert (head.status, head.reason, head.framing) == (200, "OK", Framing.CHUNKED)
    assert ("Content-Type", "text/event-stream") in head.headers


_NAMES = st.text(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~",
    min_size=1,
    max_size=12,
).filter(lambda name: name.lower() not in ("content-length", "transfer-encoding", "connection"))
_VALUES = st.binary(max_size=20).map(
    lambda raw: bytes(b for b in raw if b == 0x09 or 0x20 <= b != 0x7F).decode("latin-1")
)
_BLANKS = st.sampled_from(["", " ", "\t", " \t "])


@given(st.lists(st.tuples(_NAMES, _BLANKS, _VALUES, _BLANKS), max_size=8), st.integers(0, 99))
def test_every_field_is_read_in_order_with_its_blanks_trimmed(
    fields: list[tuple[str, str, str, str]], length: int
) -> None:
    lines = [f"{name}:{before}{value}{after}" for name, before, value, after in fields]
    lines.insert(len(lines) // 2, f"content-LENGTH: {length} ")
    head = parse_head(
        ("HTTP/1.1 200 OK\r\n" + "".join(f"{line}\r\n" for line in lines) + "\r\n").encode(
            "latin-1"
        )
    )
    expected = [(name, value.strip(" \t")) for name, _, value, _ in fields]
    expected.insert(len(fields) // 2, ("content-LENGTH", str(length)))
    assert head.headers == expected
    assert (head.framing, head.length, head.closes) == (Framing.LENGTH, length, False)


def test_framings() -> None:
    def framing(*lines: bytes) -> tuple[Framing, int]:
        head = parse_head(b"\r\n".join(lines) + b"\r\n\r\n")
        return head.framing, head.length

    assert framing(b"HTTP/1.1 200 OK", b"Content-Length: 12") == (Framing.LENGTH, 12)
    assert framing(b"HTTP/1.1 200 OK") == (Framing.CLOSE, 0)
    assert framing(b"HTTP/1.1 204 No Content") == (Framing.EMPTY, 0)
    assert framing(b"HTTP/1.1 100 Continue") == (Framing.EMPTY, 0)
    assert framing(b"HTTP/1.0 500") == (Framing.CLOSE, 0)


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/2 200 OK\r\n\r\n",
        b"HTTP/1.1 20 OK\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\r\n folded\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\nInjected: b\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Name: a\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
    ],
)
def test_heads_a_proxy_must_not_pass_on(head: bytes) -> None:
    with pytest.raises(BadAnswer):
        parse_head(head)


def test_a_head_that_never_ends() -> None:
    assert head_end(b"HTTP/1.1 200 OK\r\n") == -1
    with pytest.raises(BadAnswer):
        head_end(b"HTTP/1.1 200 OK\r\nX: " + b"a" * MAX_HEAD)


@given(
    pieces=st.lists(st.binary(min_size=1, max_size=300), max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=3000), max_size=12),
    after=st.binary(max_size=20),
)
def test_chunks_forwarded_as_they_came_however_they_are_read(
    pieces: list[bytes], cuts: list[int], after: bytes
) -> None:
    body = chunked(pieces)
    wire = body + b"0\r\n\r\n" + after
    points = sorted({min(c, len(wire)) for c in cuts} | {0, len(wire)})
    follower = ChunkedBody()
    forwarded = b""
    for start, end in itertools.pairwise(points):
        forwarded += follower.feed(wire[start:end])
        if follower.ended:
            break
    assert follower.ended
    assert forwarded == body  # everything but the final chunk, byte for byte
    assert follower.payload_bytes == sum(len(p) for p in pieces)


def test_a_read_ending_inside_a_chunk_forwards_what_is_known_good() -> None:
    follower = ChunkedBody()
    assert follower.feed(b"a\r\n01234") == b"a\r\n01234"
    assert follower.feed(b"56789\r") == b"56789"  # the CR waits for its LF
    assert follower.feed(b"\n3") == b"\r\n"  # the size line waits for its end
    assert follower.feed(b";ext=1\r\nabc\r\n") == b"3;ext=1\r\nabc\r\n"
    assert not follower.ended
    assert follower.feed(b"0\r\n\r\n") == b""
    assert follower.ended


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\n",
        b"-1\r\n",
        b"0x5\r\n",
        b"3\r\nabcXY",
        b"1" * 2000,
        b"10000000000000000\r\n",
    ],
)
def test_malformed_chunks(wire: bytes) -> None:
    with pytest.raises(BadAnswer):
        ChunkedBody().feed(wire)
