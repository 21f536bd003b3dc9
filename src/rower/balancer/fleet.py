"""The balancer's state: every upstream's slots, the requests in flight, and the buffer.

Everything that decides where a request goes lives here, and nothing else does: no sockets, no
asyncio, no clock. Callers feed events (a report arrived, a request wants a slot, a request
finished, a client left, an upstream refused a connection, an agent left, time passed) and get
back decisions (dispatch this request there, it waits, it is rejected). `now` is a monotonic
time in seconds and `wall` a `time.time()` value, both given by the caller.

How free slots are counted. An agent reports what its llama-server's `/slots` said at one poll.
Between two polls this balancer keeps dispatching and finishing requests, so the report is
corrected with what the balancer knows for certain:

- `in_flight`: requests this balancer has open to the upstream right now.
- `foreign`: slots busy with work that is not ours (another balancer, a direct client), estimated
  at each report as `processing - in_flight`, never below 0. A report that says how old its
  poll is (`poll_age_ms`) is corrected to the poll's moment: `processing - ours`, where ours are
  the requests sent before the poll that were in flight then (still running, or ended since),
  so a request that ended between the poll and the report frees its slot at once.
- `abandoned`: an upper bound of our requests whose client left while llama-server may still
  run them (it keeps generating a non-streamed answer whose client is gone). Each one counts
  until a report shows it cannot be running any more: at most `processing - old` of them can
  be, where `old` are our requests in flight since before the previous report, which the poll
  surely saw, plus those abandoned that were sent since (the poll may have missed them while
  they were in transit, and they still run).
- free slots = `total - in_flight - max(foreign, abandoned)`, never below 0.

A finished request frees its slot at once (no waiting for the next poll, which is what makes
Paddler's buffer slow), and a request sent after the poll is never counted twice. When this
balancer is the only client of a llama-server, `foreign` counts only abandoned work, `abandoned`
bounds it from above, and `in_flight` plus what still runs never exceeds `total`: no request is
ever sent to a server without a free slot. (This assumes a request reaches llama-server within
one reporting interval of being sent.)

One llama-server, one upstream. An agent restarted with a new id reports the same address while
the old one may still hold its stream open (frozen, or not yet noticed gone). The agent that
registered last for an address supersedes the older ones: they are dropped from the fleet, their
requests in flight move to the newcomer, and whatever they report later is ignored while the
newcomer is registered. So a server's slots are never counted twice.

Draining. An upstream is drained when its agent reports `is_draining` (it is stopping) or when an
operator asks (`drain`): it gets no new request; those in flight run to their end.

Models. Each upstream serves one model; a router-mode llama-server reports several, and each
loaded one is an upstream of its own (key `agent id/model`, identity `address/model`). The
upstreams of one model form a `Pool` with its own buffer and pick index, and a request goes to
the pool of the model it asks for (`models`): everything above holds per pool.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec

from rower.balancer.affinity import BLOCK_BYTES
from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.cache_routing import (
    Affinity,
    CachePick,
    conversation_of,
    fewest_conversations,
    home_of,
    pick_cached,
)
from rower.balancer.models import UNKNOWN, ModelNames, ModelRefusal, ModelRules
from rower.balancer.pool import Homing, Pool
from rower.balancer.prefix_memory import DEFAULT_MAX_ENTRIES, Placement, PrefixMemory
from rower.balancer.recent_conversations import RecentConversations
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream import BYTES_PER_TOKEN, SlotAccounting, Upstream, blend
from rower.balancer.waiting_line import Waiter
from rower.status import AgentView, StatusUpdate, SystemTime

EVICTED_BELOW = 0.5
"""A turn sent back to its server that reuses less than this share of the prefix the balancer
believed it held means the server evicted it."""

SPILL_COST = 3.0
"""What a spill costs, in prefills of the prompt the home server holds: one now, and more later
for the conversations it pushes out of the other server's cache. A judgement, not a fit: single
quick runs of the affinity benchmark could not tell 2 from 3 apart."""

MAX_AFFINITY_WAIT = 2.0
"""Longest a request waits for the busy server holding its prefix while another has a free
slot (seconds); it never waits longer than the spill it avoids would cost, either."""


BUFFER_PATIENCE = MAX_AFFINITY_WAIT
"""Longest a request in the buffer lets a server's freed slot go to younger requests whose
prefix that server holds (seconds)."""


class Routing(enum.Enum):
    """How the fleet picks among upstreams with a free slot (`--routing`)."""

    CACHE_AWARE = "cache-aware"
    """Back to the server holding the request's prefix while it has a free slot
    (`cache_routing`)."""
    LEAST_BUSY = "least-busy"
    """Fewest busy slots, most free, least recently used (`upstream_index`)."""


class Dispatch(msgspec.Struct, frozen=True):
    """Send `request_id` to the llama-server at `upstream` (host:port), reported by `agent_id`."""

    request_id: int
    agent_id: str
    upstream: str
    affinity: Affinity | None = None
    """What the cache-aware pick did (None: the request had no prefix, or least-busy routing)."""
    matched_blocks: int = 0
    """Blocks of the request's prefix this balancer had sent that upstream before."""
    model: str = UNKNOWN
    """The model (pool) it was dispatched for."""
    rename_to: str | None = None
    """The model name to put in the request's body: set when the upstream is a router's model
    and the request named it otherwise (or not at all); a router knows only its own names."""
    newer_blocks: int = 0
    """Blocks of other conversations this balancer sent that upstream since it sent it the
    `matched_blocks` of this one (for `Fleet.answered`)."""
    placement: Placement | None = None
    """What the memory of prefixes recorded for it (None: nothing), for the other balancers
    (`Fleet.placed_by_peer`)."""


@dataclass(frozen=True, slots=True)
class Buffered:
    """`request_id` waits in its model's buffer for a free slot.

    With `until` (a `now` value) it waits for one server only, the one holding its prompt
    prefix, and at `until` at the latest goes wherever the load says (`Fleet.expire_waits`).
    """

    request_id: int
    until: float | None = None
    """When to call `Fleet.expire_waits` for it (a `now` value; None: never needed)."""
    model: str = UNKNOWN


@dataclass(frozen=True, slots=True)
class _Unit:
    """What one report says of one upstream: its key, its model if it is a router's, its
    status, and whether it is a router's model not loaded yet (`Upstream.cold`)."""

    key: str
    router_model: str | None
    status: StatusUpdate
    cold: bool = False


class RejectReason(enum.Enum):
    """Why a request could neither be dispatched nor buffered."""

    BUFFER_FULL = "buffer_full"
    BUFFER_DISABLED = "buffer_disabled"
    MODEL_UNNAMED = "model_unnamed"
    MODEL_UNKNOWN = "model_unknown"


@dataclass(frozen=True, slots=True)
class Rejected:
    """`request_id` is refused at once: the buffer is full or disabled, or the model is wrong.

    `model` is the model it asked for (or was sent to); `served`, for a wrong model, the models
    the fleet serves.
    """

    request_id: int
    reason: RejectReason
    model: str | None = None
    served: tuple[str, ...] = ()


Decision = Dispatch | Buffered | Rejected


class Fleet:
    """All upstreams, the requests in flight, and each model's buffer of waiting requests.

    Args:
        max_buffered: most requests that may wait at once per model (unless `models` says
            otherwise for one); 0 means never wait.
        slot_accounting: how free slots are counted between reports.
        max_agents: most agents registered at once (a newcomer for a known server replaces
            its agent, so it is always admitted); None for no limit.
        routing: how a request's upstream is picked among those with a free slot.
        prompt_cache_contexts: how many slot contexts' worth of prompts one llama-server is
            assumed to keep (its slots plus its host-RAM prompt cache, `--cache-ram`): bounds
            the memory of what was sent to it.
        prefix_memory_entries: most entries in the memory of prefixes, over all servers.
        models: the operator's rules about models (declared ones, default, renames, limits).
    """

    def __init__(
        self,
        *,
        max_buffered: int,
        slot_accounting: SlotAccounting = SlotAccounting.ROWER,
        max_agents: int | None = None,
        routing: Routing = Routing.CACHE_AWARE,
        prompt_cache_contexts: int = 8,
        prefix_memory_entries: int = DEFAULT_MAX_ENTRIES,
        models: ModelRules | None = None,
        buffer_patience: float = BUFFER_PATIENCE,
    ) -> None:
        self.max_buffered = max_buffered
        self.routing = routing
        self.buffer_patience = buffer_patience
        """How long the oldest waiting request lets freed slots go to younger requests whose
        prefix their server holds (seconds; 0: first come first served)."""
        self.prompt_cache_contexts = prompt_cache_contexts
        self.prefixes = PrefixMemory(max_entries=prefix_memory_entries)
        self.conversations = RecentConversations()
        """The conversations each server served lately (where new ones go)."""
        self.bytes_per_token = float(BYTES_PER_TOKEN)
        """Bytes of conversation head per prompt token, measured from answers (4 until then)."""
        self.max_agents = max_agents
        self.slot_accounting = slot_accounting
        self.model_rules = models or ModelRules()
        self.upstreams: dict[str, Upstream] = {}
        """Every upstream by key (the agent id, or `agent id/model` for a router's models)."""
        self.pools: dict[str, Pool] = {}
        """Each model's upstreams and waiting requests."""
        self._agent_units: dict[str, set[str]] = {}
        """Each registered agent's upstream keys (one, or one per model of a router)."""
        self._waiting_in: dict[int, Pool] = {}
        """The pool each waiting request waits in."""
        self._assigned: dict[int, Upstream] = {}
        self._departed: dict[str, Upstream] = {}
        """Upstreams whose agent left while requests still ran there, by identity."""
        self._superseded: dict[str, bool] = {}
        """Upstreams (by key) replaced by a newer agent's for the same llama-server (their
        reports are ignored), and whether an operator had drained them."""
        self.superseded_by_last_report: list[str] = []
        """Agents the last `report` replaced (for the caller to log)."""
        self.router_reports: dict[str, StatusUpdate] = {}
        """The last report of each router-mode agent (what its models are)."""
        self._names: ModelNames | None = None
        """What model names mean (None: to be worked out again, after a change)."""
        self._dispatch_counter = itertools.count(1)
        self._registrations = itertools.count(1)
        for model in self.model_rules.declared:
            self._pool(model)
        self.revision = 0
        """Grows at every change an observer could see (for the SSE stream)."""
        self.quarantines = 0
        """Upstreams put in quarantine since start (for metrics)."""

    # Queries.

    @property
    def requests_buffered(self) -> int:
        """Requests waiting for a slot now (in a buffer, or for their home server)."""
        return sum(pool.buffered for pool in self.pools.values())

    @property
    def requests_in_flight(self) -> int:
        """Requests dispatched and not yet finished, on any upstream (even a departed one)."""
        return len(self._assigned)

    def buffered_by_model(self) -> dict[str, int]:
        """Requests waiting now, per model (declared models included, with 0)."""
        return {model: pool.buffered for model, pool in sorted(self.pools.items())}

    def is_waiting(self, request_id: int) -> bool:
        """Whether `request_id` waits (in a buffer, or for its home server)."""
        return request_id in self._waiting_in

    def is_homing(self, request_id: int) -> bool:
        """Whether `request_id` waits for the busy server holding its prefix."""
        pool = self._waiting_in.get(request_id)
        return pool is not None and request_id in pool.homing

    def upstream_of(self, request_id: int) -> str | None:
        """The agent id a dispatched request is counted against."""
        upstream = self._assigned.get(request_id)
        return upstream.agent_id if upstream is not None else None

    def admits(self, agent_id: str, address: str) -> bool:
        """Whether a report from `agent_id` for `address` may register it (`max_agents`)."""
        if self.max_agents is None or agent_id in self._agent_units:
            return True
        if len(self._agent_units) < self.max_agents:
            return True
        return any(u.address == address for u in self.upstreams.values())

    def is_superseded(self, agent_id: str) -> bool:
        """Whether a newer agent took over `agent_id`'s llama-server."""
        return agent_id in self._superseded or any(
            key.startswith(agent_id + "/") for key in self._superseded
        )

    @property
    def names(self) -> ModelNames:
        """The models the fleet serves and the names that reach them."""
        if self._names is None:
            servers = ((u.model, u.status.model_aliases) for u in self.upstreams.values())
            self._names = ModelNames.of(servers, self.model_rules.declared)
        return self._names

    def resolve(self, model: str | None) -> str | ModelRefusal:
        """The model whose servers a request naming `model` goes to, or why there is none."""
        return self.names.resolve(model, self.model_rules)

    def pick(self, now: float, model: str | None = None) -> Upstream | None:
        """The upstream for the next request of `model`: fewest busy slots, most free, least
        recently used; None when none has a free slot (or the model is not served).

        O(log n) amortized (`upstream_index`): a report, a dispatch and a release re-rank the
        upstream they touch; what only lowers an upstream (drain, quarantine, staleness,
        leaving) is noticed when its entry reaches the top of the index.
        """
        pool = self.pools.get(self._resolved_or_unknown(model))
        return pool.index.best(now) if pool is not None else None

    def pick_any(self, now: float, model: str | None = None) -> Upstream | None:
        """An upstream for a request that needs no slot (`/props`, `/tokenize`, ...).

        Of `model` when it names a served one (else of any model); prefers one with free
        slots, else any usable one, so such requests never wait.
        """
        resolved = self.resolve(model)
        pools = (
            [self.pools[resolved]]
            if isinstance(resolved, str) and resolved in self.pools
            else list(self.pools.values())
        )
        for pool in pools:
            chosen = pool.index.best(now)
            if chosen is not None:
                return chosen
        usable = [u for pool in pools for u in pool.members.values() if u.is_usable(now)]
        return min(usable, key=lambda u: u.last_dispatch, default=None)

    def views(self, now: float) -> list[AgentView]:
        """Every agent in Paddler's `/api/v1/agents` shape: usable first, then most idle.

        A router's models are one entry each (the same `agent_id`, each its `status.model`).
        """
        views = [self._view(u, now) for u in self.upstreams.values()]
        views.sort(key=lambda v: (not v.is_usable, -v.slots_free, -v.status.slots_idle))
        return views

    # Events.

    def report(
        self, agent_id: str, status: StatusUpdate, now: float, wall: float
    ) -> list[Dispatch]:
        """An agent reported; returns the buffered requests that can now be dispatched.

        The report of a superseded agent changes nothing while its successor is registered.
        """
        self.superseded_by_last_report = []
        dispatched: list[Dispatch] = []
        units = {unit.key: unit for unit in self._units(agent_id, status)}
        for key in self._agent_units.get(agent_id, set()) - units.keys():
            # A model the router no longer has loaded (or that another server loaded).
            self._remove_unit(key)
        for unit in units.values():
            dispatched.extend(self._report_unit(agent_id, unit, now, wall))
        if units:
            self._agent_units[agent_id] = set(units) & self.upstreams.keys()
        if not self._agent_units.get(agent_id):
            self._agent_units.pop(agent_id, None)
        self.revision += 1
        return dispatched

    def remove_agent(self, agent_id: str) -> None:
        """The agent's stream ended: forget its upstreams; their requests in flight run on.

        They stay counted against the llama-server, so an agent that comes back for the same
        server (restarted, new id) starts with them instead of seeing free slots.
        """
        for key in list(self._superseded):
            if key == agent_id or key.startswith(agent_id + "/"):
                del self._superseded[key]
        for key in self._agent_units.pop(agent_id, set()):
            self._remove_unit(key)
        self.router_reports.pop(agent_id, None)
        self.revision += 1

    def drain(self, agent_id: str) -> bool:
        """An operator drains an agent: no new requests go there; returns whether it is known."""
        keys = self._agent_units.get(agent_id)
        if not keys:
            return False
        for key in keys:
            upstream = self.upstreams[key]
            if not upstream.drain_requested:
                upstream.drain_requested = True
                self.revision += 1
        return True

    def request_slot(
        self,
        request_id: int,
        now: float,
        *,
        needs: RequestNeeds | None = None,
        retry: bool = False,
    ) -> Decision:
        """A request wants a slot: dispatch it, buffer it, or reject it.

        `needs` is what the proxy read from the request: its model picks the pool, its prefix
        steers the cache-aware pick. A retried request (its upstream refused the connection)
        goes to the head of its buffer: it has waited longest.
        """
        if request_id in self._waiting_in or request_id in self._assigned:
            raise ValueError(f"request {request_id} already holds or awaits a slot")
        resolved = self.resolve(needs.model if needs is not None else None)
        if isinstance(resolved, ModelRefusal):
            reason = (
                RejectReason.MODEL_UNNAMED if resolved.asked is None else RejectReason.MODEL_UNKNOWN
            )
            return Rejected(request_id, reason, resolved.asked, resolved.served)
        pool = self._pool(resolved)
        if not pool.waiting:
            pool.held.clear()
            decision = self._place(pool, request_id, needs, now, may_wait=not retry)
            if decision is not None:
                return decision
        home = self._home(pool, needs, now)
        if pool.held:
            held = self._take_held(pool, request_id, needs, now, home)
            if held is not None:
                return held
        if pool.max_buffered == 0:
            return Rejected(request_id, RejectReason.BUFFER_DISABLED, resolved)
        if pool.buffered >= pool.max_buffered and not retry:
            return Rejected(request_id, RejectReason.BUFFER_FULL, resolved)
        self._wait(pool, request_id, needs, now, first=retry, home=home)
        # A waiter with a home may make freed slots wait for it (`waiting_line`): the caller
        # calls `expire_waits` when its patience ends, and a held slot goes to whoever is due.
        if home is not None:
            until: float | None = now + self.buffer_patience
        else:
            # A new conversation lets the slots of fuller servers go, until then.
            waiter = pool.waiting.get(request_id)
            until = waiter.emptier_until if waiter is not None else None
        return Buffered(request_id, until, model=resolved)

    def release(self, request_id: int, now: float, *, abandoned: bool = False) -> list[Dispatch]:
        """A request finished (or failed, or its client left): free its slot.

        `abandoned`: the client left while llama-server may still be working on the request.
        llama-server notices a dropped stream at its next write, but keeps generating a
        non-streamed answer to its end; so the slot counts as busy with work that is not
        ours until the agent's next report tells what the server really does.

        Safe to call for any request id, any number of times.
        """
        pool = self._waiting_in.pop(request_id, None)
        if pool is not None:
            pool.waiting.remove(request_id)
            pool.homing.pop(request_id, None)
            self.revision += 1
            return []
        upstream = self._assigned.pop(request_id, None)
        if upstream is None:
            return []
        upstream.in_flight.discard(request_id)
        unseen = request_id in upstream.recent
        upstream.recent.discard(request_id)
        upstream.finished(request_id, now, abandoned=abandoned)
        if abandoned:
            # No longer ours, still busy: in this report's foreign work and in the bound.
            upstream.foreign += 1
            upstream.abandoned += 1
            upstream.abandoned_unseen += unseen
        if (
            not upstream.in_flight
            and not upstream.abandoned
            and self._departed.get(upstream.identity) is upstream
        ):
            # Kept while it may still run abandoned work: a returning agent inherits that.
            del self._departed[upstream.identity]
        self.revision += 1
        dispatched = self._drain_buffer(now, upstream)
        self._reindex(upstream, now)
        return dispatched

    def refused(self, request_id: int, now: float, wall: float) -> list[Dispatch]:
        """The upstream of `request_id` refused the connection: quarantine it, free the slot.

        The quarantine lasts until the agent's next report without an issue. The caller may
        then ask for a slot again with `retry=True`.
        """
        upstream = self._assigned.get(request_id)
        if upstream is not None:
            self._quarantine(upstream, wall)
            # It never reached llama-server: no poll counted it, and its duration is no answer's.
            upstream.sent_at.pop(request_id, None)
        return self.release(request_id, now)

    def answered(
        self,
        agent_id: str,
        timings: AnswerTimings,
        model: str = UNKNOWN,
        *,
        head_bytes: int = 0,
        matched_blocks: int = 0,
        newer_blocks: int = 0,
    ) -> None:
        """An answer from `agent_id`'s llama-server said what its prompt and generation took.

        `head_bytes`, the length of the request's conversation head, with the answer's prompt
        tokens, says how many bytes a token is for this fleet's prompts. `matched_blocks`, what
        the balancer believed the server held of the prompt, against what it reused, says how
        much the server really keeps: a prefix found gone shrinks what the memory believes it
        holds (a server evicts sooner than `--prompt-cache-contexts` assumed), one found there
        lets it grow back, up to that bound.
        """
        upstream = self.upstreams.get(agent_id) or self.upstreams.get(f"{agent_id}/{model}")
        if head_bytes >= BLOCK_BYTES and timings.total >= 64:
            self.bytes_per_token = blend(self.bytes_per_token, head_bytes / timings.total)
        if upstream is None:
            return
        upstream.measured(timings)
        if matched_blocks <= 0:
            return
        bound = self._configured_capacity(upstream)
        current = upstream.learned_capacity or bound
        expected = matched_blocks * BLOCK_BYTES / self.bytes_per_token
        if timings.cached < EVICTED_BELOW * expected:
            # The server evicted this conversation: of what the balancer sent it, it holds at
            # most the conversations sent since (`newer_blocks`), its cache being least recently
            # used first out, as the memory is. So everything older is gone too: forget it.
            upstream.learned_capacity = max(matched_blocks, min(current, newer_blocks))
            self.prefixes.trim(upstream.identity, upstream.learned_capacity)
        else:
            upstream.learned_capacity = min(bound, current + max(1, current // 20))

    def placed_by_peer(self, placement: Placement) -> bool:
        """Another balancer in front of the same llama-servers sent `placement.prefix` to
        `placement.server`: remember it as if this one had (returns False, remembering nothing,
        for a server this balancer does not know). So a conversation whose turns come through
        several balancers finds one server, not one per balancer (docs/routing.md)."""
        if self.routing is not Routing.CACHE_AWARE or not placement.prefix:
            return False
        upstream = self._registered(placement.server)
        if upstream is None:
            return False
        self.prefixes.record(
            upstream.identity, placement.prefix, capacity_blocks=self._capacity(upstream)
        )
        return True

    def quarantine(self, agent_id: str, wall: float) -> None:
        """Stop using an agent's llama-server that refused a connection until its agent
        reports it healthy."""
        for key in self._agent_units.get(agent_id, set()):
            self._quarantine(self.upstreams[key], wall)

    def time_passed(self, now: float) -> bool:
        """Notice agents that went stale; returns whether anything visible changed."""
        changed = False
        for upstream in self.upstreams.values():
            stale = upstream.is_stale(now)
            if stale != upstream.was_stale:
                upstream.was_stale = stale
                changed = True
        for model, pool in list(self.pools.items()):
            if pool.is_idle and model not in self.model_rules.declared:
                del self.pools[model]
        if changed:
            self.revision += 1
        return changed

    def expire_waits(self, now: float) -> list[Dispatch]:
        """Requests waiting for their home server past their deadline go where the load says.

        Also those whose home server is no longer usable. Ones that find no free slot join the
        head of their buffer: they have waited longest.
        """
        dispatched: list[Dispatch] = []
        for pool in list(self.pools.values()):
            due = [
                request_id
                for request_id, home in pool.homing.items()
                if home.until <= now
                or not home.upstream.is_usable(now)
                or self.upstreams.get(home.upstream.key) is not home.upstream
            ]
            for request_id in reversed(due):
                needs = pool.homing.pop(request_id).needs
                del self._waiting_in[request_id]
                decision = self._place(pool, request_id, needs, now, may_wait=False)
                if decision is None:
                    home = self._home(pool, needs, now)
                    self._wait(pool, request_id, needs, now, first=True, home=home)
                else:
                    assert isinstance(decision, Dispatch)
                    if decision.affinity is Affinity.SPILL_BUSY:
                        decision = msgspec.structs.replace(
                            decision, affinity=Affinity.SPILL_AFTER_WAIT
                        )
                    dispatched.append(decision)
            if due:
                self.revision += 1
            if pool.held:
                for upstream in list(pool.held.values()):
                    dispatched.extend(self._drain_buffer(now, upstream))
                    self._reindex(upstream, now)
        return dispatched

    # Internals.

    def _units(self, agent_id: str, status: StatusUpdate) -> Iterator[_Unit]:
        """The upstreams a report speaks for: the server itself, or each model a router has
        loaded (with the router's own issue, if it has one), and a cold one for each model it
        could load that no server has loaded."""
        if not status.is_router:
            self.router_reports.pop(agent_id, None)
            yield _Unit(agent_id, None, status)
            return
        self.router_reports[agent_id] = status
        if status.has_issue:
            # Nothing is known of its models now: the ones it had stay, with the issue.
            for key in self._agent_units.get(agent_id, set()):
                unit = self.upstreams[key]
                named = msgspec.structs.replace(
                    status, model=unit.model, model_aliases=unit.status.model_aliases
                )
                yield _Unit(key, unit.router_model, named, unit.cold)
            return
        for model in status.models:
            key = f"{agent_id}/{model.model}"
            if model.is_loaded:
                slots = model.slots_idle, model.slots_processing, model.slots_total, model.slots
                cold = False
            elif self._served_warm(model.model, elsewhere_than=agent_id):
                continue
            else:
                # One request may go here: the router loads the model for it.
                slots, cold = (1, 0, 1, []), True
            idle, processing, total, slot_list = slots
            unit_status = msgspec.structs.replace(
                status,
                error=model.error,
                model=model.model,
                model_aliases=model.aliases,
                slots_idle=0 if model.error else idle,
                slots_processing=0 if model.error else processing,
                slots_total=total,
                slots=slot_list,
                models=[],
            )
            yield _Unit(key, model.model, unit_status, cold)

    def _served_warm(self, model: str, *, elsewhere_than: str) -> bool:
        """Whether a server other than `elsewhere_than`'s has `model` loaded (as far as the
        last reports say)."""
        pool = self.pools.get(model)
        return pool is not None and any(
            not u.cold and u.agent_id != elsewhere_than for u in pool.members.values()
        )

    def _report_unit(self, agent_id: str, unit: _Unit, now: float, wall: float) -> list[Dispatch]:
        key, router_model, status = unit.key, unit.router_model, unit.status
        identity = (
            status.external_llamacpp_addr
            if router_model is None
            else f"{status.external_llamacpp_addr}/{router_model}"
        )
        if key in self._superseded and any(u.identity == identity for u in self.upstreams.values()):
            return []
        drained = self._superseded.pop(key, False)
        upstream = self.upstreams.get(key)
        known = self._registered(identity) or self._departed.get(identity)
        if known is not None and known.restarted(status):
            self.prefixes.forget(identity)
        # Only a newcomer or an agent whose address changed can collide with another agent.
        collides = upstream is None or upstream.identity != identity
        if upstream is None:
            upstream = Upstream(
                agent_id,
                status,
                now,
                wall,
                accounting=self.slot_accounting,
                drain_requested=drained,
                registered=next(self._registrations),
                key=key,
                router_model=router_model,
            )
            self.upstreams[key] = upstream
            self._adopt_departed(upstream, identity)
            self._names = None
        else:
            if upstream.model != (status.model or UNKNOWN) or (
                upstream.status.model_aliases != status.model_aliases
            ):
                self._names = None
            self._pool(upstream.model).leave(upstream)
        upstream.status = status
        upstream.cold = unit.cold
        if collides:
            self._supersede_others(upstream)
        pool = self._pool(upstream.model)
        pool.join(upstream)
        self._adopt_unrouted(pool)
        if not status.has_issue:
            upstream.highest_task = max(
                (slot.id_task for slot in status.slots if slot.id_task is not None), default=-1
            )
        upstream.last_seen = now
        upstream.last_update_wall = wall
        upstream.was_stale = False
        upstream.taken_since_report = 0
        if not status.has_issue:
            # A report with an issue says nothing of the slots (it has 0 and 0): keep estimates.
            processing, in_flight = status.slots_processing, len(upstream.in_flight)
            old = in_flight - len(upstream.recent)
            ours = in_flight
            if status.poll_age_ms is not None:
                # Ours as the poll saw them: one that ended since is not others' work.
                upstream.forget_ends(now)
                ours = upstream.busy_at_poll(now - status.poll_age_ms / 1000)
            upstream.foreign = max(0, processing - ours)
            # The poll surely saw those of them sent before the previous report, not the others.
            seen_at_most = max(0, processing - old) + upstream.abandoned_unseen
            upstream.abandoned = min(upstream.abandoned, seen_at_most)
            upstream.abandoned_unseen = 0
            upstream.recent.clear()
        if upstream.quarantined and not status.has_issue:
            upstream.quarantined = False
            upstream.quarantined_until_wall = None
        dispatched = self._drain_buffer(now, upstream)
        self._reindex(upstream, now)
        if pool.held and pool.waiting.has_newcomers:
            # A report can change which servers serve the fewest conversations (this one may
            # have become unusable): a slot held from a new conversation is looked at again.
            for other in list(pool.held.values()):
                dispatched.extend(self._drain_buffer(now, other))
                self._reindex(other, now)
        return dispatched

    def _remove_unit(self, key: str) -> None:
        upstream = self.upstreams.pop(key, None)
        if upstream is None:
            return
        self._names = None
        self._pool(upstream.model).leave(upstream)
        if upstream.in_flight or upstream.abandoned:
            self._departed[upstream.identity] = upstream

    def _registered(self, identity: str) -> Upstream | None:
        for pool in self.pools.values():
            upstream = pool.by_identity.get(identity)
            if upstream is not None:
                return upstream
        return None

    def _pool(self, model: str) -> Pool:
        pool = self.pools.get(model)
        if pool is None:
            limit = self.model_rules.max_buffered.get(model, self.max_buffered)
            pool = self.pools[model] = Pool(model, max_buffered=limit)
        return pool

    def _resolved_or_unknown(self, model: str | None) -> str:
        resolved = self.resolve(model)
        return resolved if isinstance(resolved, str) else UNKNOWN

    def _adopt_unrouted(self, pool: Pool) -> None:
        """Requests that waited before any model was known go to the fleet's first model."""
        unrouted = self.pools.get(UNKNOWN)
        if unrouted is None or unrouted is pool or not unrouted.buffered:
            return
        if self.resolve(None) != pool.model:
            return
        for request_id, waiter in reversed(list(unrouted.waiting.items())):
            self._waiting_in[request_id] = pool
            pool.waiting.add(request_id, waiter, first=True)
        unrouted.waiting.clear()

    def _wait(
        self,
        pool: Pool,
        request_id: int,
        needs: RequestNeeds | None,
        now: float,
        *,
        first: bool,
        home: str | None,
    ) -> None:
        """`request_id` waits in the pool's buffer, in the line of `home` (`_home`) if any."""
        emptier_until = None
        if home is None and self._routes_by_cache(needs):
            assert needs is not None
            emptier_until = self._newcomer_until(pool, needs, now)
        pool.waiting.add(request_id, Waiter(needs, now, home, emptier_until), first=first)
        self._waiting_in[request_id] = pool
        self.revision += 1

    def _home(self, pool: Pool, needs: RequestNeeds | None, now: float) -> str | None:
        if not self._routes_by_cache(needs):
            return None
        assert needs is not None
        return home_of(needs, self.prefixes, pool.by_identity, now)

    def _take_held(
        self,
        pool: Pool,
        request_id: int,
        needs: RequestNeeds | None,
        now: float,
        home: str | None,
    ) -> Dispatch | None:
        """A slot held free for the waiting requests of other servers (`waiting_line`) goes to
        a newcomer that belongs to its server (`home`), or that belongs nowhere; None if none
        fits."""
        free = [u for u in pool.held.values() if u.slots_free(now) > 0]
        if home is not None:
            free = [u for u in free if u.identity == home]
        elif self._routes_by_cache(needs):
            # A new conversation takes a held slot only where it would have been placed.
            free = [u for u in free if not self._crowded(pool, u, now)]
        if not free:
            return None
        upstream = min(free, key=lambda u: (u.slots_processing, -u.slots_free(now)))
        affinity, blocks = None, 0
        if self._routes_by_cache(needs):
            assert needs is not None
            affinity, blocks = self._affinity_of_buffered(needs, upstream)
        dispatch = self._assign(request_id, now, upstream, needs, affinity, blocks)
        self._reindex(upstream, now)
        return dispatch

    def _place(
        self,
        pool: Pool,
        request_id: int,
        needs: RequestNeeds | None,
        now: float,
        *,
        may_wait: bool,
    ) -> Dispatch | Buffered | None:
        """Dispatch to the pool's best upstream with a free slot, or wait for the request's
        home server (`may_wait`); None when no upstream of the pool has a free slot."""
        upstream = pool.index.best(now)
        if upstream is None:
            return None
        affinity, blocks = None, 0
        if self._routes_by_cache(needs):
            assert needs is not None
            choice = pick_cached(
                needs,
                self.prefixes,
                pool.by_identity,
                upstream,
                lambda: (u for u in pool.members.values() if u.slots_free(now) > 0),
                now,
                lambda u: self.conversations.count(u.identity, now),
            )
            if may_wait:
                until = self._worth_waiting(pool, choice, needs, now)
                if until is not None and choice.home is not None:
                    pool.homing[request_id] = Homing(choice.home, until, needs)
                    self._waiting_in[request_id] = pool
                    self.revision += 1
                    return Buffered(request_id, until, pool.model)
            upstream, affinity, blocks = choice.upstream, choice.affinity, choice.matched_blocks
        dispatch = self._assign(request_id, now, upstream, needs, affinity, blocks)
        self._reindex(upstream, now)
        return dispatch

    def _worth_waiting(
        self, pool: Pool, choice: CachePick, needs: RequestNeeds, now: float
    ) -> float | None:
        """Until when to wait for the busy home server, if waiting is cheaper than prefill.

        Waiting pays when the home server's first slot is expected to free (from its slots'
        progress and its decode speed) sooner than the other server would take to compute the
        prompt tokens the home server has cached; and then it is worth at most that long.
        """
        home = choice.home
        if home is None or pool.buffered >= pool.max_buffered:
            return None
        wait = home.expected_wait(now)
        if wait is None:
            if home.runs_unbounded_tasks:
                return None
            # No estimate yet (a server's first requests): waiting up to the bound is still
            # the better bet than computing the prompt again elsewhere.
            wait = 0.0
        rate = choice.upstream.prefill_rate or home.prefill_rate
        if rate <= 0:
            return None
        there = self.prefixes.matched(choice.upstream.identity, needs.prefix)
        saved_tokens = (choice.home_blocks - there) * BLOCK_BYTES / self.bytes_per_token
        worth = min(MAX_AFFINITY_WAIT, SPILL_COST * saved_tokens / rate)
        return now + worth if wait < worth else None

    def _configured_capacity(self, upstream: Upstream) -> int:
        return upstream.prefix_capacity_blocks(self.bytes_per_token) * self.prompt_cache_contexts

    def _capacity(self, upstream: Upstream) -> int:
        """Prefix blocks `upstream` is believed to hold: learned from its answers, within the
        configured bound."""
        bound = self._configured_capacity(upstream)
        learned = upstream.learned_capacity
        return bound if learned is None else min(bound, learned)

    def _routes_by_cache(self, needs: RequestNeeds | None) -> bool:
        return self.routing is Routing.CACHE_AWARE and needs is not None and bool(needs.prefix)

    def _assign(
        self,
        request_id: int,
        now: float,
        upstream: Upstream,
        needs: RequestNeeds | None = None,
        affinity: Affinity | None = None,
        matched_blocks: int = 0,
    ) -> Dispatch:
        # The caller re-indexes (`report` and `release` once, after draining the buffer).
        newer_blocks, placement = 0, None
        if self._routes_by_cache(needs):
            assert needs is not None
            placement = Placement(upstream.identity, needs.prefix)
            newer_blocks = self.prefixes.record(
                upstream.identity,
                needs.prefix,
                capacity_blocks=self._capacity(upstream),
            )
            self.conversations.saw(upstream.identity, conversation_of(needs), now)
        upstream.in_flight.add(request_id)
        upstream.sent_at[request_id] = now
        upstream.taken_since_report += 1
        upstream.recent.add(request_id)
        upstream.last_dispatch = next(self._dispatch_counter)
        self._assigned[request_id] = upstream
        self.revision += 1
        rename_to = None
        if upstream.router_model is not None:
            asked = needs.model if needs is not None else None
            if asked != upstream.router_model and asked not in upstream.status.model_aliases:
                rename_to = upstream.router_model
        return Dispatch(
            request_id,
            upstream.agent_id,
            upstream.address,
            affinity,
            matched_blocks,
            upstream.model,
            rename_to,
            newer_blocks,
            placement,
        )

    def _reindex(self, upstream: Upstream, now: float) -> None:
        pool = self.pools.get(upstream.model)
        if pool is not None and pool.members.get(upstream.key) is upstream:
            pool.index.update(upstream, now)

    def _quarantine(self, upstream: Upstream, wall: float) -> None:
        if not upstream.quarantined:
            upstream.quarantined = True
            upstream.quarantined_until_wall = wall + upstream.interval
            self.quarantines += 1
            self.revision += 1

    def _supersede_others(self, newest: Upstream) -> None:
        """Drop every other upstream for `newest`'s llama-server; `newest` inherits its requests.

        Only a newcomer or an agent whose address changed can collide, and it is the most recent
        word on that llama-server.
        """
        for other in list(self.upstreams.values()):
            if other is newest or other.identity != newest.identity:
                continue
            del self.upstreams[other.key]
            self._pool(other.model).leave(other)
            units = self._agent_units.get(other.agent_id)
            if units is not None:
                units.discard(other.key)
                if not units:
                    del self._agent_units[other.agent_id]
            self._superseded[other.key] = other.drain_requested
            self.superseded_by_last_report.append(other.agent_id)
            self._take_over(newest, other)
            self._names = None

    def _adopt_departed(self, upstream: Upstream, identity: str) -> None:
        departed = self._departed.pop(identity, None)
        if departed is None:
            return
        self._take_over(upstream, departed)

    def _take_over(self, upstream: Upstream, previous: Upstream) -> None:
        """`upstream` now speaks for `previous`'s llama-server: it takes over its requests."""
        upstream.in_flight |= previous.in_flight
        upstream.recent |= previous.recent
        upstream.sent_at.update(previous.sent_at)
        upstream.abandoned = max(upstream.abandoned, previous.abandoned)
        upstream.abandoned_unseen = max(upstream.abandoned_unseen, previous.abandoned_unseen)
        for request_id in previous.in_flight:
            self._assigned[request_id] = upstream

    def _drain_buffer(self, now: float, touched: Upstream) -> list[Dispatch]:
        # While requests wait in a pool, none of its upstreams has a free slot but those held
        # for a while (`Pool.held`): every event that frees one drains the buffer at once. So
        # only `touched`, the one upstream this event changed, can take them, and draining
        # costs no scan of the fleet, however large (1,000 agents each reporting every second
        # would otherwise scan it 1,000 times a second). A held slot is looked at again when
        # its server reports, when a request's patience ends (`expire_waits`), or when a
        # newcomer can take it (`_take_held`).
        dispatched: list[Dispatch] = []
        pool = self.pools.get(touched.model)
        if pool is None or pool.members.get(touched.key) is not touched:
            return dispatched
        pool.held.pop(touched.key, None)
        for request_id in [i for i, home in pool.homing.items() if home.upstream is touched]:
            if touched.slots_free(now) <= 0:
                break
            home = pool.homing.pop(request_id)
            del self._waiting_in[request_id]
            blocks = self.prefixes.matched(touched.identity, home.needs.prefix)
            # Nothing matched: it waited for where its forgotten conversation lived, or (a new
            # conversation) for a server with the fewest conversations.
            waited = Affinity.HIT_AFTER_WAIT if blocks else self._unmatched(home.needs, touched)
            dispatched.append(self._assign(request_id, now, touched, home.needs, waited, blocks))
        while pool.waiting and touched.slots_free(now) > 0:
            taken = pool.waiting.next_for(
                touched.identity,
                now,
                self.buffer_patience,
                lambda: self._crowded(pool, touched, now),
            )
            if taken is None:
                # Everyone waiting belongs to another server, or is a new conversation and
                # `touched` serves more conversations than another: keep the slot a while.
                pool.held[touched.key] = touched
                break
            request_id = taken
            waiter = pool.waiting.remove(request_id)
            assert waiter is not None
            needs = waiter.needs
            del self._waiting_in[request_id]
            affinity, blocks = None, 0
            if self._routes_by_cache(needs):
                assert needs is not None
                affinity, blocks = self._affinity_of_buffered(needs, touched)
            dispatched.append(self._assign(request_id, now, touched, needs, affinity, blocks))
        return dispatched

    def _unmatched(self, needs: RequestNeeds, taker: Upstream) -> Affinity:
        """A request none of whose blocks `taker` was sent: back where its forgotten
        conversation lived, or a new conversation."""
        returned = self.prefixes.last_server(needs.prefix) == taker.identity
        return Affinity.RETURN if returned else Affinity.MISS

    def _newcomer_until(self, pool: Pool, needs: RequestNeeds, now: float) -> float:
        """Until when a buffered new conversation lets fuller servers' slots go: as long as a
        wait for its busy home is worth (`_worth_waiting`), what its prompt costs to compute
        SPILL_COST times at the pool's fastest prefill, within the buffer's patience (all of
        it while no prefill speed is known)."""
        rate = max((u.prefill_rate for u in pool.members.values()), default=0.0)
        if rate <= 0:
            return now + self.buffer_patience
        tokens = len(needs.prefix) * BLOCK_BYTES / self.bytes_per_token
        return now + min(self.buffer_patience, SPILL_COST * tokens / rate)

    def _crowded(self, pool: Pool, upstream: Upstream, now: float) -> bool:
        """Whether `upstream` served more conversations lately than a usable member with the
        fewest (`recent_conversations`): a new conversation there evicts more."""
        count = self.conversations.count
        fewest = fewest_conversations(pool.members.values(), now, lambda u: count(u.identity, now))
        return fewest is not None and count(upstream.identity, now) > count(fewest.identity, now)

    def _affinity_of_buffered(self, needs: RequestNeeds, taker: Upstream) -> tuple[Affinity, int]:
        """What sending a buffered request to the first upstream that freed a slot amounts to."""
        best = next(self.prefixes.matches(needs.prefix), None)
        if best is None:
            return self._unmatched(needs, taker), 0
        if best[0] == taker.identity:
            return Affinity.HIT, best[1]
        return Affinity.SPILL_BUSY, self.prefixes.matched(taker.identity, needs.prefix)

    def _view(self, upstream: Upstream, now: float) -> AgentView:
        status = upstream.status
        unusable = {
            "issue": status.has_issue,
            "stale": upstream.is_stale(now),
            "quarantined": upstream.quarantined,
            "draining": upstream.is_draining,
        }
        reasons = [reason for reason, applies in unusable.items() if applies]
        if not status.has_issue:
            # Slots nothing may be sent to are not idle capacity (autoscalers sum them).
            processing = upstream.slots_processing
            # Nor is a router's model that is not loaded: its one slot is for loading it.
            idle = 0 if reasons or upstream.cold else upstream.slots_total - processing
            status = _with_counts(status, idle, processing)
        if upstream.drain_requested and not status.is_draining:
            status = msgspec.structs.replace(status, is_draining=True)
        until = upstream.quarantined_until_wall if upstream.quarantined else None
        return AgentView(
            agent_id=upstream.agent_id,
            last_update=SystemTime.from_timestamp(upstream.last_update_wall),
            quarantined_until=SystemTime.from_timestamp(until) if until is not None else None,
            slots_taken=len(upstream.in_flight),
            slots_taken_since_last_status_update=upstream.taken_since_report,
            status=status,
            is_usable=upstream.is_usable(now),
            is_stale=upstream.is_stale(now),
            slots_free=upstream.slots_free(now),
            unusable_reasons=reasons,
            prompt_tokens_evaluated=upstream.prompt_tokens_evaluated,
            prompt_tokens_cached=upstream.prompt_tokens_cached,
        )


def _with_counts(status: StatusUpdate, idle: int, processing: int) -> StatusUpdate:
    return msgspec.structs.replace(status, slots_idle=idle, slots_processing=processing)
