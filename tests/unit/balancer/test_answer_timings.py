"""Prompt-cache reuse read from llama-server's answers."""

from __future__ import annotations

import json

from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.answer_timings import AnswerTimings, from_body, from_stream_tail

TIMINGS = {"cache_n": 2990, "prompt_n": 12, "prompt_ms": 3.1, "predicted_n": 5}


def test_a_non_streamed_answer() -> None:
    body = json.dumps({"content": "x", "timings": TIMINGS}).encode()
    assert from_body(body) == AnswerTimings(12, 2990, 0.0031, 5, 0.0)
    assert from_body(body).total == 3002  # type: ignore[union-attr]
    assert from_body(b'{"content": "no timings"}') is None
    assert from_body(b'{"timings": "broken"') is None


def test_the_last_event_of_a_stream() -> None:
    events = [
        {"choices": [{"delta": {"content": "a"}}]},
        {"choices": [{"delta": {}}], "timings": TIMINGS},
    ]
    stream = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events)
    assert from_stream_tail(stream + b"data: [DONE]\n\n") == AnswerTimings(12, 2990, 0.0031, 5, 0.0)
    # /completion streams end with the event itself.
    assert from_stream_tail(stream) == AnswerTimings(12, 2990, 0.0031, 5, 0.0)
    assert from_stream_tail(b"data: {}\n\n") is None
    assert from_stream_tail(b'"timings": {}') is None


@given(st.binary(max_size=500))
def test_any_bytes_give_tokens_or_none(data: bytes) -> None:
    from_body(data)
    from_stream_tail(data)
