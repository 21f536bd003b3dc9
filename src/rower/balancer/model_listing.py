"""`GET /v1/models` answered by the balancer: every model of the fleet, in OpenAI's shape.

One llama-server's answer names only its own model; a client of a fleet asks which models it may
name. The balancer answers with the union: one `data` entry per model (id, aliases, `object`,
`created`, `owned_by`, as llama-server writes them), plus `models` in the Ollama-style shape
llama-server also answers with. Rower adds a `rower` object per entry: how many servers serve
the model, their slots, how many requests wait for it, and whether it is only declared
(`--model`, no server yet) or only loadable (listed by a router, not loaded).
"""

from __future__ import annotations

from typing import Any

from rower.balancer.fleet import Fleet
from rower.balancer.models import UNKNOWN

MODELS_PATHS = frozenset({"/v1/models", "/models"})
"""The paths the balancer answers itself (GET)."""


def listing(fleet: Fleet, now: float, wall: float) -> dict[str, Any]:
    """The body of `/v1/models` for the fleet as it is now."""
    servers: dict[str, list[Any]] = {}
    aliases: dict[str, list[str]] = {}
    for upstream in fleet.upstreams.values():
        if upstream.model == UNKNOWN or upstream.cold:
            continue
        servers.setdefault(upstream.model, []).append(upstream)
        known = aliases.setdefault(upstream.model, [])
        known.extend(a for a in upstream.status.model_aliases if a not in known)
    loadable = _unloaded_on_routers(fleet)
    buffered = fleet.buffered_by_model()
    names = sorted(set(servers) | set(fleet.model_rules.declared) | loadable)
    data = []
    for name in names:
        members = servers.get(name, [])
        state = "ready" if members else ("loadable" if name in loadable else "declared")
        data.append(
            {
                "id": name,
                "aliases": aliases.get(name, []),
                "object": "model",
                "created": int(min((u.last_update_wall for u in members), default=wall)),
                "owned_by": "llamacpp",
                "rower": {
                    "state": state,
                    "servers": len(members),
                    "slots_total": sum(u.slots_total for u in members),
                    "slots_free": sum(u.slots_free(now) for u in members),
                    "requests_buffered": buffered.get(name, 0),
                },
            }
        )
    return {
        "object": "list",
        "data": data,
        "models": [{"name": name, "model": name, "type": "model"} for name in names],
    }


def _unloaded_on_routers(fleet: Fleet) -> set[str]:
    """Models a router lists as loadable, from the last report of each router agent."""
    return {
        model.model
        for report in fleet.router_reports.values()
        for model in report.models
        if not model.is_loaded
    }
