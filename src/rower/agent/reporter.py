"""One status stream to one balancer: a long-lived NDJSON POST, reconnected on any failure.

The request body never ends while the agent runs: one `StatusUpdate` per line, the newest one
first on every (re)connect and then each new one as the monitor publishes it. The balancer
removes the agent when the stream ends, so a clean stop ends the body instead of dropping the
connection. Each balancer gets its own `Reporter` and its own HTTP session, so one that is down
or slow never delays another.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator

import aiohttp
import msgspec

from rower.addresses import Address
from rower.agent.latest_status import LatestStatus
from rower.status import MAX_POLL_AGE_MS, StatusUpdate, json_encoder

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT = 2.0
FINISH_TIMEOUT = 2.0
"""How long a stopping agent waits for the balancer's answer after ending its stream."""
REPEAT_LOG_AFTER = 60.0
"""The same failure is logged again at warning level at most this often."""


class Backoff:
    """Capped exponential delays with ±20 % jitter: 0.25 s, 0.5 s, 1 s, 1 s, ...

    The cap is low on purpose: until an agent is back on its balancer, its slots are lost
    capacity, so a restarted balancer should see its whole fleet again within about a second.
    A refused connection (or a 401) once a second per balancer costs nothing; the jitter keeps
    a large fleet from reconnecting in lockstep.
    """

    def __init__(
        self, *, first: float = 0.25, cap: float = 1.0, jitter: float = 0.2, rng: random.Random
    ) -> None:
        self._first = first
        self._cap = cap
        self._jitter = jitter
        self._rng = rng
        self._next = first

    def reset(self) -> None:
        """The stream worked: the next failure retries quickly again."""
        self._next = self._first

    def delay(self) -> float:
        """The next delay in seconds; each call doubles the one after, up to the cap."""
        base = self._next
        self._next = min(self._cap, self._next * 2)
        return base * self._rng.uniform(1 - self._jitter, 1 + self._jitter)


class Reporter:
    """Streams the agent's statuses to the balancer at `management_addr` until the board closes."""

    def __init__(
        self,
        *,
        management_addr: Address,
        agent_id: str,
        board: LatestStatus,
        management_token: str | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.url = management_addr.url(f"/api/v1/agent_status_update/{agent_id}")
        self._board = board
        self._headers = {"Content-Type": "application/x-ndjson"}
        if management_token:
            self._headers["Authorization"] = f"Bearer {management_token}"
        self._has_token = bool(management_token)
        self._backoff = backoff or Backoff(rng=random.Random())
        self._last_failure: str | None = None
        self._failures_logged: dict[str, float] = {}
        self.connections = 0
        """How many streams were accepted (at least two lines sent); for tests and logs."""

    async def run(self) -> None:
        """Stream, and reconnect after each failure, until the board is closed."""
        async with aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(
                total=None, connect=CONNECT_TIMEOUT, sock_connect=CONNECT_TIMEOUT
            )
        ) as session:
            while True:
                failure = await self._stream_once(session)
                if self._board.closed:
                    return
                self._note_failure(failure)
                if await self._wait_or_closed(self._backoff.delay()):
                    return

    async def _stream_once(self, session: aiohttp.ClientSession) -> str:
        """One stream; returns what ended it, in words."""
        try:
            async with session.post(self.url, data=self._lines(), headers=self._headers) as answer:
                text = (await answer.content.read(2000)).decode(errors="replace")
                return self._describe_answer(answer.status, text)
        except aiohttp.ClientConnectorError as error:
            return f"cannot connect ({error.os_error.strerror or error.os_error})"
        except aiohttp.ServerDisconnectedError:
            return "the balancer closed the connection"
        except (aiohttp.ClientError, OSError, TimeoutError) as error:
            return str(error) or type(error).__name__

    async def _lines(self) -> AsyncIterator[bytes]:
        sent: StatusUpdate | None = None
        lines = 0
        while True:
            status = self._board.latest
            if status is not None and status is not sent:
                yield json_encoder.encode(self._dated(status)) + b"\n"
                sent = status
                lines += 1
                if lines == 2:
                    # The balancer took a line and kept the stream open: it accepted us.
                    self._on_accepted()
            if self._board.closed and self._board.latest is sent:
                return
            await self._board.wait_newer(sent)

    def _dated(self, status: StatusUpdate) -> StatusUpdate:
        """`status` saying how long ago its poll ended, truncated to the microsecond (a
        smaller age is the safe error) and capped at what a balancer accepts."""
        age_us = int((time.monotonic() - self._board.polled_at) * 1_000_000)
        age_ms = min(max(0, age_us) / 1000, MAX_POLL_AGE_MS)
        return msgspec.structs.replace(status, poll_age_ms=age_ms)

    def _on_accepted(self) -> None:
        self.connections += 1
        self._backoff.reset()
        if self._last_failure is not None or self.connections == 1:
            logger.info("streaming status to %s", self.url)
        self._last_failure = None

    def _describe_answer(self, status: int, text: str) -> str:
        message = _error_message(text)
        if status == 401:
            if self._has_token:
                return f"the balancer rejected the management token (401 {message})"
            return f"the balancer wants a management token; set --management-token (401 {message})"
        if status == 400:
            return f"the balancer rejected a status line (400 {message})"
        if 200 <= status < 300:
            return f"the balancer ended the stream ({status})"
        return f"the balancer answered {status} {message}"

    def _note_failure(self, failure: str) -> None:
        # Each distinct failure is logged at most once a REPEAT_LOG_AFTER: a 401 may alternate
        # with "closed the connection" (the balancer answers before reading the body).
        now = time.monotonic()
        logged = self._failures_logged.get(failure)
        if logged is None or now - logged >= REPEAT_LOG_AFTER:
            logger.warning("status stream to %s: %s; reconnecting", self.url, failure)
            self._failures_logged[failure] = now
        else:
            logger.debug("status stream to %s: %s; reconnecting", self.url, failure)
        self._last_failure = failure

    async def _wait_or_closed(self, seconds: float) -> bool:
        """Sleep `seconds`, or less if the board closes; returns whether it closed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while not self._board.closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._board.wait_newer(self._board.latest), remaining)
            except TimeoutError:
                return False
        return True


def _error_message(text: str) -> str:
    """The message of a llama.cpp-shaped error body, or the body's start."""
    try:
        decoded = msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text.strip()[:300] or "(no message)"
    if isinstance(decoded, dict):
        error = decoded.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:300]
        if isinstance(error, str):
            return error[:300]
    return text.strip()[:300]
