"""What Rower knows of llama-server's HTTP API: its `/slots`, `/props` and `/v1/models` answers
and its error shape."""

from __future__ import annotations

from typing import Any

import msgspec

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "invalid_request_error",
    429: "unavailable_error",
    500: "server_error",
    501: "not_supported_error",
    502: "server_error",
    503: "unavailable_error",
    504: "unavailable_error",
}


class LlamaSlot(msgspec.Struct, frozen=True):
    """One element of llama-server's `GET /slots` answer; other keys are ignored."""

    id: int
    is_processing: bool
    n_ctx: int = 0
    # Untyped on purpose: progress is a hint for routing, and a build that changes its shape
    # must not make a healthy server unusable. `rower.agent.llamacpp_probe` reads them.
    id_task: Any = None
    """The task the slot holds or last held; absent on a slot that never had one."""
    next_token: Any = None
    """`[{has_next_token, has_new_line, n_remain, n_decoded}]` in this build, the same object
    without the list in older ones."""


class LlamaProps(msgspec.Struct, frozen=True):
    """The parts of llama-server's `GET /props` answer that Rower reads."""

    total_slots: int | None = None
    model_path: str | None = None
    model_alias: str | None = None
    role: str | None = None
    """`"router"` for a router-mode server (`--models-dir`, no `-m`); absent otherwise."""


class LlamaListedModel(msgspec.Struct, frozen=True):
    """One element of `GET /v1/models` `data`; other keys are ignored.

    Untyped fields, as `LlamaSlot`'s progress: one odd entry must not hide the others.
    """

    id: Any = None
    """The name clients send as `model`: the first `--alias`, else the `-m` path as given; in
    router mode the file stem (or preset name)."""
    aliases: Any = None
    """Every name the model answers to: in single-model mode the `--alias` names (the id
    included), in router mode the preset's extra names (the id not included)."""
    status: Any = None
    """Router mode only: `{"value": "loaded" | "unloaded" | "loading" | "sleeping" | ...}`,
    plus `"failed": true` and `"exit_code"` when its last load failed."""


class LlamaModelList(msgspec.Struct, frozen=True):
    """llama-server's `GET /v1/models` answer (the OpenAI list part)."""

    data: list[LlamaListedModel]


slots_decoder = msgspec.json.Decoder(list[LlamaSlot])
props_decoder = msgspec.json.Decoder(LlamaProps)
models_decoder = msgspec.json.Decoder(LlamaModelList)


def error_body(code: int, message: str, error_type: str | None = None) -> bytes:
    """llama.cpp's error JSON: `{"error": {"code", "message", "type"}}`."""
    return msgspec.json.encode(
        {
            "error": {
                "code": code,
                "message": message,
                "type": error_type or ERROR_TYPES.get(code, "server_error"),
            }
        }
    )
