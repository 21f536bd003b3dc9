"""An agent's issues in plain words."""

from __future__ import annotations

import pytest

from rower.dashboard.issues import agent_issues
from rower.status import AgentView, StatusUpdate, SystemTime


def view(*, stale: bool = False, quarantined: bool = False, **status: object) -> AgentView:
    return AgentView(
        agent_id="a",
        last_update=SystemTime(0, 0),
        quarantined_until=SystemTime(1, 0) if quarantined else None,
        slots_taken=0,
        slots_taken_since_last_status_update=0,
        status=StatusUpdate(external_llamacpp_addr="127.0.0.1:1", **status),  # type: ignore[arg-type]
        is_usable=False,
        is_stale=stale,
        slots_free=0,
    )


@pytest.mark.parametrize(
    ("status", "issue"),
    [
        ({"error": "Request failed: connection refused", "is_connect_error": True}, "unreachable"),
        ({"error": "Unauthorized", "is_authorized": False}, "unauthorized (check the API key)"),
        (
            {"error": "Not implemented", "is_slots_endpoint_enabled": False},
            "slots endpoint disabled",
        ),
        ({"error": "Llama.cpp is loading the model"}, "loading the model"),
        ({"error": "bad", "is_deserialize_error": True}, "unreadable /slots answer"),
        (
            {"error": "Unexpected response status", "is_unexpected_response_status": True},
            "unexpected response status",
        ),
        ({"error": "timed out", "is_request_error": True}, "request to llama.cpp failed"),
        ({"error": "something new"}, "something new"),
    ],
)
def test_each_reported_issue_in_words(status: dict[str, object], issue: str) -> None:
    assert agent_issues(view(**status)) == [issue]


def test_healthy_agent_has_none_and_balancer_side_issues_add_up() -> None:
    assert agent_issues(view()) == []
    assert agent_issues(view(stale=True, quarantined=True)) == [
        "stale (reports stopped)",
        "quarantined (refused a connection)",
    ]
