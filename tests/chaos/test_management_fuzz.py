"""The management API fuzzed from its own OpenAPI description (schemathesis).

Every operation gets generated requests, valid and invalid, with the right management token so
the parsers behind the token are reached. Whatever arrives, the balancer answers without a 5xx,
as its description says, keeps running, and ends with no agent registered and nothing in
flight: a status stream registers only for as long as it lasts.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.fleet import Fleet

TOKEN = "fuzz-token"


@schemathesis.serializer("application/x-ndjson")
def ndjson(ctx: schemathesis.SerializationContext, value: Any) -> bytes:
    """A generated status becomes one NDJSON line (bytes and text are sent as they are)."""
    if isinstance(value, bytes):
        return value
    if isinstance(value, str):
        return value.encode()
    return json.dumps(value).encode() + b"\n"


@pytest.fixture(scope="module")
def fuzzed_fleet() -> Iterator[Fleet]:
    fleet = Fleet()
    fleet.balancer("--management-token", TOKEN, "--metrics-endpoint-enable")
    yield fleet
    fleet.close()


@pytest.fixture(scope="module")
def management_api(fuzzed_fleet: Fleet) -> Any:
    schema = schemathesis.openapi.from_url(fuzzed_fleet.management + "/api/v1/openapi.json")
    schema.config.update(base_url=fuzzed_fleet.management)
    # The SSE and placement streams never end; test_management_api.py reads them.
    return schema.exclude(path="/api/v1/agents/stream").exclude(path="/api/v1/placements")


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_management_api_never_fails_on_any_input(management_api: Any, mode: GenerationMode) -> None:
    cases = management_api.as_strategy(mode)

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.data())
    def exchange(data: st.DataObject) -> None:
        case = data.draw(cases)
        case.call_and_validate(
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=5,
            checks=[not_a_server_error, status_code_conformance, response_schema_conformance],
        )

    exchange()


def test_fuzzing_left_no_state_behind(fuzzed_fleet: Fleet) -> None:
    assert fuzzed_fleet.processes[0].popen.poll() is None
    view = fuzzed_fleet.agents_view()
    assert view["agents"] == []
    assert view["requests_in_flight"] == 0
    assert view["requests_buffered"] == 0
