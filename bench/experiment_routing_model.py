"""The fleet core against model llama-servers: a fast, deterministic look at routing policies.

The affinity scenario (`scenario_affinity`) runs real llama-servers and takes minutes a run,
with run-to-run noise of 10-20 points of reuse; policy questions (which server a new
conversation goes to, who takes a freed slot while requests wait) need many runs. This drives
the real `Fleet` (one or two balancers) with simulated time against model servers shaped like
the scenario's: 3 servers x 2 slots, each keeping the prompt state of its last `keep`
conversations (slots plus host RAM, least recently used first out), an unbounded queue inside
the server (as llama-server's), prefill and decode slowing as slots fill. Conversations as in
the scenario: a ~3,000-token private prefix, turns adding 44 tokens, users thinking 0.3-3 s,
all starting within 2 s. Agents report every `interval` seconds to every balancer; with two
balancers a conversation's turns alternate between them. The anchor hashes each conversation
to a server and ignores load (HAProxy hashing a session header).

Compared: the anchor; Rower with the buffer first come first served (`buffer_patience=0`, as
before home lines) and as it is; two Rowers, on their own and following each other's
placements (`--peer-balancer-addr`). Reuse = Σ cached prompt tokens / Σ prompt tokens; with it
each request's end-to-end time (p50, p99) and the turns served in the run (the servers' time a
policy saves on prefill serves more turns); medians over seeds. It is a model: it says which
policy is better and by about how much, not what llama-server will measure.

Also the prompt tokens computed (the prefill work) and the turns served elsewhere than their
conversation's previous turn (moved).

    python -m bench.experiment_routing_model [--seeds 9] [--conversations 12 18]
"""

from __future__ import annotations

import argparse
import functools
import heapq
import itertools
import random
import statistics
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.fleet import BUFFER_PATIENCE, Dispatch, Fleet, Routing
from rower.balancer.request_needs import RequestNeeds
from rower.status import SlotStatus, StatusUpdate

SERVERS = 3
SLOTS = 2
BYTES_PER_TOKEN = 4
PREFIX_TOKENS = 3000
TURN_TOKENS = 44
"""A 12-token user message and a 32-token answer."""
ANSWER_TOKENS = 32
PREFILL_RATE = 4000.0
DECODE_RATE = 60.0
BATCH_SLOWDOWN = 0.5
"""Each further busy slot of a server makes its requests this much slower."""


@dataclass
class ModelServer:
    """A llama-server: slots, a queue, and the prompt states of its last `keep` conversations."""

    index: int
    keep: int
    active: int = 0
    queue: list[tuple[int, int]] = field(default_factory=list)
    cache: OrderedDict[int, int] = field(default_factory=OrderedDict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{9000 + self.index}"

    def status(self) -> StatusUpdate:
        slots = [
            SlotStatus(id=i, is_processing=i < self.active, n_ctx=8192, id_task=1, n_remain=10)
            for i in range(SLOTS)
        ]
        return StatusUpdate(
            external_llamacpp_addr=self.address,
            slots_idle=SLOTS - self.active,
            slots_processing=self.active,
            slots_total=SLOTS,
            model="m",
            slots=slots,
        )


@dataclass(frozen=True)
class Outcome:
    """What one run measured."""

    reuse: float
    e2e_p50: float
    e2e_p99: float
    turns: int
    computed: float = 0.0
    """Prompt tokens computed (not found cached), in thousands: the prefill work."""
    moved: float = 0.0
    """Turns served elsewhere than their conversation's previous turn."""


@dataclass
class Conversation:
    think: float
    tokens: int = PREFIX_TOKENS
    balancer: int = 0

    def needs(self, number: int) -> RequestNeeds:
        blocks = self.tokens * BYTES_PER_TOKEN // 512
        prefix = tuple(number * 100_000 + block for block in range(blocks))
        return RequestNeeds("/completion", takes_slot=True, prefix=prefix)


def run(
    conversations: int,
    *,
    balancers: int = 1,
    anchor: bool = False,
    seed: int = 0,
    seconds: float = 60.0,
    interval: float = 1.0,
    keep: int = 5,
    patience: float = BUFFER_PATIENCE,
    shared: bool = False,
) -> Outcome:
    """One run; `shared`: the balancers tell each other their placements."""
    rng = random.Random(seed)
    servers = [ModelServer(i, keep) for i in range(SERVERS)]
    fleets = [
        Fleet(max_buffered=100, routing=Routing.CACHE_AWARE, buffer_patience=patience)
        for _ in range(balancers)
    ]
    for fleet in fleets:
        for server in servers:
            fleet.report(f"agent{server.index}", server.status(), 0.0, 0.0)
    chats = {
        n: Conversation(rng.uniform(0.3, 3.0), balancer=n % balancers) for n in range(conversations)
    }
    events: list[tuple[float, int, str, tuple[int, ...]]] = []
    order = itertools.count()

    def at(time: float, kind: str, *args: int) -> None:
        heapq.heappush(events, (time, next(order), kind, args))

    sent: dict[int, tuple[int, int, Dispatch | None]] = {}
    """request id -> (conversation, balancer, its dispatch)."""
    answers: dict[int, AnswerTimings] = {}
    prompt = cached = 0
    request_ids = itertools.count(1)
    sent_at: dict[int, float] = {}
    e2e: list[float] = []

    served_on: dict[int, int] = {}
    moved = 0

    def begin(server: ModelServer, request_id: int, now: float) -> None:
        nonlocal prompt, cached, moved
        chat = chats[sent[request_id][0]]
        previous = served_on.get(sent[request_id][0], server.index)
        moved += previous != server.index
        served_on[sent[request_id][0]] = server.index
        held = server.cache.pop(sent[request_id][0], 0)
        held = held if held <= chat.tokens else 0
        server.active += 1
        slowdown = 1 + BATCH_SLOWDOWN * (server.active - 1)
        computed = chat.tokens - held
        took = (computed / PREFILL_RATE + ANSWER_TOKENS / DECODE_RATE) * slowdown
        prompt, cached = prompt + chat.tokens, cached + held
        answers[request_id] = AnswerTimings(
            evaluated=computed,
            cached=held,
            prompt_seconds=computed / PREFILL_RATE,
            generated=ANSWER_TOKENS,
            generation_seconds=ANSWER_TOKENS / DECODE_RATE,
        )
        at(now + took, "done", request_id, server.index)

    def deliver(dispatches: list[Dispatch], now: float) -> None:
        for dispatch in dispatches:
            conversation, balancer, _ = sent[dispatch.request_id]
            sent[dispatch.request_id] = (conversation, balancer, dispatch)
            if shared and dispatch.placement is not None:
                for peer, fleet in enumerate(fleets):
                    if peer != balancer:
                        fleet.placed_by_peer(dispatch.placement)
            server = next(s for s in servers if s.address == dispatch.upstream)
            if server.active >= SLOTS:
                server.queue.append((balancer, dispatch.request_id))
            else:
                begin(server, dispatch.request_id, now)

    for n in chats:
        at(rng.uniform(0, 2), "send", n)
    at(0.0, "report")
    at(0.0, "tick")
    while events:
        now, _, kind, args = heapq.heappop(events)
        if kind == "send" and now <= seconds:
            chat = chats[args[0]]
            request_id = next(request_ids)
            sent[request_id] = (args[0], chat.balancer, None)
            sent_at[request_id] = now
            if anchor:
                server = servers[(args[0] * 2_654_435_761 >> 7) % SERVERS]
                deliver([Dispatch(request_id, f"agent{server.index}", server.address)], now)
                continue
            needs = chat.needs(args[0])
            decision = fleets[chat.balancer].request_slot(request_id, now, needs=needs)
            if isinstance(decision, Dispatch):
                deliver([decision], now)
        elif kind == "done":
            request_id, index = args
            server = servers[index]
            conversation, balancer, dispatched = sent[request_id]
            chat = chats[conversation]
            e2e.append(now - sent_at[request_id])
            server.active -= 1
            server.cache[conversation] = chat.tokens + ANSWER_TOKENS
            while len(server.cache) > server.keep:
                server.cache.popitem(last=False)
            if server.queue:
                begin(server, server.queue.pop(0)[1], now)
            if dispatched is not None and not anchor:
                fleet = fleets[balancer]
                fleet.answered(
                    f"agent{index}",
                    answers[request_id],
                    head_bytes=chat.tokens * BYTES_PER_TOKEN,
                    matched_blocks=dispatched.matched_blocks,
                    newer_blocks=dispatched.newer_blocks,
                )
                deliver(fleet.release(request_id, now), now)
            chat.tokens += TURN_TOKENS
            chat.balancer = (chat.balancer + 1) % balancers
            at(now + chat.think * rng.uniform(0.7, 1.3), "send", conversation)
        elif kind == "report" and now <= seconds:
            for fleet in fleets:
                for server in servers:
                    deliver(fleet.report(f"agent{server.index}", server.status(), now, now), now)
            at(now + interval, "report")
        elif kind == "tick" and now <= seconds:
            for fleet in fleets:
                deliver(fleet.expire_waits(now), now)
            at(now + 0.02, "tick")
    e2e.sort()
    return Outcome(
        cached / prompt if prompt else 0.0,
        e2e[len(e2e) // 2] if e2e else 0.0,
        e2e[int(len(e2e) * 0.99)] if e2e else 0.0,
        len(e2e),
        (prompt - cached) / 1000,
        moved,
    )


def medians(runs: Callable[..., Outcome], seeds: range) -> Outcome:
    """Each measure's median over `seeds` (given to `runs` as `seed=`)."""
    outcomes = [runs(seed=seed) for seed in seeds]
    return Outcome(
        statistics.median(o.reuse for o in outcomes),
        statistics.median(o.e2e_p50 for o in outcomes),
        statistics.median(o.e2e_p99 for o in outcomes),
        round(statistics.median(o.turns for o in outcomes)),
        statistics.median(o.computed for o in outcomes),
        statistics.median(o.moved for o in outcomes),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=9)
    parser.add_argument("--conversations", type=int, nargs="+", default=[12, 18])
    args = parser.parse_args()
    seeds = range(args.seeds)
    for n in args.conversations:
        print(
            f"{n} conversations: reuse, e2e p50 / p99 (s), turns served, "
            "thousand tokens computed, turns moved"
        )
        policies: dict[str, dict[str, Any]] = {
            "anchor (session hash)": {"anchor": True},
            "Rower, first-come buffer": {"patience": 0.0},
            "Rower": {},
            "two Rowers alternating": {"balancers": 2},
            "two Rowers following each other": {"balancers": 2, "shared": True},
        }
        for name, options in policies.items():
            o = medians(functools.partial(run, n, **options), seeds)
            print(
                f"  {name:34} {o.reuse:.2f}  {o.e2e_p50:.2f} / {o.e2e_p99:.2f}  {o.turns}"
                f"  {o.computed:.0f}  {o.moved:.0f}"
            )


if __name__ == "__main__":
    main()
