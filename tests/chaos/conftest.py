"""Fixtures for fault-injection tests: a fleet of real processes, and the invariants after.

Each test breaks something on purpose (kills, freezes, slow or refusing servers, clients that
leave), then `settled` checks what must hold whatever happened: nothing the balancer accepted
is still running, every server's slots are idle, and the balancer lists exactly the agents that
are alive.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.fleet import Fleet


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A fleet to start processes in; their output is printed if the test fails."""
    fleet = Fleet()
    yield fleet
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(fleet.outputs())
    fleet.close()
