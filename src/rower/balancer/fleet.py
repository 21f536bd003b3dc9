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
  at each report as `processing - in_flight`, never below 0.
- `abandoned`: an upper bound of our requests whose client left while llama-server may still
  run them (it keeps generating a non-streamed answer whose client is gone). Each one counts
  until a report shows it cannot be running any more: at most `processing - old` of them can
  be, where `old` are our requests in flight since before the previous report, which the poll
  surely saw.
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
"""

from __future__ import annotations

import enum
import itertools
from collections import OrderedDict
from dataclasses import dataclass

import msgspec

from rower.balancer.affinity import BLOCK_BYTES
from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.cache_routing import Affinity, CachePick, pick_cached
from rower.balancer.prefix_memory import DEFAULT_MAX_ENTRIES, PrefixMemory
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream import BYTES_PER_TOKEN, SlotAccounting, Upstream
from rower.balancer.upstream_index import UpstreamIndex
from rower.status import AgentView, StatusUpdate, SystemTime

MAX_AFFINITY_WAIT = 1.0
"""Longest a request waits for the busy server holding its prefix while another has a free
slot (seconds); it never waits longer than the prefill that waiting saves, either."""


class Routing(enum.Enum):
    """How the fleet picks among upstreams with a free slot (`--routing`)."""

    CACHE_AWARE = "cache-aware"
    """Back to the server holding the request's prefix while it has a free slot
    (`cache_routing`)."""
    LEAST_BUSY = "least-busy"
    """Most free slots, fewest busy, least recently used (`upstream_index`)."""


@dataclass(frozen=True, slots=True)
class Dispatch:
    """Send `request_id` to the llama-server at `upstream` (host:port), reported by `agent_id`."""

    request_id: int
    agent_id: str
    upstream: str
    affinity: Affinity | None = None
    """What the cache-aware pick did (None: the request had no prefix, or least-busy routing)."""
    matched_blocks: int = 0
    """Blocks of the request's prefix this balancer had sent that upstream before."""


@dataclass(frozen=True, slots=True)
class Buffered:
    """`request_id` waits in the buffer for a free slot.

    With `until` (a `now` value) it waits for one server only, the one holding its prompt
    prefix, and at `until` at the latest goes wherever the load says (`Fleet.expire_waits`).
    """

    request_id: int
    until: float | None = None


@dataclass(frozen=True, slots=True)
class _Homing:
    """A request waiting for its home server (the busy one holding its prefix) until `until`."""

    upstream: Upstream
    until: float
    needs: RequestNeeds


class RejectReason(enum.Enum):
    """Why a request could neither be dispatched nor buffered."""

    BUFFER_FULL = "buffer_full"
    BUFFER_DISABLED = "buffer_disabled"


@dataclass(frozen=True, slots=True)
class Rejected:
    """`request_id` is refused at once: the buffer is full or disabled."""

    request_id: int
    reason: RejectReason


Decision = Dispatch | Buffered | Rejected


class Fleet:
    """All upstreams, the requests in flight and the FIFO buffer of waiting requests.

    Args:
        max_buffered: most requests that may wait at once; 0 means never wait.
        slot_accounting: how free slots are counted between reports.
        max_agents: most agents registered at once (a newcomer for a known server replaces
            its agent, so it is always admitted); None for no limit.
        routing: how a request's upstream is picked among those with a free slot.
        prompt_cache_contexts: how many slot contexts' worth of prompts one llama-server is
            assumed to keep (its slots plus its host-RAM prompt cache, `--cache-ram`): bounds
            the memory of what was sent to it.
        prefix_memory_entries: most entries in the memory of prefixes, over all servers.
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
    ) -> None:
        self.max_buffered = max_buffered
        self.routing = routing
        self.prompt_cache_contexts = prompt_cache_contexts
        self.prefixes = PrefixMemory(max_entries=prefix_memory_entries)
        self.max_agents = max_agents
        self.slot_accounting = slot_accounting
        self.upstreams: dict[str, Upstream] = {}
        self._waiting: OrderedDict[int, RequestNeeds | None] = OrderedDict()
        """Waiting requests, first come first; with what they need."""
        self._homing: OrderedDict[int, _Homing] = OrderedDict()
        """Requests waiting a short while for the busy server holding their prefix."""
        self._by_address: dict[str, Upstream] = {}
        """The registered upstream of each llama-server address (one: see supersede)."""
        self._assigned: dict[int, Upstream] = {}
        self._departed: dict[str, Upstream] = {}
        """Upstreams whose agent left while requests still ran there, by address."""
        self._superseded: dict[str, bool] = {}
        """Agents replaced by a newer agent for the same address (their reports are ignored),
        and whether an operator had drained them."""
        self.superseded_by_last_report: list[str] = []
        """Agents the last `report` replaced (for the caller to log)."""
        self._dispatch_counter = itertools.count(1)
        self._registrations = itertools.count(1)
        self._index = UpstreamIndex(self.upstreams)
        self.revision = 0
        """Grows at every change an observer could see (for the SSE stream)."""
        self.quarantines = 0
        """Upstreams put in quarantine since start (for metrics)."""

    # Queries.

    @property
    def requests_buffered(self) -> int:
        """Requests waiting for a slot now (in the buffer, or for their home server)."""
        return len(self._waiting) + len(self._homing)

    @property
    def requests_in_flight(self) -> int:
        """Requests dispatched and not yet finished, on any upstream (even a departed one)."""
        return len(self._assigned)

    def is_waiting(self, request_id: int) -> bool:
        """Whether `request_id` waits (in the buffer, or for its home server)."""
        return request_id in self._waiting or request_id in self._homing

    def is_homing(self, request_id: int) -> bool:
        """Whether `request_id` waits for the busy server holding its prefix."""
        return request_id in self._homing

    def upstream_of(self, request_id: int) -> str | None:
        """The agent id a dispatched request is counted against."""
        upstream = self._assigned.get(request_id)
        return upstream.agent_id if upstream is not None else None

    def admits(self, agent_id: str, address: str) -> bool:
        """Whether a report from `agent_id` for `address` may register it (`max_agents`)."""
        if self.max_agents is None or agent_id in self.upstreams:
            return True
        if len(self.upstreams) < self.max_agents:
            return True
        return any(u.address == address for u in self.upstreams.values())

    def is_superseded(self, agent_id: str) -> bool:
        """Whether a newer agent took over `agent_id`'s llama-server."""
        return agent_id in self._superseded

    def pick(self, now: float) -> Upstream | None:
        """The upstream for the next request: most free slots, fewest busy, least recently used.

        O(log n) amortized (`upstream_index`): a report, a dispatch and a release re-rank the
        upstream they touch; what only lowers an upstream (drain, quarantine, staleness,
        leaving) is noticed when its entry reaches the top of the index.
        """
        return self._index.best(now)

    def pick_any(self, now: float) -> Upstream | None:
        """An upstream for a request that needs no slot (`/v1/models`, `/props`, ...).

        Prefers one with free slots, else any usable one, so such requests never wait.
        """
        chosen = self.pick(now)
        if chosen is not None:
            return chosen
        usable = [u for u in self.upstreams.values() if u.is_usable(now)]
        return min(usable, key=lambda u: u.last_dispatch, default=None)

    def views(self, now: float) -> list[AgentView]:
        """Every agent in Paddler's `/api/v1/agents` shape: usable first, then most idle."""
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
        if agent_id in self._superseded:
            address = status.external_llamacpp_addr
            if any(u.address == address for u in self.upstreams.values()):
                return []
        drained = self._superseded.pop(agent_id, False)
        upstream = self.upstreams.get(agent_id)
        address = status.external_llamacpp_addr
        known = self._by_address.get(address) or self._departed.get(address)
        if known is not None and known.restarted(status):
            self.prefixes.forget(address)
        # Only a newcomer or an agent whose address changed can collide with another agent.
        collides = upstream is None or upstream.address != address
        if upstream is not None and collides and self._by_address.get(upstream.address) is upstream:
            del self._by_address[upstream.address]
        if upstream is None:
            upstream = Upstream(
                agent_id,
                status,
                now,
                wall,
                accounting=self.slot_accounting,
                drain_requested=drained,
                registered=next(self._registrations),
            )
            self.upstreams[agent_id] = upstream
            self._adopt_departed(upstream)
        upstream.status = status
        if collides:
            self._supersede_others(upstream)
            self._by_address[address] = upstream
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
            upstream.foreign = max(0, processing - in_flight)
            upstream.abandoned = min(upstream.abandoned, max(0, processing - old))
            upstream.recent.clear()
        if upstream.quarantined and not status.has_issue:
            upstream.quarantined = False
            upstream.quarantined_until_wall = None
        self.revision += 1
        dispatched = self._drain_buffer(now, upstream)
        self._index.update(upstream, now)
        return dispatched

    def remove_agent(self, agent_id: str) -> None:
        """The agent's stream ended: forget the upstream; its requests in flight run on.

        They stay counted against the llama-server's address, so an agent that comes back for
        the same server (restarted, new id) starts with them instead of seeing free slots.
        """
        self._superseded.pop(agent_id, None)
        upstream = self.upstreams.pop(agent_id, None)
        if upstream is None:
            return
        if self._by_address.get(upstream.address) is upstream:
            del self._by_address[upstream.address]
        if upstream.in_flight or upstream.abandoned:
            self._departed[upstream.address] = upstream
        self.revision += 1

    def drain(self, agent_id: str) -> bool:
        """An operator drains an agent: no new requests go there; returns whether it is known."""
        upstream = self.upstreams.get(agent_id)
        if upstream is None:
            return False
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

        `needs` is what the proxy read from the request (its prefix steers the cache-aware
        pick). A retried request (its upstream refused the connection) goes to the head of the
        buffer: it has waited longest.
        """
        if (
            request_id in self._waiting
            or request_id in self._assigned
            or request_id in self._homing
        ):
            raise ValueError(f"request {request_id} already holds or awaits a slot")
        if not self._waiting:
            decision = self._place(request_id, needs, now, may_wait=not retry)
            if decision is not None:
                return decision
        if self.max_buffered == 0:
            return Rejected(request_id, RejectReason.BUFFER_DISABLED)
        if self.requests_buffered >= self.max_buffered and not retry:
            return Rejected(request_id, RejectReason.BUFFER_FULL)
        self._waiting[request_id] = needs
        if retry:
            self._waiting.move_to_end(request_id, last=False)
        self.revision += 1
        return Buffered(request_id)

    def release(self, request_id: int, now: float, *, abandoned: bool = False) -> list[Dispatch]:
        """A request finished (or failed, or its client left): free its slot.

        `abandoned`: the client left while llama-server may still be working on the request.
        llama-server notices a dropped stream at its next write, but keeps generating a
        non-streamed answer to its end; so the slot counts as busy with work that is not
        ours until the agent's next report tells what the server really does.

        Safe to call for any request id, any number of times.
        """
        if request_id in self._waiting:
            del self._waiting[request_id]
            self.revision += 1
            return []
        if self._homing.pop(request_id, None) is not None:
            self.revision += 1
            return []
        upstream = self._assigned.pop(request_id, None)
        if upstream is None:
            return []
        upstream.in_flight.discard(request_id)
        upstream.recent.discard(request_id)
        if abandoned:
            # No longer ours, still busy: in this report's foreign work and in the bound.
            upstream.foreign += 1
            upstream.abandoned += 1
        if not upstream.in_flight and self._departed.get(upstream.address) is upstream:
            del self._departed[upstream.address]
        self.revision += 1
        dispatched = self._drain_buffer(now, upstream)
        self._index.update(upstream, now)
        return dispatched

    def refused(self, request_id: int, now: float, wall: float) -> list[Dispatch]:
        """The upstream of `request_id` refused the connection: quarantine it, free the slot.

        The quarantine lasts until the agent's next report without an issue. The caller may
        then ask for a slot again with `retry=True`.
        """
        upstream = self._assigned.get(request_id)
        if upstream is not None:
            self.quarantine(upstream.agent_id, wall)
        return self.release(request_id, now)

    def answered(self, agent_id: str, timings: AnswerTimings) -> None:
        """An answer from `agent_id`'s llama-server said what its prompt and generation took."""
        upstream = self.upstreams.get(agent_id)
        if upstream is not None:
            upstream.measured(timings)

    def quarantine(self, agent_id: str, wall: float) -> None:
        """Stop using an upstream that refused a connection until its agent reports it healthy."""
        upstream = self.upstreams.get(agent_id)
        if upstream is not None and not upstream.quarantined:
            upstream.quarantined = True
            upstream.quarantined_until_wall = wall + upstream.interval
            self.quarantines += 1
            self.revision += 1

    def time_passed(self, now: float) -> bool:
        """Notice agents that went stale; returns whether anything visible changed."""
        changed = False
        for upstream in self.upstreams.values():
            stale = upstream.is_stale(now)
            if stale != upstream.was_stale:
                upstream.was_stale = stale
                changed = True
        if changed:
            self.revision += 1
        return changed

    def expire_waits(self, now: float) -> list[Dispatch]:
        """Requests waiting for their home server past their deadline go where the load says.

        Also those whose home server is no longer usable. Ones that find no free slot join the
        head of the buffer: they have waited longest.
        """
        due = [
            request_id
            for request_id, home in self._homing.items()
            if home.until <= now
            or not home.upstream.is_usable(now)
            or self.upstreams.get(home.upstream.agent_id) is not home.upstream
        ]
        dispatched: list[Dispatch] = []
        for request_id in reversed(due):
            needs = self._homing.pop(request_id).needs
            decision = self._place(request_id, needs, now, may_wait=False)
            if decision is None:
                self._waiting[request_id] = needs
                self._waiting.move_to_end(request_id, last=False)
            else:
                assert isinstance(decision, Dispatch)
                dispatched.append(decision)
        if due:
            self.revision += 1
        return dispatched

    # Internals.

    def _place(
        self, request_id: int, needs: RequestNeeds | None, now: float, *, may_wait: bool
    ) -> Dispatch | Buffered | None:
        """Dispatch to the best upstream with a free slot, or wait for the request's home
        server (`may_wait`); None when no upstream has a free slot."""
        upstream = self.pick(now)
        if upstream is None:
            return None
        affinity, blocks = None, 0
        if self._routes_by_cache(needs):
            assert needs is not None
            choice = pick_cached(
                needs,
                self.prefixes,
                self._by_address,
                upstream,
                lambda: (u for u in self.upstreams.values() if u.slots_free(now) > 0),
                now,
            )
            if may_wait:
                until = self._worth_waiting(choice, needs, now)
                if until is not None and choice.home is not None:
                    self._homing[request_id] = _Homing(choice.home, until, needs)
                    self.revision += 1
                    return Buffered(request_id, until)
            upstream, affinity, blocks = choice.upstream, choice.affinity, choice.matched_blocks
        dispatch = self._assign(request_id, upstream, needs, affinity, blocks)
        self._index.update(upstream, now)
        return dispatch

    def _worth_waiting(self, choice: CachePick, needs: RequestNeeds, now: float) -> float | None:
        """Until when to wait for the busy home server, if waiting is cheaper than prefill.

        Waiting pays when the home server's first slot is expected to free (from its slots'
        progress and its decode speed) sooner than the other server would take to compute the
        prompt tokens the home server has cached; and then it is worth at most that long.
        """
        home = choice.home
        if home is None or self.requests_buffered >= self.max_buffered:
            return None
        wait = home.expected_wait(now)
        rate = choice.upstream.prefill_rate or home.prefill_rate
        if wait is None or rate <= 0:
            return None
        there = self.prefixes.matched(choice.upstream.address, needs.prefix)
        saved_tokens = (choice.home_blocks - there) * BLOCK_BYTES / BYTES_PER_TOKEN
        worth = min(MAX_AFFINITY_WAIT, saved_tokens / rate)
        return now + worth if wait < worth else None

    def _routes_by_cache(self, needs: RequestNeeds | None) -> bool:
        return self.routing is Routing.CACHE_AWARE and needs is not None and bool(needs.prefix)

    def _assign(
        self,
        request_id: int,
        upstream: Upstream,
        needs: RequestNeeds | None = None,
        affinity: Affinity | None = None,
        matched_blocks: int = 0,
    ) -> Dispatch:
        # The caller tells the index (`report` and `release` once, after draining the buffer).
        if self._routes_by_cache(needs):
            assert needs is not None
            self.prefixes.record(
                upstream.address,
                needs.prefix,
                capacity_blocks=upstream.prefix_capacity_blocks * self.prompt_cache_contexts,
            )
        upstream.in_flight.add(request_id)
        upstream.taken_since_report += 1
        upstream.recent.add(request_id)
        upstream.last_dispatch = next(self._dispatch_counter)
        self._assigned[request_id] = upstream
        self.revision += 1
        return Dispatch(request_id, upstream.agent_id, upstream.address, affinity, matched_blocks)

    def _supersede_others(self, newest: Upstream) -> None:
        """Drop every other upstream for `newest`'s address; `newest` inherits its requests.

        Only a newcomer or an agent whose address changed can collide, and it is the most recent
        word on that llama-server.
        """
        for other in list(self.upstreams.values()):
            if other is newest or other.address != newest.address:
                continue
            del self.upstreams[other.agent_id]
            self._superseded[other.agent_id] = other.drain_requested
            self.superseded_by_last_report.append(other.agent_id)
            self._take_over(newest, other)

    def _adopt_departed(self, upstream: Upstream) -> None:
        departed = self._departed.pop(upstream.address, None)
        if departed is None:
            return
        self._take_over(upstream, departed)

    def _take_over(self, upstream: Upstream, previous: Upstream) -> None:
        """`upstream` now speaks for `previous`'s llama-server: it takes over its requests."""
        upstream.in_flight |= previous.in_flight
        upstream.recent |= previous.recent
        upstream.abandoned = max(upstream.abandoned, previous.abandoned)
        for request_id in previous.in_flight:
            self._assigned[request_id] = upstream

    def _drain_buffer(self, now: float, touched: Upstream) -> list[Dispatch]:
        # While requests wait, no upstream has a free slot: every event that frees one drains
        # the buffer at once. So only `touched`, the one upstream this event changed, can take
        # them, and draining costs no scan of the fleet, however large (1,000 agents each
        # reporting every second would otherwise scan it 1,000 times a second).
        dispatched: list[Dispatch] = []
        if self.upstreams.get(touched.agent_id) is not touched:
            return dispatched
        for request_id in [i for i, home in self._homing.items() if home.upstream is touched]:
            if touched.slots_free(now) <= 0:
                break
            home = self._homing.pop(request_id)
            blocks = self.prefixes.matched(touched.address, home.needs.prefix)
            dispatched.append(self._assign(request_id, touched, home.needs, Affinity.HIT, blocks))
        while self._waiting and touched.slots_free(now) > 0:
            request_id, needs = self._waiting.popitem(last=False)
            affinity, blocks = None, 0
            if self._routes_by_cache(needs):
                assert needs is not None
                affinity, blocks = self._affinity_of_buffered(needs, touched)
            dispatched.append(self._assign(request_id, touched, needs, affinity, blocks))
        return dispatched

    def _affinity_of_buffered(self, needs: RequestNeeds, taker: Upstream) -> tuple[Affinity, int]:
        """What sending a buffered request to the first upstream that freed a slot amounts to."""
        best = next(self.prefixes.matches(needs.prefix), None)
        if best is None:
            return Affinity.MISS, 0
        if best[0] == taker.address:
            return Affinity.HIT, best[1]
        return Affinity.SPILL_BUSY, self.prefixes.matched(taker.address, needs.prefix)

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
            idle = 0 if reasons else upstream.slots_total - processing
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
