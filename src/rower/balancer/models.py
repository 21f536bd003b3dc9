"""Which model a request asks for, in a fleet that may serve several.

Pure: the names the fleet's servers answer to (each server's model id and aliases), the
operator's rules (`--model`, `--default-model`, `--model-alias`), and a request's `model` field
in; the model whose servers may run it out, or why none may. docs/models.md says it for
operators:

- A fleet that serves one model (or none yet) takes every request, whatever its `model` says:
  clients often send placeholder names, and a single-model llama-server ignores the field.
- A fleet that serves several models sends a request only to servers of the model it names
  (by id or alias, after the operator's renames). Naming none is a 400 unless there is a default
  model; naming an unknown one is a 404. Both messages list what the fleet serves.
- Declared models (`--model NAME`) count as served before any server of theirs registers: their
  requests wait in their own buffer (scale from zero per model).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

UNKNOWN = ""
"""The pool of servers whose agent names no model (and of requests in a fleet with no model yet)."""


@dataclass(frozen=True, slots=True)
class ModelRules:
    """What the operator said about models.

    Attributes:
        declared: models served even before a server of theirs registers.
        default: the model of requests that name none, in a fleet of several models.
        renames: names clients send -> the fleet's model (or alias) they mean.
        max_buffered: per-model limit of waiting requests (else the global one).
        buffer_timeout: per-model longest wait for a slot, in seconds (else the global one).
    """

    declared: tuple[str, ...] = ()
    default: str | None = None
    renames: Mapping[str, str] = field(default_factory=dict)
    max_buffered: Mapping[str, int] = field(default_factory=dict)
    buffer_timeout: Mapping[str, float] = field(default_factory=dict)


class ModelProblem(enum.Enum):
    """Why a request's model names no servers."""

    UNNAMED = "model_unnamed"
    """The fleet serves several models and the request names none (400)."""
    UNKNOWN = "model_unknown"
    """The fleet serves no model of that name (404)."""


@dataclass(frozen=True, slots=True)
class ModelRefusal:
    """A request whose model the fleet cannot serve, with what it does serve."""

    problem: ModelProblem
    asked: str | None
    served: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ModelNames:
    """The fleet's models and the names that reach them.

    Attributes:
        models: the models served (ids), sorted.
        names: every id and alias -> its model id.
    """

    models: tuple[str, ...]
    names: Mapping[str, str]

    @classmethod
    def of(
        cls, servers: Iterable[tuple[str, Iterable[str]]], declared: Iterable[str]
    ) -> ModelNames:
        """From each server's (model id, aliases) and the declared models.

        An alias that is also another model's id names that model; the first server to claim
        an alias keeps it.
        """
        names: dict[str, str] = {}
        aliases: list[tuple[str, str]] = []
        for model, others in servers:
            if model == UNKNOWN:
                continue
            names[model] = model
            aliases.extend((alias, model) for alias in others)
        for model in declared:
            names.setdefault(model, model)
        for alias, model in aliases:
            names.setdefault(alias, model)
        return cls(tuple(sorted(set(names.values()))), names)

    def resolve(self, asked: str | None, rules: ModelRules) -> str | ModelRefusal:
        """The model a request naming `asked` goes to (`UNKNOWN` in a fleet of none)."""
        if len(self.models) <= 1:
            return self.models[0] if self.models else UNKNOWN
        name = asked or rules.default
        if name is None:
            return ModelRefusal(ModelProblem.UNNAMED, None, self.models)
        model = self.names.get(rules.renames.get(name, name))
        if model is None:
            return ModelRefusal(ModelProblem.UNKNOWN, asked or name, self.models)
        return model
