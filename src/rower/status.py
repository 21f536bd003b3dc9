"""Wire formats shared by the agent, the balancer, the dashboards and the tests.

`StatusUpdate` is one NDJSON line of the agent -> balancer stream; `AgentView` and `FleetView`
are what the management API and its SSE stream answer. Field names are Paddler's, so scripts
written against Paddler 1.x keep working; Rower's additions come after them. `decode_status`
and `checked_status` are the balancer's gate for status lines: what they refuse is never acted on.
"""

from __future__ import annotations

import time
from typing import Annotated

import msgspec

from rower.addresses import Address, AddressError

MAX_INTERVAL_MS = 60_000
"""Longest reporting interval a balancer accepts: an agent is stale after 3 of them, so a larger
one would let an agent that stopped reporting be trusted for minutes."""

MAX_POLL_AGE_MS = 2 * MAX_INTERVAL_MS
"""Oldest poll a status line may speak for when sent (`poll_age_ms`): the newest poll is at
most an interval plus the poll's own timeouts old, so twice the longest interval leaves room."""

NonNegative = Annotated[int, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
ShortText = Annotated[str, msgspec.Meta(max_length=4096)]


class SlotStatus(msgspec.Struct, frozen=True):
    """One llama-server slot as the agent saw it."""

    id: NonNegative
    is_processing: bool
    n_ctx: NonNegative = 0
    # Progress of the task the slot holds (or last held), for routing that waits for a slot.
    id_task: NonNegative | None = None
    """llama-server's task id: grows for the server's whole life, so a smaller one means a
    restart (the balancer then forgets what it sent there)."""
    n_decoded: NonNegative | None = None
    """Tokens generated so far by the slot's task."""
    n_remain: Annotated[int, msgspec.Meta(ge=-1)] | None = None
    """Tokens the task may still generate; -1 when it has no limit."""


ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
Aliases = Annotated[list[ModelName], msgspec.Meta(max_length=64)]


class ModelStatus(msgspec.Struct, frozen=True):
    """One model of a router-mode llama-server (`--models-dir`), as the agent saw it.

    A loaded model has its own child server and slots (`/slots?model=NAME`); an unloaded one
    has none, and a request naming it makes the router load it.
    """

    model: ModelName
    aliases: Aliases = msgspec.field(default_factory=list)
    is_loaded: bool = False
    error: ShortText | None = None
    """Why this model cannot take work now (its `/slots?model=` failed), or None."""
    slots_idle: NonNegative = 0
    slots_processing: NonNegative = 0
    slots_total: NonNegative = 0
    slots: list[SlotStatus] = msgspec.field(default_factory=list)


class StatusUpdate(msgspec.Struct, frozen=True):
    """What an agent knows about its llama-server at one poll."""

    external_llamacpp_addr: Annotated[str, msgspec.Meta(min_length=3, max_length=300)]
    agent_name: ShortText | None = None
    error: ShortText | None = None
    is_authorized: bool | None = None
    is_connect_error: bool | None = None
    is_decode_error: bool | None = None
    is_deserialize_error: bool | None = None
    is_request_error: bool | None = None
    is_slots_endpoint_enabled: bool | None = None
    is_unexpected_response_status: bool | None = None
    slots_idle: NonNegative = 0
    slots_processing: NonNegative = 0
    # Rower's additions.
    slots_total: NonNegative = 0
    model: ShortText | None = None
    monitoring_interval_ms: Annotated[int, msgspec.Meta(ge=1, le=MAX_INTERVAL_MS)] = 1000
    sequence: NonNegative = 0
    is_draining: bool = False
    slots: list[SlotStatus] = msgspec.field(default_factory=list)
    # Multi-model fleets (docs/models.md).
    model_aliases: Aliases = msgspec.field(default_factory=list)
    """Other names the server's model answers to (`/v1/models` `aliases`)."""
    is_router: bool = False
    """The server runs in router mode: `models` says what it serves, and the slot counts above
    are their sums (what a balancer that knows nothing of models may use)."""
    models: Annotated[list[ModelStatus], msgspec.Meta(max_length=256)] = msgspec.field(
        default_factory=list
    )
    poll_age_ms: Annotated[float, msgspec.Meta(ge=0, le=MAX_POLL_AGE_MS)] | None = None
    """How long before this line was sent the agent's poll of `/slots` ended, on the agent's
    own clock (an age, so no clocks need to agree). The balancer frees at once the slots of its
    requests that ended after the poll (docs/decisions.md); None from older agents."""

    @property
    def has_issue(self) -> bool:
        """Whether the agent says its llama-server cannot take work now."""
        return self.error is not None


class SystemTime(msgspec.Struct, frozen=True):
    """A wall-clock instant in Rust's `SystemTime` serde shape, as Paddler's API had it."""

    secs_since_epoch: int
    nanos_since_epoch: int

    @classmethod
    def from_timestamp(cls, seconds: float) -> SystemTime:
        """From a `time.time()` value."""
        whole = int(seconds)
        return cls(whole, int((seconds - whole) * 1_000_000_000))

    @classmethod
    def now(cls) -> SystemTime:
        """The current wall-clock time."""
        return cls.from_timestamp(time.time())

    def timestamp(self) -> float:
        """Back to a `time.time()` value."""
        return self.secs_since_epoch + self.nanos_since_epoch / 1_000_000_000


class AgentView(msgspec.Struct, frozen=True):
    """One agent in `/api/v1/agents`: Paddler's shape plus Rower's extra keys."""

    agent_id: str
    last_update: SystemTime
    quarantined_until: SystemTime | None
    slots_taken: int
    slots_taken_since_last_status_update: int
    status: StatusUpdate
    # Rower's additions.
    is_usable: bool
    is_stale: bool
    slots_free: int
    unusable_reasons: list[str] = msgspec.field(default_factory=list)
    """Why no request goes there now, in this order: `issue` (the agent reports one), `stale`
    (reports stopped), `quarantined` (refused a connection), `draining`. Empty when usable; an
    unusable agent's `status.slots_idle` is 0, so idle sums are the capacity requests can use."""
    prompt_tokens_evaluated: int = 0
    """Prompt tokens its llama-server computed for this balancer's requests (`timings.prompt_n`)."""
    prompt_tokens_cached: int = 0
    """Prompt tokens it reused from its prompt cache for them (`timings.cache_n`)."""


class ModelSummary(msgspec.Struct, frozen=True):
    """One model's share of the fleet: its servers' slots and its own buffer.

    The counts are sums over the agents serving the model, as `/api/v1/agents` shows them
    (idle excludes unusable servers), except a router's model that is not loaded: its one slot
    for the request that loads it is not idle capacity, and it is not counted in `agents`.
    """

    model: str
    """The model id; `""` for servers whose agent names no model."""
    agents: int = 0
    """Entries of `agents` serving it (a router's loaded models are one entry each)."""
    slots_idle: int = 0
    slots_processing: int = 0
    slots_total: int = 0
    requests_buffered: int = 0
    """Requests waiting in this model's buffer (or for their home server)."""


class FleetView(msgspec.Struct, frozen=True):
    """The body of `/api/v1/agents` and of each `/api/v1/agents/stream` event."""

    agents: list[AgentView]
    requests_buffered: int = 0
    requests_in_flight: int = 0
    """Requests relayed now, on any upstream (even one whose agent left)."""
    models: list[ModelSummary] = msgspec.field(default_factory=list)
    """Per model, sorted by id: every model an agent serves, declared ones (`--model`) too,
    and any with requests waiting. Every agent is counted in exactly one."""


status_decoder = msgspec.json.Decoder(StatusUpdate)
fleet_decoder = msgspec.json.Decoder(FleetView)
json_encoder = msgspec.json.Encoder()


class StatusRefused(ValueError):
    """A status line the balancer does not take; the message says what was refused and why."""


def decode_status(line: bytes) -> StatusUpdate:
    """One NDJSON status line, decoded.

    Raises:
        StatusRefused: the line is not UTF-8, not JSON, or not a `StatusUpdate`.
    """
    try:
        return status_decoder.decode(line)
    except msgspec.ValidationError as error:
        raise StatusRefused(f"invalid status update: {error}") from None
    except msgspec.DecodeError as error:
        raise StatusRefused(f"status update is not JSON: {error}") from None
    except UnicodeDecodeError as error:
        # msgspec checks UTF-8 inside strings, and says so with this error.
        raise StatusRefused(f"status update is not UTF-8: a string has {error.reason}") from None


def checked_status(status: StatusUpdate, *, max_slots: int) -> StatusUpdate:
    """`status` with its address in canonical form, if a balancer may act on it.

    The address must be `HOST:PORT` and nothing else (it becomes the URL the proxy connects
    to), and the slot counts must be at most `max_slots` and agree with each other (they become
    capacity that the proxy fills and that autoscalers read).

    Raises:
        StatusRefused: naming the field and what is wrong with it.
    """
    try:
        address = Address.parse(status.external_llamacpp_addr)
    except AddressError as error:
        raise StatusRefused(f"external_llamacpp_addr refused: {error}") from None
    if address.is_unspecified:
        raise StatusRefused(
            f"external_llamacpp_addr refused: {address} means every local address and none to "
            "connect to; report the address balancers reach llama-server at "
            "(--external-llamacpp-addr)"
        )
    counts = {
        "slots_total": status.slots_total,
        "slots_idle + slots_processing": status.slots_idle + status.slots_processing,
        "the slots list": len(status.slots),
    }
    for what, count in counts.items():
        if count > max_slots:
            raise StatusRefused(
                f"{what} is {count}: a balancer takes at most {max_slots} slots per agent "
                "(its --max-slots-per-agent)"
            )
    if status.slots_total and counts["slots_idle + slots_processing"] > status.slots_total:
        raise StatusRefused(
            f"slots_idle + slots_processing ({counts['slots_idle + slots_processing']}) is more "
            f"than slots_total ({status.slots_total})"
        )
    canonical = str(address)
    if canonical == status.external_llamacpp_addr:
        return status
    return msgspec.structs.replace(status, external_llamacpp_addr=canonical)
