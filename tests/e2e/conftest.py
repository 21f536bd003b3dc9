"""Fixtures for end-to-end tests against a real llama-server running the tiny model.

The binary and the model come from `scripts/setup.sh`, or from `ROWER_LLAMA_SERVER` and
`ROWER_TINY_MODEL`. When they are missing the tests are skipped, except in CI (`CI` set) or
with `ROWER_REQUIRE_LLAMA_SERVER=1`, where a skip would hide that nothing was tested: there
they fail. Every test in this directory is marked `e2e`, so `pytest -m "not e2e"` leaves
them out.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.e2e.real_llama_server import (
    LlamaCppArtifacts,
    LlamaRouter,
    LlamaServer,
    LlamaServerFactory,
    configured_artifacts,
    start_llama_router,
    start_llama_server,
)

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.parents:
            item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def llamacpp_artifacts() -> LlamaCppArtifacts:
    """The binary and the model, or a skip (a failure in CI) that says how to get them."""
    artifacts = configured_artifacts()
    missing = artifacts.missing()
    if missing:
        message = (
            f"missing {' and '.join(missing)}: run scripts/setup.sh "
            "(or set ROWER_LLAMA_SERVER and ROWER_TINY_MODEL)"
        )
        if os.environ.get("CI") or os.environ.get("ROWER_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    return artifacts


@pytest.fixture
def llama_server(llamacpp_artifacts: LlamaCppArtifacts) -> Iterator[LlamaServerFactory]:
    """Start llama-servers for one test: `llama_server(slots=2, ctx=4096, extra_args=())`.

    `ctx` is the context of each slot. Each call returns once `/health` answers 200; every
    server started is stopped when the test ends.
    """
    started: list[LlamaServer] = []

    def start(*, slots: int = 2, ctx: int = 4096, extra_args: Sequence[str] = ()) -> LlamaServer:
        server = start_llama_server(llamacpp_artifacts, slots=slots, ctx=ctx, extra_args=extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.process.close()


@pytest.fixture
def llama_router(llamacpp_artifacts: LlamaCppArtifacts, tmp_path: Path) -> Iterator[LlamaRouter]:
    """A router-mode llama-server serving the tiny model as `tiny-a` and `tiny-b`
    (`--models-max 2`, 2 slots of 4096 tokens per model), none loaded yet."""
    router = start_llama_router(llamacpp_artifacts, tmp_path / "models")
    yield router
    router.close()
