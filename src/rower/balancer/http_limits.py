"""The HTTP listeners' own limits, answered in llama.cpp's error shape.

aiohttp enforces the request line and header sizes itself (`max_line_size`, `max_field_size`,
`max_headers`) before any handler runs, and answers a breach with a plain-text 400 and an error
logged with a traceback. A client that sends too much deserves to know which limit it hit: this
runner answers 431 (a request line or header field too long, too many header fields), in the
JSON every other error of the balancer has, and logs one warning line. The connection is closed
either way, as aiohttp does: the parser cannot find the next request in what follows.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.web_request import BaseRequest

from rower.http_errors import error_response

log = logging.getLogger(__name__)

MAX_HEADERS = 128
"""Most header fields in one request (aiohttp's default)."""


class _LimitedRequestHandler(web.RequestHandler):
    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        answer = _limit_answer(exc)
        if answer is None or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.warning("refused a request from %s: %s", request.remote, answer.text)
        answer.force_close()
        return answer


class _LimitedServer(web.Server):
    def __call__(self) -> web.RequestHandler:
        # aiohttp makes one protocol per connection here; only the class differs from its own.
        return _LimitedRequestHandler(self, loop=self._loop, **self._kwargs)


class LimitedAppRunner(web.AppRunner):
    """An `AppRunner` whose header-size breaches get 431 in llama.cpp's error shape.

    Args:
        app: the application.
        max_header_bytes: longest request line and longest header field, in bytes.
        kwargs: passed to `web.AppRunner`.
    """

    def __init__(self, app: web.Application, *, max_header_bytes: int, **kwargs: Any) -> None:
        super().__init__(
            app,
            max_line_size=max_header_bytes,
            max_field_size=max_header_bytes,
            max_headers=MAX_HEADERS,
            **kwargs,
        )

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        return _LimitedServer(
            server.request_handler,
            request_factory=server.request_factory,
            handler_cancellation=server.handler_cancellation,
            loop=server._loop,
            **server._kwargs,
        )


def _limit_answer(exc: BaseException | None) -> web.Response | None:
    if isinstance(exc, LineTooLong):
        # The parser reports the URL and header lines alike (in pieces), so one answer fits both.
        limit = exc.args[1] if len(exc.args) > 1 else "?"
        return error_response(
            431,
            f"The request line or a header field is over {limit} bytes (--max-header-bytes)",
            error_type="invalid_request_error",
        )
    if isinstance(exc, BadHttpMessage) and "Too many headers" in str(exc):
        return error_response(
            431,
            f"The request has more than {MAX_HEADERS} header fields",
            error_type="invalid_request_error",
        )
    return None
