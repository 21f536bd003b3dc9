"""HTTP error answers in llama.cpp's shape, made by the balancer and by `rower sim`."""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from rower.llamacpp import error_body


def error_response(
    status: int,
    message: str,
    *,
    error_type: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    """`{"error": {"code": status, "message": message, "type": ...}}` with that status."""
    return web.Response(
        status=status,
        body=error_body(status, message, error_type),
        content_type="application/json",
        charset="utf-8",
        headers=headers,
    )


def openai_error_response(
    status: int, message: str, *, code: str, param: str | None = None
) -> web.Response:
    """`{"error": {"message", "type", "param", "code"}}`: OpenAI's shape, which OpenAI clients
    turn into their own exceptions (`model_not_found` -> `NotFoundError`)."""
    return web.json_response(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": param,
                "code": code,
            }
        },
        status=status,
    )
