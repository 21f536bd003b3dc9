"""The affinity key: what a request's prompt starts with, as a chain of block hashes.

llama-server reuses its KV cache for the longest common token prefix of a new prompt and a
cached one. The balancer has no tokenizer, but it does not need one: the same conversation,
rendered the same way, gives the same bytes, and a conversation's next turn starts with every
byte of its previous turn (the messages so far, then the new ones). So the request's
conversation head is written as one byte string (the model name first, then what the chat
template will put first: tools, system, then each message in order), cut into fixed-size blocks,
and each block hashed together with the hash of the blocks before it. Block k's hash names the
whole prefix up to it: two requests share their first k hashes exactly when they share their
first k blocks, and the previous turn's chain is a prefix of the next turn's.

Only whole blocks count: the tail shorter than a block is left out, so a prompt shorter than
`BLOCK_BYTES` has no key (it costs little to prefill anyway).

Conversations that share a system prompt share its blocks and then part: the key never stops at
the first message (the known trap of keying on it, which sends every conversation with the same
system prompt to one server).

The hash is xxh3-64 seeded with the previous block's hash: measured on this project's 2-core
machine at ~12 µs for 64 blocks of 512 bytes, against ~75 µs for chained crc32 and ~190 µs for
blake2b (bench/results/REPORT.md, "affinity key"). Keys are only compared inside one balancer
and across balancers of the same version: the value must be stable across processes (Python's
own `hash` of bytes is salted per process, so it is not used).
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
import xxhash

BLOCK_BYTES = 512
"""Bytes per block: about 128 tokens of English text. Smaller blocks match prefixes more finely
and cost more to hash and to remember."""

Chain = tuple[int, ...]
"""Block hashes, in order; element k names the conversation's first k+1 blocks."""

_SEPARATOR = b"\x1e"
_FIELD = b"\x1f"
_encode = msgspec.json.Encoder(order="deterministic").encode
_hash = xxhash.xxh3_64_intdigest


def chain(seed: str | None, text: bytes) -> Chain:
    """The block hashes of `text`, the first seeded by `seed` (the model name)."""
    previous = _hash(seed.encode()) if seed else 0
    out: list[int] = []
    view = memoryview(text)
    for start in range(0, len(text) - BLOCK_BYTES + 1, BLOCK_BYTES):
        previous = _hash(view[start : start + BLOCK_BYTES], previous)
        out.append(previous)
    return tuple(out)


@dataclass(frozen=True, slots=True)
class Head:
    """A request's conversation head.

    Attributes:
        text: the bytes its prompt starts with.
        shared: how many of them are the part conversations often share (tools, system
            prompt, instructions): where a new conversation may find another's cache.
    """

    text: bytes
    shared: int = 0


def conversation_head(path: str, body: Mapping[str, Any]) -> Head:
    """The bytes a request's prompt starts with, for a normalized inference `path`.

    Empty for paths whose prompt is not reused (embeddings, rerank) or when the body has
    nothing a prompt is made of.
    """
    parts: list[bytes] = []
    shared = 0
    if path in ("/v1/chat/completions", "/chat/completions"):
        _tools(body, parts)
        messages = body.get("messages")
        if isinstance(messages, list):
            system = 0
            while system < len(messages) and _is_system(messages[system]):
                system += 1
            _messages(messages[:system], parts)
            shared = _length(parts)
            _messages(messages[system:], parts)
    elif path in ("/completion", "/completions", "/v1/completions"):
        _prompt(body.get("prompt"), parts)
    elif path == "/v1/responses":
        _tools(body, parts)
        _text(body.get("instructions"), parts)
        shared = _length(parts)
        value = body.get("input")
        if isinstance(value, str):
            parts.append(value.encode())
        else:
            _messages(value, parts)
    elif path == "/v1/messages":
        _tools(body, parts)
        _content(body.get("system"), parts)
        shared = _length(parts)
        _messages(body.get("messages"), parts)
    elif path == "/infill":
        extra = body.get("input_extra")
        if isinstance(extra, list):
            for chunk in extra:
                parts.append(_encode(chunk))
        shared = _length(parts)
        _text(body.get("input_prefix"), parts)
    return Head(b"".join(parts), shared)


def _length(parts: list[bytes]) -> int:
    return sum(len(part) for part in parts)


def _is_system(message: object) -> bool:
    return isinstance(message, dict) and message.get("role") in ("system", "developer")


def _tools(body: Mapping[str, Any], parts: list[bytes]) -> None:
    tools = body.get("tools")
    if tools:
        parts.append(_encode(tools))
        parts.append(_SEPARATOR)


def _text(value: object, parts: list[bytes]) -> None:
    if isinstance(value, str):
        parts.append(value.encode())
        parts.append(_SEPARATOR)


def _messages(messages: object, parts: list[bytes]) -> None:
    if not isinstance(messages, list):
        return
    for message in messages:
        if not isinstance(message, dict):
            parts.append(_encode(message))
            continue
        role = message.get("role")
        if isinstance(role, str):
            parts.append(role.encode())
        parts.append(_FIELD)
        _content(message.get("content"), parts)
        for key in ("tool_calls", "tool_call_id", "name"):
            if key in message:
                parts.append(_encode(message[key]))
        if message.get("type") not in (None, "message"):
            # A Responses API item that is not a message (a function call, its output).
            parts.append(_encode(message))
        parts.append(_SEPARATOR)


def _content(content: object, parts: list[bytes]) -> None:
    if isinstance(content, str):
        parts.append(content.encode())
    elif isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            # Text parts by their text; images, audio and tool blocks by their JSON (a data URL
            # names the picture; the chat template puts the media where the part stands).
            parts.append(text.encode() if isinstance(text, str) else _encode(part))
    elif content is not None:
        parts.append(_encode(content))


def _prompt(prompt: object, parts: list[bytes]) -> None:
    if isinstance(prompt, str):
        parts.append(prompt.encode())
    elif isinstance(prompt, dict):
        # llama-server's multimodal prompt object.
        _prompt(prompt.get("prompt_string"), parts)
    elif isinstance(prompt, list) and prompt:
        if all(type(token) is int for token in prompt):
            parts.append(_token_bytes(prompt))
        elif all(isinstance(item, str | list | dict) for item in prompt):
            # Several prompts in one request: they run on as many slots; key on the first.
            _prompt(prompt[0], parts)
        else:
            # Token ids mixed with text, llama-server's other prompt form.
            parts.append(_encode(prompt))


def _token_bytes(tokens: Sequence[int]) -> bytes:
    try:
        return array("q", tokens).tobytes()
    except OverflowError:
        return _encode(tokens)
