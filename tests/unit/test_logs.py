"""Log lines that outside input can cause: one per kind per period, with a count of the rest."""

from __future__ import annotations

import logging

import pytest

from rower.logs import Throttle, log_throttled


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_one_line_per_kind_per_period_then_the_count_of_the_rest() -> None:
    clock = Clock()
    throttle = Throttle(period=10.0, clock=clock)
    assert throttle.admit("bad request") == 0
    assert throttle.admit("bad request") is None
    assert throttle.admit("bad token") == 0
    clock.now = 9.9
    assert throttle.admit("bad request") is None
    clock.now = 10.0
    assert throttle.admit("bad request") == 2
    assert throttle.admit("bad request") is None
    clock.now = 30.0
    assert throttle.admit("bad request") == 1
    assert throttle.admit("bad token") == 0


def test_log_throttled_says_how_many_it_left_out(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    throttle = Throttle(period=5.0, clock=clock)
    logger = logging.getLogger("rower.test")
    with caplog.at_level(logging.WARNING, logger="rower.test"):
        for client in range(100):
            log_throttled(
                logger, logging.WARNING, "refused", "refused %s", client, throttle=throttle
            )
        clock.now = 6.0
        log_throttled(logger, logging.WARNING, "refused", "refused %s", "last", throttle=throttle)
    assert [r.getMessage() for r in caplog.records] == [
        "refused 0",
        "refused last (and 99 more like it in the last 5 s, not logged)",
    ]
    assert all(r.levelno == logging.WARNING and not r.exc_info for r in caplog.records)
