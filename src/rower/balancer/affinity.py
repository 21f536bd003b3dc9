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
machine at 11 µs for 64 blocks of 512 bytes, against 24 µs for chained crc32 and 64 µs for
blake2b; the whole `read_needs` of a 32,000-character chat takes 49 µs (bench/results/REPORT.md,
"Affinity key and prefix memory"). Keys are only compared inside one balancer
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

_SEPARATOR = "\x1e"
_FIELD = "\x1f"
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
    # Text pieces, encoded once at the end: one encode of the whole costs less than one per
    # message. `shared` is how many pieces make the shared part.
    parts: list[str] = []
    shared = 0
    if path in ("/v1/chat/completions", "/chat/completions"):
        _tools(body, parts)
        messages = body.get("messages")
        if isinstance(messages, list):
            system = 0
            while system < len(messages) and _is_system(messages[system]):
                system += 1
            _messages(messages[:system], parts)
            shared = len(parts)
            _messages(messages[system:], parts)
    elif path in ("/completion", "/completions", "/v1/completions"):
        _prompt(body.get("prompt"), parts)
    elif path == "/v1/responses":
        _tools(body, parts)
        _text(body.get("instructions"), parts)
        shared = len(parts)
        value = body.get("input")
        if isinstance(value, str):
            parts.append(value)
        else:
            _messages(value, parts)
    elif path == "/v1/messages":
        _tools(body, parts)
        _content(body.get("system"), parts)
        shared = len(parts)
        _messages(body.get("messages"), parts)
    elif path == "/infill":
        extra = body.get("input_extra")
        if isinstance(extra, list):
            parts.extend(_json(chunk) for chunk in extra)
        shared = len(parts)
        _text(body.get("input_prefix"), parts)
    head = "".join(parts[:shared]).encode("utf-8", "surrogatepass")
    rest = "".join(parts[shared:]).encode("utf-8", "surrogatepass")
    return Head(head + rest, len(head))


def _json(value: object) -> str:
    return _encode(value).decode()


def _is_system(message: object) -> bool:
    return isinstance(message, dict) and message.get("role") in ("system", "developer")


def _tools(body: Mapping[str, Any], parts: list[str]) -> None:
    tools = body.get("tools")
    if tools:
        parts.append(_json(tools))
        parts.append(_SEPARATOR)


def _text(value: object, parts: list[str]) -> None:
    if isinstance(value, str):
        parts.append(value)
        parts.append(_SEPARATOR)


def _messages(messages: object, parts: list[str]) -> None:
    if not isinstance(messages, list):
        return
    append = parts.append
    for message in messages:
        if type(message) is not dict:
            append(_json(message))
            continue
        role = message.get("role")
        append(role if type(role) is str else "")
        append(_FIELD)
        content = message.get("content")
        if type(content) is str:
            append(content)
        else:
            _content(content, parts)
        if len(message) > 2:
            for key in ("tool_calls", "tool_call_id", "name"):
                if key in message:
                    append(_json(message[key]))
            if message.get("type") not in (None, "message"):
                # A Responses API item that is not a message (a function call, its output).
                append(_json(message))
        append(_SEPARATOR)


def _content(content: object, parts: list[str]) -> None:
    if isinstance(content, str):
        parts.append(content)
    elif isinstance(content, list):
        for part in content:
            text = part.get("text") if isinstance(part, dict) else None
            # Text parts by their text; images, audio and tool blocks by their JSON (a data URL
            # names the picture; the chat template puts the media where the part stands).
            parts.append(text if isinstance(text, str) else _json(part))
    elif content is not None:
        parts.append(_json(content))


def _prompt(prompt: object, parts: list[str]) -> None:
    if isinstance(prompt, str):
        parts.append(prompt)
    elif isinstance(prompt, dict):
        # llama-server's multimodal prompt object.
        _prompt(prompt.get("prompt_string"), parts)
    elif isinstance(prompt, list) and prompt:
        if all(type(token) is int for token in prompt):
            parts.append(_token_text(prompt))
        elif all(isinstance(item, str | list | dict) for item in prompt):
            # Several prompts in one request: they run on as many slots; key on the first.
            _prompt(prompt[0], parts)
        else:
            # Token ids mixed with text, llama-server's other prompt form.
            parts.append(_json(prompt))


def _token_text(tokens: Sequence[int]) -> str:
    # Eight bytes a token, as text (latin-1 maps each byte to one character).
    try:
        return array("q", tokens).tobytes().decode("latin-1")
    except OverflowError:
        return _json(tokens)
