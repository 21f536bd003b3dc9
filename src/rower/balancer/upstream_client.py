"""How the proxy talks to llama-servers: kept-alive connections, where reusing one is safe.

llama-server (build 11434) says `Keep-Alive: timeout=5, max=100` but closes the connection
after every streamed answer, and closes a connection idle for 5 s. A pool that reuses either
kind sends a request on a connection the server has closed, and the request fails with "Server
disconnected" (about 1 request in 40 in mixed benchmarks). A new connection per request avoids
that at ~1 ms per request. So:

- a connection goes back to the pool only after an answer framed by its `Content-Length` and
  read to its end; a request that asks for a stream says `Connection: close`, and an answer
  without a length (a stream) closes its connection when it ends;
- pooled connections expire after `KEEPALIVE_SECONDS` idle, well before the server's 5 s;
- if a reused connection fails before any byte of the answer arrived (`ServerDisconnectedError`
  or an OS error writing the request), the server never read the request: it is sent again,
  once, on a new connection to the same server. The caller's slot is untouched by this: the
  request is still on the slot it was dispatched to, released once when it ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from aiohttp.tracing import TraceConnectionReuseconnParams
from multidict import CIMultiDict

KEEPALIVE_SECONDS = 2.0
"""Longest idle time of a pooled connection: llama-server closes them at 5 s, and a connection
expired here 3 s early cannot race with the server's close."""


@dataclass(slots=True)
class _Attempt:
    """What the pool did for one attempt: whether it handed out a kept-alive connection."""

    reused: bool = False


@dataclass(frozen=True, slots=True)
class UpstreamAnswer:
    """An upstream's response (headers read), and how the connection for it was got.

    Attributes:
        response: the response; its body is still to be read.
        reused: whether it came on a kept-alive connection (not after a retry).
        retried: whether a reused connection failed first and it was sent again on a new one.
    """

    response: aiohttp.ClientResponse
    reused: bool
    retried: bool


async def _on_reuse(
    _session: aiohttp.ClientSession,
    context: SimpleNamespace,
    _params: TraceConnectionReuseconnParams,
) -> None:
    attempt = context.trace_request_ctx
    if isinstance(attempt, _Attempt):
        attempt.reused = True


class UpstreamClient:
    """The proxy's HTTP client for llama-servers: a pool, and new connections for retries.

    No total timeout (a generation may run for minutes), no pool limit (the slot count is the
    limit), no decompression (bytes pass through as the server sent them).
    """

    def __init__(self) -> None:
        tracing = aiohttp.TraceConfig()
        tracing.on_connection_reuseconn.append(_on_reuse)
        self.pooled = _session(
            aiohttp.TCPConnector(limit=0, limit_per_host=0, keepalive_timeout=KEEPALIVE_SECONDS),
            [tracing],
        )
        self.fresh = _session(aiohttp.TCPConnector(limit=0, limit_per_host=0, force_close=True), [])

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: CIMultiDict[str],
        body: bytes | None,
        streaming: bool,
    ) -> UpstreamAnswer:
        """Send one request; returns once the response headers are in.

        `streaming` (the request asks for a stream) adds `Connection: close` to `headers`:
        the server closes after a stream anyway. Raises what aiohttp raises when the request
        fails on a new connection, or again after the retry.
        """
        if streaming:
            headers["Connection"] = "close"
        attempt = _Attempt()
        try:
            response = await self._send(self.pooled, method, url, headers, body, attempt)
            retried = False
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as error:
            if not attempt.reused or isinstance(error, aiohttp.ClientConnectorError):
                raise
            # The server closed the kept-alive connection as the request went out: it never
            # read it. Once more, on a connection of its own.
            response = await self._send(self.fresh, method, url, headers, body, None)
            retried = True
        connection = response.connection
        if response.content_length is None and connection is not None and connection.protocol:
            # A stream: llama-server closes the connection after it; never pool it.
            connection.protocol.force_close()
        return UpstreamAnswer(response, attempt.reused and not retried, retried)

    async def _send(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        headers: CIMultiDict[str],
        body: bytes | None,
        attempt: _Attempt | None,
    ) -> aiohttp.ClientResponse:
        return await session.request(
            method,
            url,
            headers=headers,
            data=body,
            allow_redirects=False,
            trace_request_ctx=attempt,
        )

    async def close(self) -> None:
        """Close every connection."""
        await self.pooled.close()
        await self.fresh.close()


def _session(
    connector: aiohttp.TCPConnector, tracing: list[aiohttp.TraceConfig]
) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=5.0),
        auto_decompress=False,
        skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
        trace_configs=tracing,
    )
