"""The reporter's reconnect delays."""

from __future__ import annotations

import random

from rower.agent.reporter import Backoff


def test_delays_double_up_to_the_cap_with_jitter() -> None:
    backoff = Backoff(rng=random.Random(7))
    delays = [backoff.delay() for _ in range(6)]
    for delay, base in zip(delays, [0.25, 0.5, 1.0, 1.0, 1.0, 1.0], strict=True):
        assert base * 0.8 <= delay <= base * 1.2
    # The first retry comes well within a second (SPEC 2).
    assert delays[0] < 1


def test_reset_starts_over() -> None:
    backoff = Backoff(rng=random.Random(1))
    for _ in range(5):
        backoff.delay()
    backoff.reset()
    assert backoff.delay() <= 0.25 * 1.2
