"""Request bodies: what the sim accepts, and the 400s for what it does not."""

from __future__ import annotations

import pytest

from rower.sim import bodies, tokens
from rower.sim.bodies import BadRequest


def test_completion_defaults() -> None:
    generation = bodies.completion({"prompt": "hello"}, default_n_predict=16)
    assert generation.prompt == tuple(tokens.tokenize("hello"))
    assert generation.prompt_text == "hello"
    assert generation.n_predict == 16
    assert not generation.stream
    assert generation.id_slot is None


@pytest.mark.parametrize("key", ["n_predict", "max_tokens", "max_completion_tokens"])
def test_token_limit_keys(key: str) -> None:
    generation = bodies.completion({"prompt": "x", key: 7}, default_n_predict=16)
    assert generation.n_predict == 7
    assert generation.params["n_predict"] == 7


def test_negative_id_slot_means_any_slot() -> None:
    assert bodies.completion({"prompt": "x", "id_slot": -1}, default_n_predict=1).id_slot is None
    assert bodies.completion({"prompt": "x", "id_slot": 2}, default_n_predict=1).id_slot == 2


def test_prompt_as_token_ids_and_single_element_list() -> None:
    ids = bodies.completion({"prompt": [5, 6, 7]}, default_n_predict=1)
    assert len(ids.prompt) == 4
    one = bodies.completion({"prompt": ["hello"]}, default_n_predict=1)
    assert one.prompt == tuple(tokens.tokenize("hello"))


def test_chat_renders_messages_and_content_parts() -> None:
    generation = bodies.chat(
        {
            "messages": [
                {"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]},
            ],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        default_n_predict=4,
    )
    assert generation.prompt_text == tokens.render_chat([("system", "be brief"), ("user", "hi")])
    assert generation.stream
    assert generation.include_usage


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"prompt": 3},
        {"prompt": ["a", "b"]},
        {"prompt": "x", "n_predict": "many"},
        {"prompt": "x", "n_predict": True},
        {"prompt": "x", "n_predict": -2},
        {"prompt": "x", "stream": "yes"},
        {"prompt": "x", "stop": [1]},
        {"prompt": "x", "id_slot": 1.5},
        {"prompt": "x", "temperature": "hot"},
        {"prompt": "x", "stream_options": 1},
    ],
)
def test_bad_completion_bodies(data: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        bodies.completion(data, default_n_predict=1)


@pytest.mark.parametrize(
    "data",
    [
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": [{"content": "no role"}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": ["hi"]},
    ],
)
def test_bad_chat_bodies(data: dict[str, object]) -> None:
    with pytest.raises(BadRequest):
        bodies.chat(data, default_n_predict=1)


@pytest.mark.parametrize("body", [b"", b"{", b"[1, 2]", b'"text"', b"\xff"])
def test_bad_json(body: bytes) -> None:
    with pytest.raises(BadRequest):
        bodies.parse_json(body)


def test_embedding_inputs() -> None:
    assert len(bodies.embedding_inputs({"input": "one"})) == 1
    assert len(bodies.embedding_inputs({"input": ["one", "two"]})) == 2
    assert len(bodies.embedding_inputs({"content": [1, 2, 3]})) == 1
    with pytest.raises(BadRequest):
        bodies.embedding_inputs({})
    with pytest.raises(BadRequest):
        bodies.embedding_inputs({"input": "x", "encoding_format": "int8"})
