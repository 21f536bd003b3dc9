"""The fake tokenizer and generator: about four characters a token, stable, self-consistent."""

from __future__ import annotations

import itertools
import math

from hypothesis import given
from hypothesis import strategies as st

from rower.sim import tokens


@given(st.text())
def test_tokens_join_back_to_the_text(text: str) -> None:
    pieces = tokens.tokenize(text)
    assert pieces[0] == tokens.BOS
    assert "".join(pieces[1:]) == text


def test_about_four_characters_per_token() -> None:
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert 3 <= len(text) / (len(tokens.tokenize(text)) - 1) <= 5


def test_generation_is_deterministic_and_retokenizes_to_itself() -> None:
    prompt = tokens.tokenize("hello")
    first = list(itertools.islice(tokens.generation(prompt), 50))
    assert first == list(itertools.islice(tokens.generation(prompt), 50))
    assert tokens.tokenize("".join(first))[1:] == first
    other = list(itertools.islice(tokens.generation(prompt, seed=7), 50))
    assert other != first


def test_embedding_is_a_stable_unit_vector() -> None:
    vector = tokens.embedding(["a", "b"], 32)
    assert len(vector) == 32
    assert math.isclose(sum(x * x for x in vector), 1.0)
    assert vector == tokens.embedding(["a", "b"], 32)
    assert vector != tokens.embedding(["a", "c"], 32)
