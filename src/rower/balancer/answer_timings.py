"""How much of a prompt llama-server found in its cache, read from its own answer.

llama-server's completion and chat answers carry `timings` with `prompt_n` (prompt tokens it
evaluated) and `cache_n` (prompt tokens it reused from its KV cache): in the body of a
non-streamed answer, and in the last event of a streamed one. The proxy hands this module the
body, or the tail of the stream, and counts what it finds; it is the operator's view of the
prompt-cache reuse that cache-aware routing is for. Pure: bytes in, numbers out.
"""

from __future__ import annotations

import msgspec

STREAM_TAIL_READS = 4
"""Reads of a streamed answer kept to find its last `timings`: the final event holds them, and
it comes in one read or a few (then `data: [DONE]`). Keeping reads, not bytes, costs nothing per
token."""

_MARKER = b'"timings"'


class _Timings(msgspec.Struct):
    prompt_n: int = 0
    cache_n: int = 0
    prompt_ms: float = 0.0
    predicted_n: int = 0
    predicted_ms: float = 0.0


class _Answer(msgspec.Struct):
    timings: _Timings | None = None


_decode = msgspec.json.Decoder(_Answer).decode


class AnswerTimings(msgspec.Struct, frozen=True):
    """What one answer's `timings` say.

    Attributes:
        evaluated: prompt tokens computed (`prompt_n`).
        cached: prompt tokens reused from the cache (`cache_n`).
        prompt_seconds: time spent computing them.
        generated: tokens generated (`predicted_n`).
        generation_seconds: time spent generating them.
    """

    evaluated: int
    cached: int
    prompt_seconds: float = 0.0
    generated: int = 0
    generation_seconds: float = 0.0

    @property
    def total(self) -> int:
        """All prompt tokens of the request."""
        return self.evaluated + self.cached


def from_body(body: bytes) -> AnswerTimings | None:
    """The prompt tokens a non-streamed JSON answer reports, if it has `timings`."""
    if _MARKER not in body:
        return None
    try:
        timings = _decode(body).timings
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return _tokens(timings)


def from_stream_tail(tail: bytes) -> AnswerTimings | None:
    """The prompt tokens in the last event with `timings` of a server-sent event stream."""
    at = tail.rfind(_MARKER)
    if at < 0:
        return None
    start = tail.rfind(b"data:", 0, at)
    if start < 0:
        return None
    end = tail.find(b"\n", at)
    event = tail[start + 5 : end if end >= 0 else len(tail)]
    try:
        timings = _decode(event).timings
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return _tokens(timings)


def _tokens(timings: _Timings | None) -> AnswerTimings | None:
    if timings is None or min(timings.prompt_n, timings.cache_n, timings.predicted_n) < 0:
        return None
    return AnswerTimings(
        timings.prompt_n,
        timings.cache_n,
        max(0.0, timings.prompt_ms / 1000),
        timings.predicted_n,
        max(0.0, timings.predicted_ms / 1000),
    )
