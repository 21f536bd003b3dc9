"""Request bodies of the inference endpoints, parsed and checked.

Anything malformed raises `BadRequest`, which the server answers with llama.cpp's 400 error
JSON; nothing here can leave the sim in a bad state. Fields the sim has no use for (sampling
settings, tools, grammars) are accepted and ignored, as a client written for llama-server
sends them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec

from rower.sim import tokens


class BadRequest(Exception):
    """A request the sim answers with 400 and llama.cpp's `invalid_request_error`."""


@dataclass(frozen=True, slots=True)
class Generation:
    """What an inference request asks for, in the sim's terms.

    Attributes:
        prompt: prompt tokens.
        prompt_text: the prompt as text (llama.cpp echoes it as `prompt`).
        n_predict: tokens to generate; -1 = until the slot's context is full.
        stream: answer with server-sent events.
        id_slot: the slot it is pinned to, or None for any.
        stop: stop strings.
        seed: seed of the generated text; None = derived from the prompt.
        include_usage: `stream_options.include_usage` of OpenAI chat streams.
        params: generation settings as llama-server echoes them in `/slots`.
    """

    prompt: tuple[str, ...]
    prompt_text: str
    n_predict: int
    stream: bool = False
    id_slot: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    include_usage: bool = False
    params: Mapping[str, object] = field(default_factory=dict)


def parse_json(body: bytes) -> dict[str, object]:
    """The body as a JSON object."""
    try:
        data = msgspec.json.decode(body)
    except msgspec.DecodeError as error:
        raise BadRequest(f"Invalid JSON in request body: {error}") from None
    if not isinstance(data, dict):
        raise BadRequest("The request body must be a JSON object")
    return data


def completion(data: Mapping[str, object], *, default_n_predict: int) -> Generation:
    """`/completion`, `/completions` and `/v1/completions`."""
    if "prompt" not in data:
        raise BadRequest('"prompt" must be provided')
    prompt, text = _prompt(data["prompt"])
    return _generation(data, prompt, text, default_n_predict)


def chat(data: Mapping[str, object], *, default_n_predict: int) -> Generation:
    """`/chat/completions` and `/v1/chat/completions`."""
    messages = data.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' is required and must be a non-empty array")
    turns = [_message(message) for message in messages]
    text = tokens.render_chat(turns)
    return _generation(data, tuple(tokens.tokenize(text)), text, default_n_predict)


def embedding_inputs(data: Mapping[str, object]) -> list[tuple[str, ...]]:
    """`/embedding(s)` and `/v1/embeddings`: one token list per input."""
    if "input" in data:
        raw = data["input"]
    elif "content" in data:
        raw = data["content"]
    else:
        raise BadRequest('"input" or "content" must be provided')
    fmt = data.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise BadRequest("The format to return the embeddings in. Can be either float or base64")
    if isinstance(raw, list) and raw and not _is_token_ids(raw):
        inputs = [_prompt(item)[0] for item in raw]
    else:
        inputs = [_prompt(raw)[0]]
    if not inputs:
        raise BadRequest('"input" must not be empty')
    return inputs


def _generation(
    data: Mapping[str, object],
    prompt: tuple[str, ...],
    text: str,
    default_n_predict: int,
) -> Generation:
    n_predict = default_n_predict
    for key in ("max_completion_tokens", "max_tokens", "n_predict"):
        if data.get(key) is not None:
            n_predict = _integer(data, key)
    if n_predict < -1:
        raise BadRequest('"n_predict" must be -1 (no limit) or a number of tokens >= 0')
    id_slot = _integer(data, "id_slot") if data.get("id_slot") is not None else -1
    seed = _integer(data, "seed") if data.get("seed") is not None else -1
    stream = _boolean(data, "stream")
    options = data.get("stream_options")
    include_usage = False
    if isinstance(options, dict):
        include_usage = options.get("include_usage") is True
    elif options is not None:
        raise BadRequest('"stream_options" must be an object')
    stop = _stop(data.get("stop"))
    ignore_eos = _boolean(data, "ignore_eos")
    params: dict[str, object] = {
        "seed": seed if seed >= 0 else 4294967295,
        "temperature": _number(data, "temperature", 0.8),
        "top_k": _number(data, "top_k", 40),
        "top_p": _number(data, "top_p", 0.95),
        "min_p": _number(data, "min_p", 0.05),
        "max_tokens": n_predict,
        "n_predict": n_predict,
        "n_keep": 0,
        "ignore_eos": ignore_eos,
        "stream": stream,
        "stop": list(stop),
        "chat_format": "Content-only",
        "samplers": ["penalties", "dry", "top_k", "typ_p", "top_p", "min_p", "temperature"],
    }
    return Generation(
        prompt=prompt,
        prompt_text=text,
        n_predict=n_predict,
        stream=stream,
        id_slot=id_slot if id_slot >= 0 else None,
        stop=stop,
        seed=seed if seed >= 0 else None,
        include_usage=include_usage,
        params=params,
    )


def _prompt(raw: object) -> tuple[tuple[str, ...], str]:
    if isinstance(raw, str):
        return tuple(tokens.tokenize(raw)), raw
    if isinstance(raw, list) and _is_token_ids(raw):
        return tuple(tokens.from_token_ids(raw)), " ".join(map(str, raw))
    if isinstance(raw, list) and len(raw) == 1:
        return _prompt(raw[0])
    if isinstance(raw, list):
        raise BadRequest("rower sim answers one prompt per request; send the prompts apart")
    raise BadRequest('"prompt" must be a string, an array of token ids or of one string')


def _is_token_ids(raw: list[object]) -> bool:
    return bool(raw) and all(isinstance(x, int) and not isinstance(x, bool) for x in raw)


def _message(raw: object) -> tuple[str, str]:
    if not isinstance(raw, dict):
        raise BadRequest("Each message must be an object with 'role' and 'content'")
    role = raw.get("role")
    if not isinstance(role, str):
        raise BadRequest("Each message must have a string 'role'")
    content = raw.get("content")
    if content is None:
        if role != "assistant":
            raise BadRequest("All non-assistant messages must contain 'content'")
        return role, ""
    if isinstance(content, str):
        return role, content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or not isinstance(part.get("text", ""), str):
                raise BadRequest("Each content part must be an object; text parts need 'text'")
            parts.append(str(part.get("text", "")))
        return role, "".join(parts)
    raise BadRequest("'content' must be a string or an array of content parts")


def _stop(raw: object) -> tuple[str, ...]:
    if raw is None:
        return ()
    if isinstance(raw, str):
        return (raw,)
    if isinstance(raw, list) and all(isinstance(word, str) for word in raw):
        return tuple(raw)
    raise BadRequest('"stop" must be a string or an array of strings')


def _integer(data: Mapping[str, object], key: str) -> int:
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f'"{key}" must be an integer')
    return value


def _boolean(data: Mapping[str, object], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequest(f'"{key}" must be a boolean')
    return value


def _number(data: Mapping[str, object], key: str, default: float) -> float | int:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BadRequest(f'"{key}" must be a number')
    return value
