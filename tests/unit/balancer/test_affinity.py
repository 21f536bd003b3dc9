"""The affinity key: a conversation's next turn extends its own chain, for every API shape."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.affinity import BLOCK_BYTES, chain, conversation_head
from rower.balancer.request_needs import BadRequest, read_needs

words = st.text(alphabet="abcdefghij klmnopqrstuvwxyz", min_size=0, max_size=1500)
roles = st.sampled_from(["user", "assistant"])


def needs(path: str, body: dict[str, Any]) -> tuple[int, ...]:
    return read_needs(path, json.dumps(body).encode()).prefix


def is_prefix(short: tuple[int, ...], long: tuple[int, ...]) -> bool:
    return long[: len(short)] == short


@given(system=words, turns=st.lists(st.tuples(roles, words), min_size=1, max_size=8), more=words)
def test_a_chat_continuation_extends_the_chain(
    system: str, turns: list[tuple[str, str]], more: str
) -> None:
    messages = [{"role": "system", "content": system}] + [
        {"role": role, "content": text} for role, text in turns
    ]
    before = needs("/v1/chat/completions", {"model": "m", "messages": messages})
    after = needs(
        "/v1/chat/completions",
        {"model": "m", "messages": [*messages, {"role": "user", "content": more}]},
    )
    assert is_prefix(before, after)


@given(prompt=words, more=words)
def test_a_completion_continuation_extends_the_chain(prompt: str, more: str) -> None:
    assert is_prefix(
        needs("/completion", {"prompt": prompt}), needs("/completion", {"prompt": prompt + more})
    )


@given(tokens=st.lists(st.integers(0, 2**31 - 1), max_size=600), more=st.lists(st.integers(0, 100)))
def test_token_id_prompts_extend_the_chain(tokens: list[int], more: list[int]) -> None:
    assert is_prefix(
        needs("/v1/completions", {"prompt": tokens}),
        needs("/v1/completions", {"prompt": tokens + more}),
    )


@pytest.mark.parametrize(
    ("path", "first", "second"),
    [
        (
            "/v1/responses",
            {"instructions": "be brief " * 100, "input": [{"role": "user", "content": "a" * 900}]},
            {
                "instructions": "be brief " * 100,
                "input": [
                    {"role": "user", "content": "a" * 900},
                    {"type": "function_call", "name": "f", "arguments": "{}"},
                    {"role": "user", "content": [{"type": "input_text", "text": "more"}]},
                ],
            },
        ),
        (
            "/v1/messages",
            {
                "system": [{"type": "text", "text": "s" * 700}],
                "messages": [{"role": "user", "content": "q" * 600}],
            },
            {
                "system": [{"type": "text", "text": "s" * 700}],
                "messages": [
                    {"role": "user", "content": "q" * 600},
                    {"role": "assistant", "content": [{"type": "text", "text": "answer"}]},
                    {"role": "user", "content": "next"},
                ],
            },
        ),
        (
            "/infill",
            {
                "input_extra": [{"filename": "a.py", "text": "x = 1\n" * 200}],
                "input_prefix": "def f():",
            },
            {
                "input_extra": [{"filename": "a.py", "text": "x = 1\n" * 200}],
                "input_prefix": "def f():\n    return 1",
            },
        ),
        (
            "/v1/chat/completions",
            {
                "tools": [{"type": "function", "function": {"name": "get", "parameters": {}}}],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "t" * 800},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            },
                        ],
                    },
                ],
            },
            {
                "tools": [{"type": "function", "function": {"name": "get", "parameters": {}}}],
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "t" * 800},
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/png;base64,AAAA"},
                            },
                        ],
                    },
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [{"id": "1", "function": {"name": "get"}}],
                    },
                    {"role": "tool", "tool_call_id": "1", "content": "result " * 100},
                ],
            },
        ),
    ],
)
def test_every_api_shape_has_a_key_that_its_continuation_extends(
    path: str, first: dict[str, Any], second: dict[str, Any]
) -> None:
    before, after = needs(path, first), needs(path, second)
    assert before, f"{path}: no key for a prompt over {BLOCK_BYTES} bytes"
    assert is_prefix(before, after)
    assert len(after) >= len(before)


def test_conversations_sharing_a_system_prompt_part_after_it() -> None:
    system = {"role": "system", "content": "You are a helpful assistant. " * 100}
    one = needs(
        "/v1/chat/completions", {"messages": [system, {"role": "user", "content": "a " * 600}]}
    )
    two = needs(
        "/v1/chat/completions", {"messages": [system, {"role": "user", "content": "b " * 600}]}
    )
    shared = read_needs(
        "/v1/chat/completions",
        json.dumps({"messages": [system, {"role": "user", "content": "a " * 600}]}).encode(),
    ).shared_blocks
    assert shared >= 5
    assert one[:shared] == two[:shared]
    assert one[-1] != two[-1]


def test_the_model_seeds_the_chain() -> None:
    body = {"prompt": "x" * 2000}
    assert needs("/completion", {**body, "model": "a"}) != needs(
        "/completion", {**body, "model": "b"}
    )


def test_the_key_is_the_same_in_every_process() -> None:
    # Two balancers (and a restarted one) must agree on every key: no per-process salt.
    code = "from rower.balancer.affinity import chain; print(chain('m', b'a' * 2048))"
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in ("1", "2")
    }
    assert seen == {f"{chain('m', b'a' * 2048)}\n"}


def test_short_prompts_and_embeddings_have_no_key() -> None:
    assert needs("/completion", {"prompt": "hello"}) == ()
    assert needs("/v1/embeddings", {"input": "x" * 5000}) == ()
    assert conversation_head("/v1/rerank", {"query": "q" * 5000}).text == b""


def test_what_the_request_needs() -> None:
    body = json.dumps({"model": "tiny", "stream": True, "messages": []}).encode()
    read = read_needs("//v1/chat/completions/", body)
    assert (read.path, read.takes_slot, read.streaming, read.model) == (
        "/v1/chat/completions",
        True,
        True,
        "tiny",
    )
    assert not read_needs("/v1/models", b"").takes_slot
    assert read_needs("/completion", b"").takes_slot


@pytest.mark.parametrize(
    "body", [b"{", b"[1, 2]", b'"text"', b"\xff\xfe", b'{"prompt": "\\ud800"}x']
)
def test_a_body_that_is_not_a_json_object_is_a_bad_request(body: bytes) -> None:
    with pytest.raises(BadRequest, match="JSON"):
        read_needs("/v1/chat/completions", body)


@given(st.binary(max_size=3000))
def test_any_bytes_give_needs_or_a_bad_request(body: bytes) -> None:
    try:
        read_needs("/completion", body)
    except BadRequest as error:
        message = error.message
    else:
        return
    assert "send a JSON object" in message


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(),
        lambda inner: st.lists(inner) | st.dictionaries(st.text(), inner),
        max_leaves=30,
    )
)
def test_any_json_object_gives_needs(value: object) -> None:
    for path in ("/v1/chat/completions", "/completion", "/v1/responses", "/v1/messages", "/infill"):
        for key in ("messages", "prompt", "input", "system", "input_extra", "tools"):
            read_needs(path, json.dumps({key: value}).encode())
