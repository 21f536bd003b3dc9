"""Fixtures for integration tests: the agent's real HTTP peers (tests/integration/agent/peers.py).

The `fleet` fixture, real `rower` processes on loopback, is in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.agent.peers import FakeLlama, Receiver


@pytest.fixture
async def llama() -> AsyncIterator[FakeLlama]:
    """A server answering `/slots`, `/props` and `/health` as llama-server does."""
    server = FakeLlama()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """An NDJSON status receiver: the balancer's side of an agent's stream."""
    server = Receiver()
    await server.start()
    yield server
    await server.stop()
