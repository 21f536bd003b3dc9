"""Fixtures for integration tests: fleets of real `rower` processes on loopback."""

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
