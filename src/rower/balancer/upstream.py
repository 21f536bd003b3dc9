"""One llama-server as the balancer sees it: its last report and what was sent there since.

How its free slots are counted is the fleet core's rule (`fleet`'s docstring); this module holds
the per-upstream state and the arithmetic of that rule, with no I/O.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from rower.balancer.affinity import BLOCK_BYTES
from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.models import UNKNOWN
from rower.status import StatusUpdate

STALE_AFTER_INTERVALS = 3
"""An agent that has not reported for this many of its intervals is not used."""

BYTES_PER_TOKEN = 4
"""About what one token of English text is in bytes: turns slot context into prefix blocks."""

DEFAULT_SLOT_CONTEXT = 4096
"""Tokens per slot assumed when an agent does not say (older agents send no `n_ctx`)."""

RATE_WEIGHT = 0.2
"""Weight of the newest answer in a server's measured prefill and decode speeds."""

ENDED_MEMORY = 2.0
"""Seconds for which the end of each of this balancer's requests is remembered: a report whose
poll is older than that (rare: a poll is a few ms old when it arrives, at most an interval on a
reconnect) frees none of the slots of requests that ended after it, the safe error."""

MAX_ENDED = 256
"""At most this many ends are remembered per upstream (the oldest go first: the same safe
error)."""


class SlotAccounting(enum.Enum):
    """How free slots are counted between two reports.

    `ROWER` is the module docstring's correction. `PADDLER` is Paddler 1.x's, kept to compare
    against in the benchmarks: free = reported idle - dispatched since that report, and a
    finished request frees nothing until the next report.
    """

    ROWER = "rower"
    PADDLER = "paddler"


@dataclass(slots=True)
class Upstream:
    """One agent and the llama-server it reports on, as this balancer sees them."""

    agent_id: str
    status: StatusUpdate
    last_seen: float
    last_update_wall: float
    in_flight: set[int] = field(default_factory=set)
    recent: set[int] = field(default_factory=set)
    """Requests in flight that were sent since the last report (its poll may not have seen them)."""
    foreign: int = 0
    abandoned: int = 0
    abandoned_unseen: int = 0
    """Of `abandoned`, those that were sent since the last report (in `recent`) when their
    client left: the next report's poll may not have seen them, though they still run."""
    taken_since_report: int = 0
    quarantined: bool = False
    quarantined_until_wall: float | None = None
    last_dispatch: int = 0
    was_stale: bool = False
    accounting: SlotAccounting = SlotAccounting.ROWER
    drain_requested: bool = False
    """An operator drained this upstream; the agent's reports do not undo it."""
    registered: int = 0
    """When it joined the fleet (a counter): the last tie-break of `Fleet.pick`."""
    highest_task: int = -1
    """The largest llama-server task id its reports showed (-1: none yet)."""
    prompt_tokens_evaluated: int = 0
    prompt_tokens_cached: int = 0
    """Prompt tokens of its answers to this balancer, computed and reused (for the views)."""
    prefill_rate: float = 0.0
    """Prompt tokens a second it computes, from its answers' timings (0: not measured yet)."""
    decode_rate: float = 0.0
    """Tokens a second one of its streams generates, from its answers' timings."""
    key: str = ""
    """Its key in the fleet: the agent id, or `agent id/model` for a model of a router."""
    router_model: str | None = None
    """For one model of a router-mode llama-server: that model."""
    sent_at: dict[int, float] = field(default_factory=dict)
    """When each request in flight was dispatched (a `now` value)."""
    service_time: float = 0.0
    """How long this balancer's requests usually take there, in seconds (0: not measured)."""
    learned_capacity: int | None = None
    """Prefix blocks it holds as its answers showed (shrunk when a turn sent back to it found
    its prefix gone); None until an answer told."""
    cold: bool = False
    """A router's model that is not loaded: it has one slot, for the request that makes the
    router load it (docs/models.md)."""
    ended: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=MAX_ENDED))
    """(sent, ended) `now` values of its requests that ended in the last `ENDED_MEMORY`
    seconds, oldest first; not those whose client left (they may run on) nor those refused."""

    def __post_init__(self) -> None:
        if not self.key:
            self.key = self.agent_id

    @property
    def model(self) -> str:
        """The model it serves (`models.UNKNOWN` when its agent names none)."""
        return self.status.model or UNKNOWN

    @property
    def identity(self) -> str:
        """Which llama-server it is: its address, and the model for one of a router's."""
        address = self.status.external_llamacpp_addr
        return address if self.router_model is None else f"{address}/{self.router_model}"

    def expected_wait(self, now: float) -> float | None:
        """Seconds until its first busy slot is expected to free, or None if unknown.

        The sooner of two estimates: from the last report's slots (`n_remain`, tokens a task
        may still generate, over the measured decode speed; a task without a limit gives
        none), and from this balancer's own requests there (how long its requests usually
        take there, less how long each has run). The report may predate the requests that
        fill the slots now; the balancer's own clock never does.
        """
        waits: list[float] = []
        if self.decode_rate > 0:
            elapsed = now - self.last_seen
            waits.extend(
                slot.n_remain / self.decode_rate - elapsed
                for slot in self.status.slots
                if slot.is_processing and slot.n_remain is not None and slot.n_remain >= 0
            )
        if self.service_time > 0 and self.sent_at:
            waits.append(self.service_time - (now - min(self.sent_at.values())))
        return max(0.0, min(waits)) if waits else None

    @property
    def runs_unbounded_tasks(self) -> bool:
        """Whether the last report showed busy slots, all with tasks of no token limit."""
        busy = [slot.n_remain for slot in self.status.slots if slot.is_processing]
        return bool(busy) and all(remain == -1 for remain in busy)

    def finished(self, request_id: int, now: float, *, abandoned: bool) -> None:
        """One of this balancer's requests there ended: fold its duration into the usual one,
        and remember when it ended (`busy_at_poll`)."""
        sent = self.sent_at.pop(request_id, None)
        if sent is not None and not abandoned:
            self.service_time = blend(self.service_time, now - sent)
            self.ended.append((sent, now))
        self.forget_ends(now)

    def forget_ends(self, now: float) -> None:
        """Forget the ends older than `ENDED_MEMORY`."""
        while self.ended and self.ended[0][1] < now - ENDED_MEMORY:
            self.ended.popleft()

    def busy_at_poll(self, polled: float) -> int:
        """How many of this balancer's requests there a poll that ended at `polled` counted
        busy: those sent before it that were in flight then (ended after it, or still running).

        A request sent before the poll is taken to be in it, as the estimate of others' work
        always did (`fleet`'s docstring); one sent after it cannot be.
        """
        ended_after = sum(1 for sent, ended in self.ended if sent <= polled < ended)
        running = sum(1 for r in self.in_flight if self.sent_at.get(r, polled) <= polled)
        return ended_after + running

    def measured(self, timings: AnswerTimings) -> None:
        """Count one answer's prompt tokens and fold its speeds into the estimates."""
        self.prompt_tokens_evaluated += timings.evaluated
        self.prompt_tokens_cached += timings.cached
        if timings.evaluated >= 16 and timings.prompt_seconds > 0:
            self.prefill_rate = blend(self.prefill_rate, timings.evaluated / timings.prompt_seconds)
        if timings.generated >= 4 and timings.generation_seconds > 0:
            rate = timings.generated / timings.generation_seconds
            self.decode_rate = blend(self.decode_rate, rate)

    def restarted(self, status: StatusUpdate) -> bool:
        """Whether `status` shows a llama-server that lost its prompt cache since the last one.

        Task ids grow for a llama-server's whole life and a slot that served a task shows its
        id: a smaller one, or none where there was one, means the server restarted. Another
        model or another slot count means it was reloaded or replaced.
        """
        if status.has_issue:
            return False
        old = self.status
        if old.model and status.model and old.model != status.model:
            return True
        if old.slots_total and status.slots_total and old.slots_total != status.slots_total:
            return True
        if self.highest_task < 0:
            return False
        tasks = [slot.id_task for slot in status.slots if slot.id_task is not None]
        return not tasks or max(tasks) < self.highest_task

    def prefix_capacity_blocks(self, bytes_per_token: float) -> int:
        """Prefix blocks the server holds in its slots' context."""
        context = sum(slot.n_ctx for slot in self.status.slots)
        context = context or self.slots_total * DEFAULT_SLOT_CONTEXT
        return max(1, int(context * bytes_per_token) // BLOCK_BYTES)

    @property
    def address(self) -> str:
        """Where the balancer reaches the llama-server."""
        return self.status.external_llamacpp_addr

    @property
    def interval(self) -> float:
        """The agent's reporting period in seconds."""
        return self.status.monitoring_interval_ms / 1000

    @property
    def slots_total(self) -> int:
        """Slots of the llama-server (older agents send only idle and processing)."""
        return self.status.slots_total or self.status.slots_idle + self.status.slots_processing

    @property
    def is_draining(self) -> bool:
        """Whether the agent is stopping or an operator drained it: no new requests."""
        return self.status.is_draining or self.drain_requested

    def is_stale(self, now: float) -> bool:
        """Whether the agent missed too many reports to be trusted."""
        return now - self.last_seen > STALE_AFTER_INTERVALS * self.interval

    def is_usable(self, now: float) -> bool:
        """Whether requests may be sent here at all."""
        return not (
            self.status.has_issue or self.is_draining or self.quarantined or self.is_stale(now)
        )

    @property
    def slots_processing(self) -> int:
        """Busy slots: ours in flight plus the estimated others."""
        return min(self.slots_total, len(self.in_flight) + self.others)

    @property
    def others(self) -> int:
        """Slots estimated busy with work that is not ours in flight."""
        return max(self.foreign, self.abandoned)

    def slots_free(self, now: float) -> int:
        """Slots a new request may take now; 0 when the upstream is not usable."""
        if not self.is_usable(now):
            return 0
        if self.accounting is SlotAccounting.PADDLER:
            return max(0, self.status.slots_idle - self.taken_since_report)
        return max(0, self.slots_total - len(self.in_flight) - self.others)


def blend(old: float, new: float) -> float:
    """An exponentially weighted mean: `new` folded into `old` (`new` alone when `old` is 0)."""
    return new if old <= 0 else old + RATE_WEIGHT * (new - old)
