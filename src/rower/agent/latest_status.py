"""The agent's latest status, shared by the monitor (one writer) and the reporters (readers).

Each reporter streams at its own pace: it reads the newest status whenever it is ready to send,
so a slow or absent balancer never holds back the others nor the monitor. Intermediate statuses
a slow reporter did not get to are skipped on purpose: every line is a full status.
"""

from __future__ import annotations

import asyncio

from rower.status import StatusUpdate


class LatestStatus:
    """The newest `StatusUpdate`, and a way to wait for a newer one."""

    def __init__(self) -> None:
        self._latest: StatusUpdate | None = None
        self._closed = False
        self._changed = asyncio.Event()

    @property
    def latest(self) -> StatusUpdate | None:
        """The newest status, or None before the first poll ended."""
        return self._latest

    @property
    def closed(self) -> bool:
        """Whether the agent is stopping: no status will follow `latest`."""
        return self._closed

    def publish(self, status: StatusUpdate) -> None:
        """Make `status` the newest one and wake every waiting reporter."""
        self._latest = status
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
