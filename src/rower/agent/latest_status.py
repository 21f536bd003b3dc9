"""The agent's latest status, shared by the monitor (one writer) and the reporters (readers).

Each reporter streams at its own pace: it reads the newest status whenever it is ready to send,
so a slow or absent balancer never holds back the others nor the monitor. Intermediate statuses
a slow reporter did not get to are skipped on purpose: every line is a full status.

The board also keeps when the newest status's poll ended (`time.monotonic()`), so that each
line can say how old its poll is when it is sent (`StatusUpdate.poll_age_ms`).
"""

from __future__ import annotations

import asyncio
import time

from rower.status import StatusUpdate


class LatestStatus:
    """The newest `StatusUpdate`, and a way to wait for a newer one."""

    def __init__(self) -> None:
        self._latest: StatusUpdate | None = None
        self._polled_at = 0.0
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def latest(self) -> StatusUpdate | None:
        """The newest status, or None before the first poll ended."""
        return self._latest

    @property
    def polled_at(self) -> float:
        """When the poll of the newest status ended (`time.monotonic()`; 0 before the first)."""
        return self._polled_at

    @property
    def closed(self) -> bool:
        """Whether the agent is stopping: no status will follow `latest`."""
        return self._closed

    def publish(self, status: StatusUpdate, *, polled_at: float | None = None) -> None:
        """Make `status` the newest one and wake every waiting reporter.

        `polled_at`: when its poll ended; by default now, as when a poll is published as soon
        as it returns. A later time than the server's own snapshot errs on the safe side: the
        balancer then frees fewer slots early, never more.
        """
        self._latest = status
        self._polled_at = time.monotonic() if polled_at is None else polled_at
        self._wake()

    def close(self) -> None:
        """No more statuses: reporters send what they have not sent yet and end their streams."""
        self._closed = True
        self._wake()

    async def wait_newer(self, seen: StatusUpdate | None) -> None:
        """Return once the newest status is not `seen` (by identity) or the board is closed."""
        while self._latest is seen and not self._closed:
            changed = self._changed
            await changed.wait()

    def _wake(self) -> None:
        # Waiters hold the old event; a fresh one lets the next wait block again.
        self._changed.set()
        self._changed = asyncio.Event()
