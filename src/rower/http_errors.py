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
