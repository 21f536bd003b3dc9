"""The fleet core under random interleavings of every event it knows.

The model beside it plays the llama-servers: which of our requests each one runs, and the work
of other clients. After every step the invariants must hold: no request is lost or counted
twice, no server runs more than it has slots of our requests and of the other clients' work,
and nobody waits while a usable slot is free. Reports may arrive a while after their poll,
saying how old it is, while requests end and start in between. Other clients' work starts only
where a report tells the balancer at once: work it cannot know of may take a slot it fills, and
llama-server then queues one request (not modelled).

Agents come and go: each server has a list of live agents (ids `s<server>-g<generation>`), and
a restarted agent may report beside an old one that never said goodbye (frozen). Whatever their
order, each server is counted once, and a drained agent gets nothing new.
"""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.fleet import (
    BUFFER_PATIENCE,
    MAX_AFFINITY_WAIT,
    Buffered,
    Dispatch,
    Fleet,
    Rejected,
)
from rower.balancer.models import ModelRules
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream_index import pick_key
from rower.status import SlotStatus, StatusUpdate

AGENTS = ["a0", "a1", "a2"]
"""The servers; `a0` is also the id of server 0's first agent."""

MODELS = {"a0": "alpha", "a1": "alpha", "a2": "beta"}
"""What each server serves: two models, each with its own buffer."""


def server_of(agent_id: str) -> str:
    return agent_id.split("-")[0]


def status(
    agent: str,
    total: int,
    processing: int,
    *,
    error: str | None = None,
    poll_age_ms: float | None = None,
) -> StatusUpdate:
    # Busy slots say they have a few tokens left: a request may wait for its home server.
    slots = [
        SlotStatus(id=i, is_processing=i < processing, n_remain=5 if i < processing else None)
        for i in range(0 if error else total)
    ]
    return StatusUpdate(
        slots=slots,
        external_llamacpp_addr=f"127.0.0.1:{8000 + AGENTS.index(server_of(agent))}",
        model=MODELS[server_of(agent)],
        error=error,
        slots_idle=0 if error else total - processing,
        slots_processing=0 if error else processing,
        slots_total=0 if error else total,
        monitoring_interval_ms=1000,
        poll_age_ms=poll_age_ms,
    )


class FleetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fleet = Fleet(max_buffered=3, models=ModelRules(declared=("alpha", "beta")))
        self.now = 0.0
        self.next_id = 0
        self.totals = {a: 1 + i for i, a in enumerate(AGENTS)}
        self.running: dict[str, set[int]] = {a: set() for a in AGENTS}  # server truth
        self.zombies: dict[str, set[int]] = {a: set() for a in AGENTS}
        """Requests whose client left but that the server still runs (non-streamed)."""
        self.recent: dict[str, set[int]] = {a: set() for a in AGENTS}
        """Requests sent to a server since its last report: its poll may have missed them."""
        self.polls: dict[str, tuple[float, int]] = {}
        """A server's poll whose report has not arrived yet: when, and the busy slots it saw."""
        self.others: dict[str, set[int]] = {a: set() for a in AGENTS}
        """Work of other clients (another balancer, a direct client) each server runs."""
        self.next_other = 0
        self.waiting: set[int] = set()
        self.retried: set[int] = set()
        self.rejected = 0
        self.live: dict[str, list[str]] = {a: [a] for a in AGENTS}
        """Agents with an open stream for each server, oldest first."""
        self.generations = dict.fromkeys(AGENTS, 0)
        self.drained: set[str] = set()
        self.homing_since: dict[int, float] = {}
        self.model_of: dict[int, str] = {}
        self.needs_of: dict[int, RequestNeeds] = {}

    # The server side.

    def _dispatched(self, dispatches: list[Dispatch]) -> None:
        for d in dispatches:
            assert d.request_id in self.waiting
            self._check_target(d)
            self.waiting.discard(d.request_id)
            self.retried.discard(d.request_id)
            self.running[server_of(d.agent_id)].add(d.request_id)
            self.recent[server_of(d.agent_id)].add(d.request_id)

    def _check_target(self, d: Dispatch) -> None:
        assert MODELS[server_of(d.agent_id)] == self.model_of[d.request_id] == d.model
        assert d.agent_id in self.fleet.upstreams, "dispatched to an agent not in the fleet"
        assert not self.fleet.is_superseded(d.agent_id)
        assert d.agent_id not in self.drained, "dispatched to a drained agent"

    def _where(self, request_id: int) -> str:
        return next(a for a, ids in self.running.items() if request_id in ids)

    def _busy_at_poll(self, server: str, unseen: int) -> int:
        # The poll may have missed requests sent since the last report, still in transit; the
        # estimate of others' work assumes it did not (`fleet`'s docstring), so only where
        # there is none.
        missed = 0 if self.others[server] else unseen
        missed = min(missed, len(self.recent[server] & self.running[server]))
        busy = len(self.running[server]) - missed + len(self.zombies[server])
        return busy + len(self.others[server])

    @rule(
        server=st.sampled_from(AGENTS),
        which=st.integers(0, 2),
        unseen=st.integers(0, 3),
        dated=st.booleans(),
    )
    def healthy_report(self, server: str, which: int, unseen: int, dated: bool) -> None:
        # Polled as it arrives; from an older agent (not dated), or saying its poll is 0 ms old.
        self.now += 0.01
        processing = self._busy_at_poll(server, unseen)
        self._report(server, which, processing, 0.0 if dated else None)

    @rule(server=st.sampled_from(AGENTS), unseen=st.integers(0, 3))
    def agent_polls(self, server: str, unseen: int) -> None:
        # Its report arrives later (`polled_report_arrives`): requests end and start meanwhile.
        self.now += 0.001
        self.polls[server] = (self.now, self._busy_at_poll(server, unseen))
        self.now += 0.001

    @precondition(lambda self: bool(self.polls))
    @rule(data=st.data(), which=st.integers(0, 2))
    def polled_report_arrives(self, data: st.DataObject, which: int) -> None:
        server = data.draw(st.sampled_from(sorted(self.polls)))
        polled, processing = self.polls[server]
        self.now += 0.001
        self._report(server, which, processing, (self.now - polled) * 1000)

    @rule(server=st.sampled_from(AGENTS), dated=st.booleans())
    def another_client_takes_a_slot(self, server: str, dated: bool) -> None:
        busy = len(self.running[server]) + len(self.zombies[server]) + len(self.others[server])
        if busy >= self.totals[server] or not self.live[server]:
            return
        self.next_other -= 1
        self.others[server].add(self.next_other)
        self.now += 0.01
        agent = self.live[server][-1]
        self._report(server, 0, self._busy_at_poll(server, 0), 0.0 if dated else None)
        if agent not in self.fleet.upstreams:
            # A report the balancer did not take (a superseded agent's): the work never began.
            self.others[server].discard(self.next_other)

    @precondition(lambda self: any(self.others.values()))
    @rule(data=st.data())
    def another_clients_work_ends(self, data: st.DataObject) -> None:
        every = sorted(i for ids in self.others.values() for i in ids)
        work = data.draw(st.sampled_from(every))
        for ids in self.others.values():
            ids.discard(work)

    def _report(self, server: str, which: int, processing: int, age_ms: float | None) -> None:
        # Agents send their newest poll: one taken before this report is never sent after it.
        self.polls.pop(server, None)
        if not self.live[server]:
            self.live[server].append(self._new_agent(server))
        agent = self.live[server][-1 - which % len(self.live[server])]
        line = status(agent, self.totals[server], processing, poll_age_ms=age_ms)
        out = self.fleet.report(agent, line, self.now, 0.0)
        self.recent[server].clear()
        self._dispatched(out)
        if agent in self.fleet.upstreams and not self.fleet.upstreams[agent].prefill_rate:
            # Its first answers: slow prefill, so waiting for a busy home server pays.
            self.fleet.answered(agent, AnswerTimings(100, 50, 10.0, 50, 0.01))

    @rule(server=st.sampled_from(AGENTS))
    def broken_report(self, server: str) -> None:
        if not self.live[server]:
            return
        agent = self.live[server][-1]
        self.now += 0.01
        out = self.fleet.report(agent, status(agent, 1, 0, error="Unauthorized"), self.now, 0.0)
        assert out == [] or all(server_of(d.agent_id) != server for d in out)
        self._dispatched(out)

    @rule(server=st.sampled_from(AGENTS), which=st.integers(0, 2))
    def agent_leaves(self, server: str, which: int) -> None:
        if not self.live[server]:
            return
        agent = self.live[server].pop(which % len(self.live[server]))
        self.fleet.remove_agent(agent)

    @rule(server=st.sampled_from(AGENTS))
    def agent_restarts_beside_the_old_one(self, server: str) -> None:
        # The old agent is frozen, not gone: its stream stays open.
        agent = self._new_agent(server)
        self.live[server].append(agent)
        self.polls.pop(server, None)
        processing = len(self.running[server]) + len(self.zombies[server])
        processing += len(self.others[server])
        self.now += 0.01
        out = self.fleet.report(
            agent, status(agent, self.totals[server], processing), self.now, 0.0
        )
        self.recent[server].clear()
        self._dispatched(out)
        assert agent in self.fleet.upstreams
        for old in self.live[server][:-1]:
            assert old not in self.fleet.upstreams

    @rule(server=st.sampled_from(AGENTS))
    def operator_drains(self, server: str) -> None:
        for agent_id, upstream in self.fleet.upstreams.items():
            if server_of(agent_id) == server:
                assert self.fleet.drain(agent_id)
                self.drained.add(agent_id)
                assert upstream.slots_free(self.now) == 0
        assert not self.fleet.drain("nobody")

    def _new_agent(self, server: str) -> str:
        self.generations[server] += 1
        return f"{server}-g{self.generations[server]}"

    @rule(seconds=st.sampled_from([0.01, 0.5, 2.0, 5.0]))
    def time_passes(self, seconds: float) -> None:
        self.now += seconds
        self.fleet.time_passed(self.now)
        self._dispatched(self.fleet.expire_waits(self.now))

    @rule(server=st.sampled_from(AGENTS), fast=st.booleans())
    def answer_tells_the_speeds(self, server: str, fast: bool) -> None:
        # Slow prefill makes waiting for a conversation's busy home server worth it.
        prefill = 0.001 if fast else 10.0
        for agent_id in self.fleet.upstreams:
            if server_of(agent_id) == server:
                self.fleet.answered(agent_id, AnswerTimings(100, 50, prefill, 50, 0.01))

    @rule(
        conversation=st.none() | st.integers(0, 3),
        turn=st.integers(1, 6),
        model=st.sampled_from(["alpha", "beta"]),
    )
    def request_arrives(self, conversation: int | None, turn: int, model: str) -> None:
        # Cache-aware routing (the default) on a few conversations, whose turns grow, and on
        # requests without a prefix: it must keep every invariant of the slot accounting.
        self.next_id += 1
        prefix: tuple[int, ...] = ()
        if conversation is not None:
            prefix = tuple(conversation * 100 + block for block in range(turn))
        needs = RequestNeeds("/completion", True, model=model, prefix=prefix, shared_blocks=1)
        self.model_of[self.next_id] = model
        self.needs_of[self.next_id] = needs
        decision = self.fleet.request_slot(self.next_id, self.now, needs=needs)
        if isinstance(decision, Dispatch):
            overtaken = [
                i for i in self.waiting if not self.fleet.is_homing(i) and self.model_of[i] == model
            ]
            # Only into a slot held for waiting requests of other servers (`waiting_line`).
            assert not overtaken or self._held_for_others(model), "a request overtook the buffer"
            self._check_target(decision)
            self.running[server_of(decision.agent_id)].add(decision.request_id)
        elif isinstance(decision, Buffered):
            assert decision.model == model
            self.waiting.add(decision.request_id)
            if self.fleet.is_homing(decision.request_id):
                assert decision.until is not None
                self.homing_since[decision.request_id] = self.now
        else:
            assert isinstance(decision, Rejected)
            waiting_here = [i for i in self.waiting if self.model_of[i] == model]
            assert len(waiting_here) >= self.fleet.max_buffered
            self.rejected += 1

    @precondition(lambda self: any(self.running.values()))
    @rule(data=st.data())
    def request_finishes(self, data: st.DataObject) -> None:
        every = sorted(i for ids in self.running.values() for i in ids)
        request_id = data.draw(st.sampled_from(every))
        self.running[self._where(request_id)].discard(request_id)
        self._dispatched(self.fleet.release(request_id, self.now))
        # Releasing twice is harmless.
        assert self.fleet.release(request_id, self.now) == []

    @precondition(lambda self: any(self.running.values()))
    @rule(data=st.data())
    def client_leaves_while_the_server_generates(self, data: st.DataObject) -> None:
        every = sorted(i for ids in self.running.values() for i in ids)
        request_id = data.draw(st.sampled_from(every))
        server = self._where(request_id)
        self.running[server].discard(request_id)
        self.zombies[server].add(request_id)
        self._dispatched(self.fleet.release(request_id, self.now, abandoned=True))

    @precondition(lambda self: any(self.zombies.values()))
    @rule(data=st.data())
    def abandoned_generation_ends(self, data: st.DataObject) -> None:
        every = sorted(i for ids in self.zombies.values() for i in ids)
        request_id = data.draw(st.sampled_from(every))
        for ids in self.zombies.values():
            ids.discard(request_id)

    @precondition(lambda self: bool(self.waiting))
    @rule(data=st.data())
    def waiting_client_leaves(self, data: st.DataObject) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.waiting)))
        self.waiting.discard(request_id)
        self.retried.discard(request_id)
        assert self.fleet.release(request_id, self.now) == []

    @precondition(lambda self: any(self.running.values()))
    @rule(data=st.data())
    def upstream_refuses(self, data: st.DataObject) -> None:
        every = sorted(i for ids in self.running.values() for i in ids)
        request_id = data.draw(st.sampled_from(every))
        agent = self._where(request_id)
        self.running[agent].discard(request_id)
        self._dispatched(self.fleet.refused(request_id, self.now, 0.0))
        needs = self.needs_of[request_id]
        decision = self.fleet.request_slot(request_id, self.now, needs=needs, retry=True)
        if isinstance(decision, Dispatch):
            self._check_target(decision)
            assert server_of(decision.agent_id) != agent or not any(
                server_of(a) == agent for a in self.fleet.upstreams
            )
            self.running[server_of(decision.agent_id)].add(request_id)
        else:
            assert isinstance(decision, Buffered)
            self.waiting.add(request_id)
            self.retried.add(request_id)

    # Invariants.

    @invariant()
    def every_request_is_in_one_place(self) -> None:
        running = [i for ids in self.running.values() for i in ids]
        assert len(running) == len(set(running))
        assert self.fleet.requests_in_flight == len(running)
        assert self.fleet.requests_buffered == len(self.waiting)
        for request_id in self.waiting:
            assert self.fleet.is_waiting(request_id)
            assert self.fleet.upstream_of(request_id) is None
        for agent, ids in self.running.items():
            for request_id in ids:
                owner = self.fleet.upstream_of(request_id)
                assert owner is not None
                assert server_of(owner) == agent
                assert not self.fleet.is_waiting(request_id)

    @invariant()
    def no_server_runs_more_than_its_slots(self) -> None:
        for agent, ids in self.running.items():
            others = self.others[agent]
            busy = len(ids) + len(self.zombies[agent]) + len(others)
            assert busy <= self.totals[agent], (agent, ids, self.zombies[agent], others)

    @invariant()
    def balancer_counts_match_the_servers(self) -> None:
        servers = [server_of(agent) for agent in self.fleet.upstreams]
        assert len(servers) == len(set(servers)), f"a server counted twice: {servers}"
        for agent, upstream in self.fleet.upstreams.items():
            assert upstream.in_flight == self.running[server_of(agent)]
            assert upstream.slots_free(self.now) >= 0
            assert upstream.slots_processing <= upstream.slots_total

    @invariant()
    def nobody_waits_while_a_slot_of_its_model_is_free(self) -> None:
        # Except, a short while, a request waiting for the busy server holding its prefix, and
        # slots held while every waiting request belongs to another server.
        for request_id in self.waiting:
            if not self.fleet.is_homing(request_id):
                model = self.model_of[request_id]
                free = self.fleet.pick(self.now, model)
                assert free is None or self._held_for_others(model), free.identity

    def _held_for_others(self, model: str) -> bool:
        """Whether every free slot of `model` is held: each waiting request has a home that is
        not a server with a free slot, or is a new conversation (which lets the slots of
        servers with more conversations go, until its patience ends); and the oldest has
        waited less than its patience."""
        waiters = [waiter for _, waiter in self.fleet.pools[model].waiting.items()]
        if not waiters:
            return True
        free = {
            u.identity
            for u in self.fleet.upstreams.values()
            if u.model == model and u.slots_free(self.now) > 0
        }
        return self.now - waiters[0].since < BUFFER_PATIENCE and all(
            (waiter.home is not None and waiter.home not in free) or waiter.new_conversation
            for waiter in waiters
        )

    @invariant()
    def nobody_waits_for_its_home_server_for_long(self) -> None:
        for request_id in self.waiting:
            if self.fleet.is_homing(request_id):
                assert request_id in self.homing_since
                assert self.now - self.homing_since[request_id] <= MAX_AFFINITY_WAIT

    @invariant()
    def the_index_picks_the_best_upstream_of_each_model(self) -> None:
        for model in ("alpha", "beta"):
            candidates = [
                u
                for u in self.fleet.upstreams.values()
                if u.slots_free(self.now) > 0 and u.model == model
            ]
            best = min(candidates, key=lambda u: pick_key(u, self.now), default=None)
            assert self.fleet.pick(self.now, model) is best

    @invariant()
    def each_models_buffer_is_bounded(self) -> None:
        for model in ("alpha", "beta"):
            waiting = [i for i in self.waiting - self.retried if self.model_of[i] == model]
            assert len(waiting) <= self.fleet.max_buffered

    def teardown(self) -> None:
        # Everything finishes: the balancer must be back to zero.
        for request_id in list(self.waiting):
            self.fleet.release(request_id, self.now)
        self.waiting.clear()
        for ids in self.running.values():
            for request_id in list(ids):
                out = self.fleet.release(request_id, self.now)
                for d in out:
                    self.fleet.release(d.request_id, self.now)
        assert self.fleet.requests_in_flight == 0
        assert self.fleet.requests_buffered == 0
        assert all(not u.in_flight for u in self.fleet.upstreams.values())


FleetMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
TestFleetMachine = FleetMachine.TestCase
