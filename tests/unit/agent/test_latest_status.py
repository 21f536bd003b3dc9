"""The board between the monitor and the reporters."""

from __future__ import annotations

import asyncio
import time

import pytest

from rower.agent.latest_status import LatestStatus
from rower.status import StatusUpdate


async def test_waiters_wake_on_publish_and_close() -> None:
    board = LatestStatus()
    waiter = asyncio.create_task(board.wait_newer(None))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    first = StatusUpdate(external_llamacpp_addr="h:1", sequence=1)
    board.publish(first)
    await asyncio.wait_for(waiter, 1)
    assert board.latest is first

    waiter = asyncio.create_task(board.wait_newer(first))
    await asyncio.sleep(0.01)
    assert not waiter.done()
    board.close()
    await asyncio.wait_for(waiter, 1)
    assert board.closed


async def test_wait_returns_at_once_when_already_newer() -> None:
    board = LatestStatus()
    board.publish(StatusUpdate(external_llamacpp_addr="h:1"))
    await asyncio.wait_for(board.wait_newer(None), 0.1)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(board.wait_newer(board.latest), 0.05)


def test_the_board_keeps_when_the_newest_poll_ended() -> None:
    board = LatestStatus()
    assert board.polled_at == 0.0
    before = time.monotonic()
    board.publish(StatusUpdate(external_llamacpp_addr="h:1", sequence=1))
    # By default the poll ended as it was published: a monitor publishes as soon as it returns.
    assert before <= board.polled_at <= time.monotonic()
    board.publish(StatusUpdate(external_llamacpp_addr="h:1", sequence=2), polled_at=12.5)
    assert board.polled_at == 12.5
