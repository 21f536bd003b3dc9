"""llama-server's JSON answers, built from the sim's state.

Shapes follow llama.cpp's tools/server (server-task.cpp `to_json_*`, server-context.cpp
`get_res_props`/`get_res_models`, server_slot::to_json): same keys, same nesting, same SSE
framing, so a client or a balancer cannot tell the sim from the real server by its JSON.
"""

from __future__ import annotations

import base64
import secrets
import string
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from rower.sim import tokens
from rower.sim.bodies import Generation
from rower.sim.engine import Run
from rower.sim.slots import Slot, SlotTable

Json = dict[str, Any]

_ALPHANUMERIC = string.digits + string.ascii_uppercase + string.ascii_lowercase


@dataclass(frozen=True, slots=True)
class Identity:
    """What the sim says about itself.

    Attributes:
        model: model name (`model_alias`, `/v1/models` id, `model` of answers).
        aliases: other names of the model (`/v1/models` `aliases`, after `model`), as
            llama-server's `--alias a,b` gives (the first is the id, all are aliases).
        n_ctx: context size of each slot.
        total_slots: number of slots.
        build_info: llama.cpp's `build_info` / `system_fingerprint`.
        embedding_size: length of embedding vectors.
    """

    model: str
    n_ctx: int
    total_slots: int
    aliases: tuple[str, ...] = ()
    build_info: str = "b0-rower-sim"
    embedding_size: int = 64

    @property
    def names(self) -> list[str]:
        """Every name of the model, the id first: llama-server's `/v1/models` `aliases`."""
        return list(dict.fromkeys((self.model, *self.aliases)))

    @property
    def model_path(self) -> str:
        """A plausible GGUF path for the model."""
        return self.model if self.model.endswith(".gguf") else f"{self.model}.gguf"


def sse(event: Json | str) -> bytes:
    """One server-sent event as llama-server frames it: `data: <json>\\n\\n`."""
    data = event.encode() if isinstance(event, str) else msgspec.json.encode(event)
    return b"data: " + data + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def completion_id() -> str:
    """llama.cpp's id for OpenAI-style answers: `chatcmpl-` and 32 random letters and digits."""
    return "chatcmpl-" + "".join(secrets.choice(_ALPHANUMERIC) for _ in range(32))


# --- llama.cpp's native /completion ---------------------------------------------------------


def completion(run: Run, generation: Generation, identity: Identity) -> Json:
    """The final answer of `/completion`; in a stream, content and tokens are empty."""
    task = run.task
    generated = task.generated
    return {
        "index": 0,
        "content": "" if generation.stream else run.text,
        "tokens": [] if generation.stream else [tokens.token_id(p) for p in generated],
        "id_slot": task.slot,
        "stop": True,
        "model": identity.model,
        "tokens_predicted": task.n_decoded,
        "tokens_evaluated": len(task.prompt),
        "generation_settings": dict(generation.params),
        "prompt": generation.prompt_text,
        "has_new_line": any("\n" in piece for piece in generated),
        "truncated": False,
        "stop_type": run.stop_type,
        "stopping_word": run.stopping_word,
        "tokens_cached": len(task.prompt) + task.n_decoded,
        "timings": run.timings.to_json(),
    }


def completion_chunk(run: Run, piece: str) -> Json:
    """One token of a `/completion` stream."""
    task = run.task
    return {
        "index": 0,
        "content": piece,
        "tokens": [tokens.token_id(task.generated[-1])] if task.generated else [],
        "stop": False,
        "id_slot": task.slot,
        "tokens_predicted": task.n_decoded,
        "tokens_evaluated": len(task.prompt),
    }


# --- OpenAI /v1/completions -----------------------------------------------------------------


def text_completion(run: Run, cmpl_id: str, identity: Identity, *, stream: bool) -> Json:
    """The final `text_completion` object (in a stream: the last chunk, with empty text)."""
    return {
        "choices": [
            {
                "text": "" if stream else run.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": _finish_reason(run),
            }
        ],
        "created": int(time.time()),
        "model": identity.model,
        "system_fingerprint": identity.build_info,
        "object": "text_completion",
        "usage": _usage(run),
        "id": cmpl_id,
        "timings": run.timings.to_json(),
    }


def text_completion_chunk(piece: str, cmpl_id: str, identity: Identity) -> Json:
    """One token of a `/v1/completions` stream."""
    return {
        "choices": [{"text": piece, "index": 0, "logprobs": None, "finish_reason": None}],
        "created": int(time.time()),
        "model": identity.model,
        "system_fingerprint": identity.build_info,
        "object": "text_completion",
        "id": cmpl_id,
    }


# --- OpenAI /v1/chat/completions ------------------------------------------------------------


def chat_completion(run: Run, cmpl_id: str, identity: Identity) -> Json:
    """The `chat.completion` answer."""
    return {
        "choices": [
            {
                "finish_reason": _finish_reason(run),
                "index": 0,
                "message": {"role": "assistant", "content": run.text},
            }
        ],
        "created": int(time.time()),
        "model": identity.model,
        "system_fingerprint": identity.build_info,
        "object": "chat.completion",
        "usage": _usage(run),
        "id": cmpl_id,
        "timings": run.timings.to_json(),
    }


def chat_chunks(piece: str, cmpl_id: str, identity: Identity, *, first: bool) -> list[Json]:
    """The events of one token of a chat stream; the first token is preceded by the role."""
    deltas: list[Json] = [{"role": "assistant", "content": None}] if first else []
    deltas.append({"content": piece})
    return [_chat_chunk(delta, None, cmpl_id, identity) for delta in deltas]


def chat_final_chunks(
    run: Run, cmpl_id: str, identity: Identity, *, include_usage: bool
) -> list[Json]:
    """The events that end a chat stream (before `data: [DONE]`); the last carries timings."""
    events = [_chat_chunk({}, _finish_reason(run), cmpl_id, identity)]
    if include_usage:
        events.append(
            {
                "choices": [],
                "created": int(time.time()),
                "id": cmpl_id,
                "model": identity.model,
                "system_fingerprint": identity.build_info,
                "object": "chat.completion.chunk",
                "usage": _usage(run),
            }
        )
    events[-1]["timings"] = run.timings.to_json()
    return events


def _chat_chunk(delta: Json, finish: str | None, cmpl_id: str, identity: Identity) -> Json:
    return {
        "choices": [{"finish_reason": finish, "index": 0, "delta": delta}],
        "created": int(time.time()),
        "id": cmpl_id,
        "model": identity.model,
        "system_fingerprint": identity.build_info,
        "object": "chat.completion.chunk",
    }


# --- embeddings -----------------------------------------------------------------------------


def embeddings(inputs: Sequence[Sequence[str]], identity: Identity) -> list[Json]:
    """`/embedding` and `/embeddings`: one `{index, embedding: [[...]]}` per input."""
    return [
        {"index": i, "embedding": [tokens.embedding(pieces, identity.embedding_size)]}
        for i, pieces in enumerate(inputs)
    ]


def embeddings_oai(
    inputs: Sequence[Sequence[str]], model: str, identity: Identity, *, base64_format: bool
) -> Json:
    """`/v1/embeddings`: an OpenAI `list` of `embedding` objects with usage."""
    data: list[Json] = []
    for i, pieces in enumerate(inputs):
        vector = tokens.embedding(pieces, identity.embedding_size)
        if base64_format:
            packed = struct.pack(f"<{len(vector)}f", *vector)
            data.append(
                {
                    "embedding": base64.b64encode(packed).decode(),
                    "index": i,
                    "object": "embedding",
                    "encoding_format": "base64",
                }
            )
        else:
            data.append({"embedding": vector, "index": i, "object": "embedding"})
    n_tokens = sum(len(pieces) for pieces in inputs)
    return {
        "model": model,
        "object": "list",
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
        "data": data,
    }


# --- server state ---------------------------------------------------------------------------


def slots(table: SlotTable, identity: Identity) -> list[Json]:
    """`GET /slots`."""
    return [_slot(slot, identity) for slot in table.slots]


def _slot(slot: Slot, identity: Identity) -> Json:
    answer: Json = {
        "id": slot.id,
        "n_ctx": identity.n_ctx,
        "speculative": False,
        "is_processing": slot.is_processing,
    }
    task = slot.task
    if task is None:
        last = slot.last_task
        if last is None:
            return answer
        # llama-server resets a slot's progress when its task ends; the task id stays.
        answer.update(
            {
                "id_task": last.id,
                "n_prompt_tokens": len(slot.cached),
                "n_prompt_tokens_processed": 0,
                "n_prompt_tokens_cache": 0,
                "params": dict(last.params),
                "next_token": [
                    {"has_next_token": False, "has_new_line": False, "n_remain": -1, "n_decoded": 0}
                ],
            }
        )
        return answer
    answer.update(
        {
            "id_task": task.id,
            "n_prompt_tokens": task.cache_n + task.prompt_n + task.n_decoded,
            "n_prompt_tokens_processed": task.prompt_n,
            "n_prompt_tokens_cache": task.cache_n,
            "params": dict(task.params),
            "next_token": [
                {
                    "has_next_token": True,
                    "has_new_line": any("\n" in piece for piece in task.generated),
                    "n_remain": task.n_remain,
                    "n_decoded": task.n_decoded,
                }
            ],
        }
    )
    return answer


def props(identity: Identity, extra: Json) -> Json:
    """`GET /props`, plus `extra` keys (the sim's counters)."""
    return {
        "default_generation_settings": {
            "params": {"n_predict": -1, "temperature": 0.8, "top_k": 40, "top_p": 0.95},
            "n_ctx": identity.n_ctx,
        },
        "total_slots": identity.total_slots,
        "model_alias": identity.model,
        "model_ftype": "F32",
        "model_path": identity.model_path,
        "modalities": {"vision": False, "video": False, "audio": False},
        "media_marker": "<__media__>",
        "endpoint_slots": True,
        "endpoint_props": False,
        "endpoint_metrics": False,
        "ui": False,
        "ui_settings": {},
        "chat_template": "",
        "chat_template_caps": {},
        "bos_token": tokens.BOS,
        "eos_token": "</s>",
        "build_info": identity.build_info,
        "is_sleeping": False,
        "cors_proxy_enabled": False,
        **extra,
    }


def models(identity: Identity) -> Json:
    """`GET /v1/models` (and `/models`): llama.cpp's mix of Ollama and OpenAI list shapes."""
    return {
        "models": [
            {
                "name": identity.model,
                "model": identity.model,
                "modified_at": "",
                "size": "",
                "digest": "",
                "type": "model",
                "description": "",
                "tags": [""],
                "capabilities": ["completion"],
                "parameters": "",
                "details": {
                    "parent_model": "",
                    "format": "gguf",
                    "family": "",
                    "families": [""],
                    "parameter_size": "",
                    "quantization_level": "",
                },
            }
        ],
        "object": "list",
        "data": [
            {
                "id": identity.model,
                "aliases": identity.names,
                "tags": [],
                "object": "model",
                "created": int(time.time()),
                "owned_by": "llamacpp",
                "meta": {
                    "vocab_type": 1,
                    "n_vocab": tokens.VOCAB_SIZE,
                    "n_ctx": identity.n_ctx,
                    "n_ctx_train": identity.n_ctx,
                    "n_embd": identity.embedding_size,
                    "n_params": 0,
                    "size": 0,
                    "ftype": "F32",
                },
            }
        ],
    }


def _finish_reason(run: Run) -> str:
    return "stop" if run.stop_type in ("word", "eos") else "length"


def _usage(run: Run) -> Json:
    task = run.task
    return {
        "completion_tokens": task.n_decoded,
        "prompt_tokens": len(task.prompt),
        "total_tokens": task.n_decoded + len(task.prompt),
        "prompt_tokens_details": {"cached_tokens": task.cache_n},
    }
