"""What one poll of llama-server means: the pure mapping from what the agent saw to a status.

Everything that decides the fields of a `StatusUpdate` lives here, and nothing here touches a
socket: the monitor turns HTTP exchanges into the small values below (`SlotsAnswer`,
`SlotsFailure`, `ServerFacts`, `Health`) and asks `status_from_poll` what to report. The rules
are SPEC section 2's table:

- an HTTP status came back: the transport flags are false; 200 with a list of slots is healthy,
  200 with anything else is a deserialize error, 401 is "not authorized", 501 is "slots endpoint
  disabled" (`--no-slots`), any other status is unexpected;
- no HTTP status came back: exactly one of the connect / request / decode flags is true and the
  flags that depend on a status are null, because nothing is known about them;
- a 503 or a transport failure while `/health` says the model is loading is reported as loading;
- any issue means 0 idle and 0 processing slots, so no balancer sends work there.

Each slot's progress (`id_task`, and `n_decoded`/`n_remain` from `next_token`) is passed on
when it is there and well-formed, and left out otherwise: it is a hint for routing, so a build
that shapes it differently loses the hint, not the server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from rower.llamacpp import LlamaSlot, slots_decoder
from rower.status import SlotStatus, StatusUpdate

MAX_TEXT = 4096
"""Longest error or model text a balancer accepts in a `StatusUpdate` (`ShortText`)."""

LOADING_ERROR = "Llama.cpp is loading the model"
UNAUTHORIZED_ERROR = "Unauthorized"
NOT_IMPLEMENTED_ERROR = "Not implemented"
UNEXPECTED_STATUS_ERROR = "Unexpected response status"


class TransportFailure(enum.Enum):
    """Why no HTTP status came back from `/slots`."""

    CONNECT = "connect"
    """No connection: refused, unreachable, name not resolved."""
    REQUEST = "request"
    """Connected, but the exchange failed: timeout, reset, closed before an answer."""
    DECODE = "decode"
    """An answer started but could not be read: malformed HTTP, broken body encoding."""


class Health(enum.Enum):
    """What `/health` said, when the agent asked."""

    UNKNOWN = "unknown"
    """Not asked, or no clear answer."""
    OK = "ok"
    LOADING = "loading"
    """503: llama-server is up but still loading the model."""


@dataclass(frozen=True, slots=True)
class SlotsAnswer:
    """`/slots` answered with an HTTP status and a body."""

    status: int
    body: bytes


@dataclass(frozen=True, slots=True)
class SlotsFailure:
    """`/slots` gave no HTTP answer; `reason` is a short lower-case phrase for the error text."""

    kind: TransportFailure
    reason: str


SlotsOutcome = SlotsAnswer | SlotsFailure


@dataclass(frozen=True, slots=True)
class ServerFacts:
    """What `/props` said about the server, as far as it is known."""

    model: str | None = None
    total_slots: int | None = None


@dataclass(frozen=True, slots=True)
class AgentIdentity:
    """The parts of every status that come from the agent's own flags."""

    external_llamacpp_addr: str
    agent_name: str | None = None
    monitoring_interval_ms: int = 1000


def status_from_poll(
    outcome: SlotsOutcome,
    *,
    slots_url: str,
    identity: AgentIdentity,
    facts: ServerFacts = ServerFacts(),
    health: Health = Health.UNKNOWN,
    sequence: int = 0,
    is_draining: bool = False,
) -> StatusUpdate:
    """The status to report after one poll of `slots_url` whose result was `outcome`."""
    common = _Common(identity, facts, sequence, is_draining)
    if isinstance(outcome, SlotsFailure):
        if health is Health.LOADING:
            return common.issue(LOADING_ERROR, _transport_flags(outcome.kind))
        error = f"Request to {slots_url} failed: {outcome.reason}"
        return common.issue(error, _transport_flags(outcome.kind))

    answered = {
        "is_connect_error": False,
        "is_decode_error": False,
        "is_request_error": False,
    }
    if outcome.status == 200:
        slots = _decode_slots(outcome.body)
        if isinstance(slots, str):
            return common.issue(
                f"Llama.cpp's {slots_url} answer is not a list of slots: {slots}",
                {
                    **answered,
                    "is_authorized": True,
                    "is_deserialize_error": True,
                    "is_slots_endpoint_enabled": True,
                    "is_unexpected_response_status": False,
                },
            )
        return common.healthy(slots)
    if outcome.status == 401:
        return common.issue(
            UNAUTHORIZED_ERROR,
            {
                **answered,
                "is_authorized": False,
                "is_unexpected_response_status": False,
            },
        )
    if outcome.status == 501:
        # llama-server checks the API key before routing, so a 501 means the key was accepted.
        return common.issue(
            NOT_IMPLEMENTED_ERROR,
            {
                **answered,
                "is_authorized": True,
                "is_slots_endpoint_enabled": False,
                "is_unexpected_response_status": False,
            },
        )
    flags = {**answered, "is_unexpected_response_status": True}
    if outcome.status == 503 and health is Health.LOADING:
        return common.issue(LOADING_ERROR, flags)
    return common.issue(f"{UNEXPECTED_STATUS_ERROR} {outcome.status}", flags)


def _transport_flags(kind: TransportFailure) -> dict[str, bool | None]:
    return {
        "is_connect_error": kind is TransportFailure.CONNECT,
        "is_decode_error": kind is TransportFailure.DECODE,
        "is_request_error": kind is TransportFailure.REQUEST,
    }


def _decode_slots(body: bytes) -> list[SlotStatus] | str:
    """The slots in a `/slots` body, or why it is not a list of slots."""
    try:
        decoded: list[LlamaSlot] = slots_decoder.decode(body)
    except msgspec.DecodeError as error:
        return str(error)
    for slot in decoded:
        # A balancer rejects the whole status line if a count is negative.
        if slot.id < 0 or slot.n_ctx < 0:
            return f"slot {slot.id} has a negative id or n_ctx"
    return [_slot_status(slot) for slot in decoded]


_MAX_COUNT = 2**63 - 1
"""Largest count a status line carries (msgspec encodes ints as 64-bit)."""


def _count(value: Any, *, least: int = 0) -> int | None:
    """`value` if it is an integer from `least` to `_MAX_COUNT`, else None."""
    if isinstance(value, int) and not isinstance(value, bool) and least <= value <= _MAX_COUNT:
        return value
    return None


def _slot_status(slot: LlamaSlot) -> SlotStatus:
    next_token = slot.next_token
    if isinstance(next_token, list) and len(next_token) == 1:
        next_token = next_token[0]
    if not isinstance(next_token, dict):
        next_token = {}
    return SlotStatus(
        slot.id,
        slot.is_processing,
        slot.n_ctx,
        id_task=_count(slot.id_task),
        n_decoded=_count(next_token.get("n_decoded")),
        n_remain=_count(next_token.get("n_remain"), least=-1),
    )


def restarted(before: Sequence[SlotStatus], now: Sequence[SlotStatus]) -> bool:
    """Whether llama-server restarted between two healthy polls that saw these slots.

    Task ids only grow while a server runs, so a slot whose task id went back, or that had a
    task and now has none, belongs to a new process (a restart, or a model reload in router
    mode), which may serve another model with the same number of slots.
    """
    tasks = {slot.id: slot.id_task for slot in before if slot.id_task is not None}
    for slot in now:
        previous = tasks.get(slot.id)
        if previous is not None and (slot.id_task is None or slot.id_task < previous):
            return True
    return False


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT - 1] + "…"


@dataclass(frozen=True, slots=True)
class _Common:
    identity: AgentIdentity
    facts: ServerFacts
    sequence: int
    is_draining: bool

    def _status(self, **fields: object) -> StatusUpdate:
        base = StatusUpdate(
            external_llamacpp_addr=self.identity.external_llamacpp_addr,
            agent_name=_clip(self.identity.agent_name),
            model=_clip(self.facts.model),
            monitoring_interval_ms=max(1, self.identity.monitoring_interval_ms),
            sequence=max(0, self.sequence),
            is_draining=self.is_draining,
        )
        return msgspec.structs.replace(base, **fields)

    def healthy(self, slots: list[SlotStatus]) -> StatusUpdate:
        processing = sum(1 for slot in slots if slot.is_processing)
        return self._status(
            error=None,
            is_authorized=True,
            is_connect_error=False,
            is_decode_error=False,
            is_deserialize_error=False,
            is_request_error=False,
            is_slots_endpoint_enabled=True,
            is_unexpected_response_status=False,
            slots_idle=len(slots) - processing,
            slots_processing=processing,
            slots_total=len(slots),
            slots=slots,
        )

    def issue(self, error: str, flags: Mapping[str, bool | None]) -> StatusUpdate:
        # The server still has its slots, they are just unusable: report how many it has.
        total = self.facts.total_slots
        return self._status(
            error=_clip(error),
            slots_idle=0,
            slots_processing=0,
            slots_total=total if total is not None and total > 0 else 0,
            **flags,
        )
