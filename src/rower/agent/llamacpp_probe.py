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

What the server serves comes from `/props` (`facts_from_props`: a router or not) and
`/v1/models` (`model_listing`: each model's id, aliases and, in router mode, load state). A
router's poll (`router_status_from_poll`) is its `/v1/models` plus one `/slots?model=` per
loaded model: the list failing is the server's issue, one model's slots failing is that
model's own error. Names a balancer would refuse are left out rather than sent.
"""

from __future__ import annotations

import enum
import posixpath
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from rower.llamacpp import LlamaSlot, models_decoder, props_decoder, slots_decoder
from rower.status import ModelStatus, SlotStatus, StatusUpdate

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
    """What `/props` and `/v1/models` said about the server, as far as it is known."""

    model: str | None = None
    """The id clients send as `model` (`/v1/models` `data[0].id`); None for a router."""
    total_slots: int | None = None
    aliases: tuple[str, ...] = ()
    """The model's other names (`/v1/models` `aliases` but the id)."""
    is_router: bool = False
    """`/props` says `"role": "router"`: the server runs one child per model (`--models-dir`)."""


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
    failed = exchange_issue(outcome, url=slots_url, health=health)
    if failed is not None:
        return common.issue(*failed)
    assert isinstance(outcome, SlotsAnswer)
    slots = _decode_slots(outcome.body)
    if isinstance(slots, str):
        return common.issue(
            f"Llama.cpp's {slots_url} answer is not a list of slots: {slots}", _UNREADABLE_FLAGS
        )
    return common.healthy(slots)


_ANSWERED = {"is_connect_error": False, "is_decode_error": False, "is_request_error": False}
_UNREADABLE_FLAGS = {
    **_ANSWERED,
    "is_authorized": True,
    "is_deserialize_error": True,
    "is_slots_endpoint_enabled": True,
    "is_unexpected_response_status": False,
}


def exchange_issue(
    outcome: SlotsOutcome, *, url: str, health: Health = Health.UNKNOWN
) -> tuple[str, dict[str, bool | None]] | None:
    """The error text and flags for an exchange with `url` that did not answer 200, else None.

    The table of SPEC section 2, for `/slots` and (in router mode) `/v1/models` alike.
    """
    if isinstance(outcome, SlotsFailure):
        if health is Health.LOADING:
            return LOADING_ERROR, _transport_flags(outcome.kind)
        return f"Request to {url} failed: {outcome.reason}", _transport_flags(outcome.kind)
    if outcome.status == 200:
        return None
    if outcome.status == 401:
        return UNAUTHORIZED_ERROR, {
            **_ANSWERED,
            "is_authorized": False,
            "is_unexpected_response_status": False,
        }
    if outcome.status == 501:
        # llama-server checks the API key before routing, so a 501 means the key was accepted.
        return NOT_IMPLEMENTED_ERROR, {
            **_ANSWERED,
            "is_authorized": True,
            "is_slots_endpoint_enabled": False,
            "is_unexpected_response_status": False,
        }
    flags: dict[str, bool | None] = {**_ANSWERED, "is_unexpected_response_status": True}
    if outcome.status == 503 and health is Health.LOADING:
        return LOADING_ERROR, flags
    return f"{UNEXPECTED_STATUS_ERROR} {outcome.status}", flags


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


# --- What the server serves: `/props` and `/v1/models` -----------------------------------------

MAX_NAME = 256
"""Longest model name or alias a balancer accepts (`rower.status.ModelName`)."""
MAX_ALIASES = 64
"""Most aliases of one model a balancer accepts (`rower.status.Aliases`)."""
MAX_MODELS = 256
"""Most models of one router a balancer accepts (`StatusUpdate.models`)."""
ROUTER_ROLE = "router"
LOADED = "loaded"
"""The one `/v1/models` `status.value` whose model has a running child with slots to poll."""


def facts_from_props(body: bytes) -> ServerFacts | str:
    """What a `/props` answer says, or why it cannot be read.

    The model is `model_alias` (llama-server sets it to the `-m` path when no `--alias` is
    given), else the file name of `model_path`: the names `/v1/models` gives, when the agent
    cannot read those. A router's `/props` names no model of its own: its `model_alias` is a
    placeholder ("llama-server").
    """
    try:
        props = props_decoder.decode(body)
    except msgspec.DecodeError as error:
        return str(error)
    if props.role == ROUTER_ROLE:
        return ServerFacts(is_router=True)
    model = props.model_alias or (
        posixpath.basename(props.model_path.replace("\\", "/")) if props.model_path else None
    )
    return ServerFacts(model=model or None, total_slots=props.total_slots)


@dataclass(frozen=True, slots=True)
class ListedModel:
    """One model of a `/v1/models` answer."""

    name: str
    """Its id: the name clients send as `model`."""
    aliases: tuple[str, ...] = ()
    """Its other names (the id left out)."""
    state: str | None = None
    """Router mode: `status.value` (`loaded`, `unloaded`, `loading`, `sleeping`, ...); a
    single-model server's answer has none."""
    failure: str | None = None
    """Router mode: why its last load failed, when it did."""

    @property
    def is_loaded(self) -> bool:
        """Whether it has a running child whose slots can be read without waking or loading it."""
        return self.state == LOADED


@dataclass(frozen=True, slots=True)
class ListingIssue:
    """`/v1/models` did not give a list of models: the error text and flags to report."""

    error: str
    flags: Mapping[str, bool | None]


def read_model_list(body: bytes) -> list[ListedModel] | str:
    """The models of a `/v1/models` answer, or why it is not a list of models.

    An entry whose id is not a name a balancer accepts (a string of 1 to 256 characters) is
    left out, and so is such an alias, a repeated entry or a repeated alias: one odd name must
    not make a balancer refuse the whole status line.
    """
    try:
        answer = models_decoder.decode(body)
    except msgspec.DecodeError as error:
        return str(error)
    listed: list[ListedModel] = []
    seen: set[str] = set()
    for entry in answer.data:
        name = _name(entry.id)
        if name is None or name in seen:
            continue
        seen.add(name)
        aliases: dict[str, None] = {}
        for value in entry.aliases if isinstance(entry.aliases, list) else ():
            alias = _name(value)
            if alias is not None and alias != name and len(aliases) < MAX_ALIASES:
                aliases[alias] = None
        state, failure = _load_state(entry.status)
        listed.append(ListedModel(name, tuple(aliases), state, failure))
    return listed


def model_listing(outcome: SlotsOutcome, *, models_url: str) -> list[ListedModel] | ListingIssue:
    """What one `GET /v1/models` gave: the models, or the issue to report (SPEC 2's table)."""
    failed = exchange_issue(outcome, url=models_url)
    if failed is not None:
        return ListingIssue(*failed)
    assert isinstance(outcome, SlotsAnswer)
    listed = read_model_list(outcome.body)
    if isinstance(listed, str):
        return ListingIssue(
            f"Llama.cpp's {models_url} answer is not a list of models: {listed}", _UNREADABLE_FLAGS
        )
    return listed


def with_model_list(facts: ServerFacts, listed: Sequence[ListedModel]) -> ServerFacts:
    """`facts` of a single-model server, named as its `/v1/models` answer names its model.

    That answer's id is what clients send as `model` (`--alias NAME` makes it NAME); `/props`
    alone cannot tell the other aliases.
    """
    if facts.is_router or not listed:
        return facts
    first = listed[0]
    return ServerFacts(
        model=first.name, total_slots=facts.total_slots, aliases=first.aliases, is_router=False
    )


def _name(value: Any) -> str | None:
    if isinstance(value, str) and 0 < len(value) <= MAX_NAME:
        return value
    return None


def _load_state(status: Any) -> tuple[str | None, str | None]:
    if not isinstance(status, dict):
        return None, None
    value = status.get("value")
    state = value if isinstance(value, str) else "unknown"
    if status.get("failed") is not True:
        return state, None
    code = _count(status.get("exit_code"), least=-(2**31))
    exited = f" (its process exited with status {code})" if code is not None else ""
    return state, f"llama-server could not load this model{exited}; see its log"


# --- Router mode: one child server per model ---------------------------------------------------


def model_slots_path(model: str) -> str:
    """The path that asks a router for one model's slots, never loading it.

    `autoload=false` makes the router answer 400 "model is not loaded" for a model that is not
    running, instead of loading it (and unloading another beyond `--models-max`): the agent
    only asks for models `/v1/models` says are loaded, and a model unloaded in between must
    stay unloaded.
    """
    return f"/slots?{urllib.parse.urlencode({'model': model, 'autoload': 'false'})}"


def reported_models(listed: Sequence[ListedModel]) -> list[ListedModel]:
    """The models a status carries: all of them, or the first `MAX_MODELS`, loaded ones first."""
    if len(listed) <= MAX_MODELS:
        return list(listed)
    loaded = [model for model in listed if model.is_loaded]
    return (loaded + [model for model in listed if not model.is_loaded])[:MAX_MODELS]


def models_to_poll(listed: Sequence[ListedModel]) -> list[str]:
    """The models whose slots one poll reads: the loaded ones a status carries.

    Asking a router for the slots of a model that is not loaded would load it (or, with
    `autoload=false`, fail); a sleeping one would wake up. Neither is the agent's to decide.
    """
    return [model.name for model in reported_models(listed) if model.is_loaded]


def router_status_from_poll(
    listing: list[ListedModel] | ListingIssue,
    model_slots: Mapping[str, SlotsOutcome],
    *,
    base_url: str,
    identity: AgentIdentity,
    facts: ServerFacts = ServerFacts(is_router=True),
    sequence: int = 0,
    is_draining: bool = False,
    known_totals: Mapping[str, int] | None = None,
) -> StatusUpdate:
    """The status of a router-mode server after one poll.

    `listing` is what `/v1/models` gave (`model_listing`): when it failed, the server has an
    issue, as a single-model server whose `/slots` failed. Otherwise the server is healthy,
    even with no model loaded, and every model it lists is reported: a loaded one with the
    slots `model_slots[name]` (its `GET base_url + model_slots_path(name)`) gave, or with its
    own error when that failed; one that is not loaded with no slots. The top-level counts
    are the sums over the models, the top-level `slots` list stays empty. `known_totals` are
    the models' slot counts at the previous poll: a loaded model whose slots could not be
    read still has them, they are just unusable.
    """
    router_facts = ServerFacts(is_router=True) if not facts.is_router else facts
    common = _Common(identity, router_facts, sequence, is_draining)
    if isinstance(listing, ListingIssue):
        return common.issue(listing.error, listing.flags)
    totals = known_totals or {}
    models = [
        _model_status(
            model,
            model_slots.get(model.name),
            url=base_url + model_slots_path(model.name),
            known_total=totals.get(model.name, 0),
        )
        for model in reported_models(listing)
    ]
    return common.router(models)


def _model_status(
    model: ListedModel, outcome: SlotsOutcome | None, *, url: str, known_total: int
) -> ModelStatus:
    status = ModelStatus(
        model.name, aliases=list(model.aliases), is_loaded=model.is_loaded, error=model.failure
    )
    if not model.is_loaded:
        return status
    unusable = msgspec.structs.replace(status, slots_total=max(0, known_total))
    if outcome is None:
        return msgspec.structs.replace(unusable, error=f"{url} was not asked")
    failed = exchange_issue(outcome, url=url)
    if failed is not None:
        error = failed[0]
        if isinstance(outcome, SlotsAnswer):
            said = _llamacpp_message(outcome.body)
            error = f"{error} from {url}" + (f": {said}" if said else "")
        return msgspec.structs.replace(unusable, error=_clip(error))
    assert isinstance(outcome, SlotsAnswer)
    slots = _decode_slots(outcome.body)
    if isinstance(slots, str):
        error = f"Llama.cpp's {url} answer is not a list of slots: {slots}"
        return msgspec.structs.replace(unusable, error=_clip(error))
    processing = sum(1 for slot in slots if slot.is_processing)
    return msgspec.structs.replace(
        status,
        slots_idle=len(slots) - processing,
        slots_processing=processing,
        slots_total=len(slots),
        slots=slots,
    )


def _llamacpp_message(body: bytes) -> str | None:
    """The `error.message` of llama.cpp's error JSON, shortened, if `body` is one."""
    try:
        decoded = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    error = decoded.get("error") if isinstance(decoded, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    if isinstance(message, str) and message.strip():
        return message.strip()[:300]
    return None


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_TEXT:
        return text
    return text[: MAX_TEXT - 1] + "…"


_HEALTHY_FLAGS: dict[str, Any] = {
    "error": None,
    "is_authorized": True,
    "is_connect_error": False,
    "is_decode_error": False,
    "is_deserialize_error": False,
    "is_request_error": False,
    "is_slots_endpoint_enabled": True,
    "is_unexpected_response_status": False,
}


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
            model_aliases=list(self.facts.aliases),
            is_router=self.facts.is_router,
            monitoring_interval_ms=max(1, self.identity.monitoring_interval_ms),
            sequence=max(0, self.sequence),
            is_draining=self.is_draining,
        )
        return msgspec.structs.replace(base, **fields)

    def healthy(self, slots: list[SlotStatus]) -> StatusUpdate:
        processing = sum(1 for slot in slots if slot.is_processing)
        return self._status(
            **_HEALTHY_FLAGS,
            slots_idle=len(slots) - processing,
            slots_processing=processing,
            slots_total=len(slots),
            slots=slots,
        )

    def router(self, models: list[ModelStatus]) -> StatusUpdate:
        return self._status(
            **_HEALTHY_FLAGS,
            slots_idle=sum(model.slots_idle for model in models),
            slots_processing=sum(model.slots_processing for model in models),
            slots_total=sum(model.slots_total for model in models),
            models=models,
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
