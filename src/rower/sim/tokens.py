"""The sim's stand-in for a model: a fake tokenizer, a chat template and deterministic gibberish.

Pieces are about four characters long, as with real vocabularies, so token counts (and so
prefill times and prompt-cache hits) behave like a real llama-server's. Generated pieces are
whole pieces of the same tokenizer: a conversation that sends a reply back as history hits the
prompt cache for it, as with a real model.
"""

from __future__ import annotations

import math
import random
import re
import zlib
from collections.abc import Iterator, Sequence

BOS = "<s>"
"""Every prompt starts with it, as llama.cpp adds a BOS token; an empty prompt is one token."""

VOCAB_SIZE = 32000

_PIECE = re.compile(r" ?\S{1,4}|\s")

# Generated pieces: common short words, each one piece of the tokenizer above.
_WORDS = (
    "the of and to in is was for on are with as his they be at one have this from or had by "
    "word but what some we can out were all when up use your how said an each she do time if "
    "will way many then them like so her long make see him two has look more day go come did my "
    "no most who over know than call down side been now find any new work part take get made "
    "live back only me our very must say just much mean old same tell boy man"
)
_GENERATED = tuple(" " + word for word in _WORDS.split())


def tokenize(text: str) -> list[str]:
    """`text` as pieces, BOS first: an optional space and up to four non-space characters, or
    one whitespace character."""
    return [BOS, *_PIECE.findall(text)]


def token_id(piece: str) -> int:
    """A stable id for `piece`, for the `tokens` arrays of llama.cpp's answers."""
    return 1 if piece == BOS else 2 + zlib.crc32(piece.encode()) % (VOCAB_SIZE - 2)


def from_token_ids(ids: Sequence[int]) -> list[str]:
    """A prompt given as token ids (llama.cpp accepts them): one piece per id, BOS first."""
    return [BOS, *(f"<{i}>" for i in ids)]


def render_chat(messages: Sequence[tuple[str, str]]) -> str:
    """`(role, content)` messages in a ChatML-like template, ending with the assistant's turn."""
    turns = "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n" for role, content in messages)
    return turns + "<|im_start|>assistant\n"


def generation(prompt: Sequence[str], seed: int | None = None) -> Iterator[str]:
    """Endless gibberish pieces, the same for the same prompt and seed."""
    key = zlib.crc32("".join(prompt).encode()) if seed is None else seed
    chooser = random.Random(key)
    while True:
        yield chooser.choice(_GENERATED)


def embedding(pieces: Sequence[str], size: int) -> list[float]:
    """A deterministic unit vector of `size` floats for `pieces`."""
    chooser = random.Random(zlib.crc32("\x00".join(pieces).encode()))
    vector = [chooser.gauss(0.0, 1.0) for _ in range(size)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]
