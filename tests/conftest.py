"""Shared pytest wiring: each test's outcome for fixtures, and the `fleet` fixture that uses it."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator, Generator, Iterator

import pytest

from tests.integration.agent.peers import Receiver
from tests.integration.fleet import Fleet


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


@pytest.fixture
def fleet(request: pytest.FixtureRequest) -> Iterator[Fleet]:
    """A fleet of real processes to start in; their output is printed if the test fails."""
    fleet = Fleet()
    yield fleet
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(fleet.outputs())
    fleet.close()


@pytest.fixture
def statsd_socket() -> Iterator[socket.socket]:
    """A UDP socket on 127.0.0.1 to receive StatsD datagrams (5 s read timeout)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        yield sock


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An NDJSON status receiver: the balancer's side of an agent's stream."""
    server = Receiver()
    await server.start()
    yield server
    await server.stop()
