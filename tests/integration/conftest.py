"""Fixtures for integration tests: the agent's real HTTP peers (tests/integration/agent/peers.py).

The `fleet` fixture, real `rower` processes on loopback, is in tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.integration.agent.peers import FakeLlama


@pytest.fixture
async def llama() -> AsyncIterator[FakeLlama]:
    """A server answering `/slots`, `/props` and `/health` as llama-server does."""
    server = FakeLlama()
    await server.start()
    yield server
    await server.stop()
