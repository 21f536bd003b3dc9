"""An agent's issues in plain words, for people reading a dashboard.

The agent reports what went wrong as flags and an error sentence; the balancer adds whether the
agent went stale or was quarantined. The web dashboard's `app.js` follows the same rules.
"""

from __future__ import annotations

from rower.status import AgentView


def agent_issues(agent: AgentView) -> list[str]:
    """What keeps `agent`'s llama-server from taking work, most telling first; empty if nothing."""
    status = agent.status
    issues: list[str] = []
    if status.is_connect_error:
        issues.append("unreachable")
    elif status.is_authorized is False:
        issues.append("unauthorized (check the API key)")
    elif status.is_slots_endpoint_enabled is False:
        issues.append("slots endpoint disabled")
    elif status.error is not None and "loading" in status.error.lower():
        issues.append("loading the model")
    elif status.is_deserialize_error or status.is_decode_error:
        issues.append("unreadable /slots answer")
    elif status.is_unexpected_response_status:
        issues.append("unexpected response status")
    elif status.is_request_error:
        issues.append("request to llama.cpp failed")
    elif status.error is not None:
        issues.append(status.error)
    if agent.is_stale:
        issues.append("stale (reports stopped)")
    if agent.quarantined_until is not None:
        issues.append("quarantined (refused a connection)")
    if status.is_draining:
        issues.append("draining")
    return issues
