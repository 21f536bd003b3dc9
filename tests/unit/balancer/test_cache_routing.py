"""The cache-aware pick, fed events: where conversations go, and when they spill."""

from __future__ import annotations

from dataclasses import replace

import pytest

from rower.balancer.affinity import BLOCK_BYTES
from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.cache_routing import Affinity
from rower.balancer.fleet import (
    BUFFER_PATIENCE,
    MAX_AFFINITY_WAIT,
    SPILL_COST,
    Buffered,
    Dispatch,
    Fleet,
    Routing,
)
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream import Upstream
from rower.status import SlotStatus, StatusUpdate


def status(
    port: int, total: int, processing: int = 0, *, task: int | None = None, model: str = "m"
) -> StatusUpdate:
    slots = [
        SlotStatus(id=i, is_processing=i < processing, n_ctx=4096, id_task=task)
        for i in range(total)
    ]
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{port}",
        slots_idle=total - processing,
        slots_processing=processing,
        slots_total=total,
        model=model,
        slots=slots,
    )


def fleet_of(*totals: int, routing: Routing = Routing.CACHE_AWARE) -> Fleet:
    fleet = Fleet(max_buffered=10, routing=routing)
    for n, total in enumerate(totals):
        fleet.report(f"agent{n}", status(8000 + n, total), 0.0, 0.0)
    return fleet


def turn(conversation: int, blocks: int) -> RequestNeeds:
    prefix = tuple(conversation * 1000 + b for b in range(blocks))
    return RequestNeeds("/v1/chat/completions", takes_slot=True, prefix=prefix)


class Client:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.ids = 0

    def send(self, needs: RequestNeeds | None) -> Dispatch:
        self.ids += 1
        decision = self.fleet.request_slot(self.ids, 0.0, needs=needs)
        assert isinstance(decision, Dispatch), decision
        return decision


def test_a_conversation_returns_to_its_server_while_it_has_a_free_slot() -> None:
    fleet = fleet_of(2, 2, 2)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    assert first.affinity is Affinity.MISS
    fleet.release(first.request_id, 0.0)
    for blocks in (6, 9, 12):
        # Other traffic makes the conversation's server busier than the rest.
        other = client.send(None)
        again = client.send(turn(1, blocks))
        assert (again.upstream, again.affinity) == (first.upstream, Affinity.HIT)
        assert again.matched_blocks == blocks - (3 if blocks > 6 else 2)
        fleet.release(again.request_id, 0.0)
        fleet.release(other.request_id, 0.0)


def test_a_conversation_spills_when_its_server_is_full() -> None:
    fleet = fleet_of(1, 1)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    fleet.release(first.request_id, 0.0)
    # Someone else takes the conversation's only slot.
    blocker = client.send(turn(2, 4))
    if blocker.upstream != first.upstream:
        fleet.release(blocker.request_id, 0.0)
        blocker = client.send(turn(1, 5))
    spilled = client.send(turn(1, 8))
    assert spilled.upstream != first.upstream
    assert spilled.affinity is Affinity.SPILL_BUSY


def test_the_load_guard_sends_a_conversation_to_a_much_less_busy_server() -> None:
    fleet = fleet_of(8, 8)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    fleet.release(first.request_id, 0.0)
    busy = [client.send(turn(100 + n, 4)) for n in range(12)]
    held = [d for d in busy if d.upstream == first.upstream]
    for d in busy:
        if d.upstream != first.upstream:
            fleet.release(d.request_id, 0.0)
    assert len(held) >= 5, "the test needs the conversation's server busy"
    spilled = client.send(turn(1, 6))
    assert (spilled.upstream, spilled.affinity) != (first.upstream, Affinity.HIT)
    assert spilled.affinity is Affinity.SPILL_LOAD


def test_new_conversations_spread_and_two_balancers_agree_on_them() -> None:
    one, two = Client(fleet_of(4, 4, 4)), Client(fleet_of(4, 4, 4))
    chosen = []
    for conversation in range(30):
        a, b = one.send(turn(conversation, 3)), two.send(turn(conversation, 3))
        assert a.upstream == b.upstream
        chosen.append(a.upstream)
        one.fleet.release(a.request_id, 0.0)
        two.fleet.release(b.request_id, 0.0)
    assert len(set(chosen)) == 3
    assert max(chosen.count(u) for u in set(chosen)) <= 20


def test_new_conversations_fill_the_servers_evenly_among_the_least_busy() -> None:
    # Idle servers tie on load: a new conversation goes to the one holding the fewest, so no
    # server's cache gets more conversations than its share while another's has room.
    client = Client(fleet_of(2, 2, 2))
    chosen = []
    for conversation in range(9):
        sent = client.send(turn(conversation, 3))
        chosen.append(sent.upstream)
        client.fleet.release(sent.request_id, 0.0)
    assert sorted(chosen.count(u) for u in set(chosen)) == [3, 3, 3]


def test_conversations_sharing_only_a_system_prompt_spread_and_return_home() -> None:
    fleet = fleet_of(2, 2, 2)
    client = Client(fleet)
    system = tuple(range(5))

    def chat(conversation: int, own: int) -> RequestNeeds:
        prefix = (*system, *(conversation * 1000 + b for b in range(own)))
        return RequestNeeds("/v1/chat/completions", True, prefix=prefix, shared_blocks=5)

    first = {}
    for conversation in range(1, 13):
        sent = client.send(chat(conversation, 2))
        assert sent.affinity is Affinity.MISS
        first[conversation] = sent.upstream
        fleet.release(sent.request_id, 0.0)
    # The shared system prompt did not pull them onto one server.
    assert len(set(first.values())) == 3
    assert max(list(first.values()).count(u) for u in set(first.values())) <= 6
    for conversation, upstream in first.items():
        again = client.send(chat(conversation, 3))
        assert (again.upstream, again.affinity) == (upstream, Affinity.HIT)
        fleet.release(again.request_id, 0.0)


def forgotten(*totals: int) -> tuple[Fleet, Client, Upstream]:
    """Conversation 1 went to a server once, and the memory forgot it for room there."""
    fleet = fleet_of(*totals)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    fleet.release(first.request_id, 0.0)
    (home,) = [u for u in fleet.upstreams.values() if u.address == first.upstream]
    fleet.prefixes.trim(home.identity, 0)
    return fleet, client, home


def test_a_conversation_forgotten_for_room_goes_back_to_its_last_server() -> None:
    fleet, client, home = forgotten(2, 2)
    # Its server is busier than the other now; the memory no longer believes it holds it.
    busy = client.send(None)
    if busy.upstream != home.address:
        fleet.release(busy.request_id, 0.0)
        busy = client.send(None)
    assert busy.upstream == home.address
    again = client.send(turn(1, 6))
    assert (again.upstream, again.affinity) == (home.address, Affinity.RETURN)


def test_a_freed_slot_goes_first_to_a_waiting_turn_its_server_holds() -> None:
    fleet = fleet_of(1, 1)
    client = Client(fleet)
    homes = {}
    for conversation in (1, 2):
        sent = client.send(turn(conversation, 4))
        homes[conversation] = sent.upstream
    assert homes[1] != homes[2]
    # Both slots busy: conversation 2's next turn waits, then conversation 1's.
    fleet.release(1, 0.0)
    fleet.release(2, 0.0)
    blockers = [client.send(turn(10 + n, 4)) for n in range(2)]
    second = fleet.request_slot(50, 0.1, needs=turn(2, 6))
    first = fleet.request_slot(51, 0.2, needs=turn(1, 6))
    assert isinstance(second, Buffered)
    assert isinstance(first, Buffered)
    # Conversation 1's server frees first: its turn goes there, though it came later.
    (freed,) = [b for b in blockers if b.upstream == homes[1]]
    (sent,) = fleet.release(freed.request_id, 0.5)
    assert (sent.request_id, sent.upstream, sent.affinity) == (51, homes[1], Affinity.HIT)


def waiting_for_home() -> tuple[Fleet, Dispatch, Buffered]:
    """Two 1-slot servers, both busy with new conversations; conversation 1's next turn
    (request 50) waits for its home. Returns the fleet, the other server's request, the wait."""
    fleet = fleet_of(1, 1)
    client = Client(fleet)
    home = client.send(turn(1, 4)).upstream
    fleet.release(1, 0.0)
    blockers = {b.upstream: b for b in (client.send(turn(10 + n, 4)) for n in range(2))}
    waiting = fleet.request_slot(50, 0.0, needs=turn(1, 6))
    assert isinstance(waiting, Buffered)
    other = next(u for u in blockers if u != home)
    return fleet, blockers[other], waiting


def test_a_waiting_turn_lets_others_pass_for_a_bounded_time_only() -> None:
    fleet, blocker, _ = waiting_for_home()
    other = blocker.upstream
    # Its home is still busy after the patience: the other server's slot takes it.
    (sent,) = fleet.release(blocker.request_id, BUFFER_PATIENCE + 0.1)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, other, Affinity.SPILL_BUSY)


def test_a_freed_slot_waits_a_while_when_every_waiting_turn_belongs_to_another_server() -> None:
    fleet, blocker, waiting = waiting_for_home()
    other = blocker.upstream
    assert waiting.until == BUFFER_PATIENCE
    # The other server frees a slot: moving conversation 1 there would cost its whole prompt,
    # so the slot is held for its own conversations and for new ones.
    assert fleet.release(blocker.request_id, 0.5) == []
    assert fleet.requests_buffered == 1
    newcomer = fleet.request_slot(51, 0.6, needs=turn(3, 4))
    assert isinstance(newcomer, Dispatch)
    assert newcomer.upstream == other
    assert fleet.expire_waits(1.0) == []
    fleet.release(51, 1.0)
    # The waiting turn's patience ends: it takes the held slot.
    (sent,) = fleet.expire_waits(BUFFER_PATIENCE)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, other, Affinity.SPILL_BUSY)
    assert fleet.requests_buffered == 0


def test_a_held_slot_takes_a_newcomer_of_its_own_server_but_not_of_another() -> None:
    fleet = fleet_of(1, 1)
    client = Client(fleet)
    homes = {n: client.send(turn(n, 4)).upstream for n in (1, 2)}
    assert homes[1] != homes[2]
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(1, 6)), Buffered)
    assert fleet.release(2, 0.1) == []  # conversation 2's server: held for it
    assert isinstance(fleet.request_slot(51, 0.2, needs=turn(1, 7)), Buffered)
    mine = fleet.request_slot(52, 0.3, needs=turn(2, 6))
    assert isinstance(mine, Dispatch)
    assert (mine.upstream, mine.affinity) == (homes[2], Affinity.HIT)


def test_least_busy_routing_ignores_prefixes() -> None:
    fleet = fleet_of(2, 2, routing=Routing.LEAST_BUSY)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    second = client.send(turn(1, 6))
    assert first.upstream != second.upstream
    assert first.affinity is second.affinity is None
    assert len(fleet.prefixes) == 0


def test_a_restarted_or_reloaded_server_is_forgotten() -> None:
    fleet = Fleet(max_buffered=0)
    fleet.report("a", status(8000, 2, task=40), 0.0, 0.0)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    fleet.release(first.request_id, 0.0)
    fleet.report("a", status(8000, 2, task=41), 1.0, 1.0)
    assert fleet.prefixes.matched(first.upstream, turn(1, 4).prefix) == 4
    fleet.report("a", status(8000, 2, task=3), 2.0, 2.0)
    assert fleet.prefixes.matched(first.upstream, turn(1, 4).prefix) == 0
    again = client.send(turn(1, 4))
    fleet.release(again.request_id, 0.0)
    fleet.report("a", status(8000, 2, task=5, model="other"), 3.0, 3.0)
    assert len(fleet.prefixes) == 0
    # A new agent for the same server, which restarted meanwhile (no task yet).
    again = client.send(turn(1, 4))
    fleet.release(again.request_id, 0.0)
    fleet.report("b", status(8000, 2, task=None, model="other"), 4.0, 4.0)
    assert len(fleet.prefixes) == 0


def test_a_buffered_request_says_whether_it_reached_its_server() -> None:
    fleet = fleet_of(1, 1)
    client = Client(fleet)
    first = client.send(turn(1, 4))
    fleet.release(first.request_id, 0.0)
    own = client.send(turn(1, 5))
    other = client.send(turn(2, 4))
    assert own.upstream == first.upstream != other.upstream
    assert not isinstance(fleet.request_slot(98, 0.0, needs=turn(1, 7)), Dispatch)
    assert not isinstance(fleet.request_slot(99, 0.0, needs=turn(1, 8)), Dispatch)
    # Both wait for the first server; the other's slot goes to them once they waited long.
    (spilled,) = fleet.release(other.request_id, BUFFER_PATIENCE)
    assert (spilled.request_id, spilled.affinity) == (98, Affinity.SPILL_BUSY)
    # Request 98 took the conversation's longest head to the other server: going home now
    # reuses only the 5 blocks sent there before.
    (home,) = fleet.release(own.request_id, 0.0)
    assert (home.request_id, home.upstream) == (99, first.upstream)
    assert (home.affinity, home.matched_blocks) == (Affinity.SPILL_BUSY, 5)


def busy_home(slow_prefill: bool = True) -> tuple[Fleet, Client, Dispatch]:
    """Two 1-slot servers with measured speeds; conversation 1's home is busy, the other free."""
    fleet = fleet_of(1, 1)
    prefill = 10.0 if slow_prefill else 0.0001  # seconds for 100 prompt tokens
    for agent in fleet.upstreams:
        fleet.answered(agent, AnswerTimings(100, 0, prefill, 100, 0.1))  # 1,000 tokens/s decode
    client = Client(fleet)
    first = client.send(turn(1, 8))
    fleet.release(first.request_id, 0.0)
    holder = client.send(turn(1, 9))
    assert holder.upstream == first.upstream
    # Its report: the slot has 50 tokens to go (50 ms at the measured speed).
    agent = holder.agent_id
    fleet.report(agent, progress(fleet, agent, n_remain=50), 0.0, 0.0)
    return fleet, client, holder


def progress(fleet: Fleet, agent: str, *, n_remain: int) -> StatusUpdate:
    upstream = fleet.upstreams[agent]
    slot = SlotStatus(id=0, is_processing=True, n_ctx=4096, id_task=1, n_remain=n_remain)
    return StatusUpdate(
        external_llamacpp_addr=upstream.address,
        slots_idle=0,
        slots_processing=1,
        slots_total=1,
        model="m",
        slots=[slot],
    )


def test_a_turn_waits_briefly_for_its_busy_home_when_that_saves_prefill() -> None:
    fleet, _, holder = busy_home()
    decision = fleet.request_slot(50, 0.0, needs=turn(1, 12))
    assert isinstance(decision, Buffered)
    assert decision.until is not None
    assert 0 < decision.until <= MAX_AFFINITY_WAIT
    assert fleet.is_homing(50)
    # The other server stays free for others meanwhile.
    assert isinstance(fleet.request_slot(51, 0.0, needs=None), Dispatch)
    (home,) = fleet.release(holder.request_id, 0.01)
    assert (home.request_id, home.upstream) == (50, holder.upstream)
    assert home.affinity is Affinity.HIT_AFTER_WAIT
    assert home.matched_blocks == 9


def test_a_turn_that_waited_in_vain_goes_where_the_load_says() -> None:
    fleet, _, holder = busy_home()
    decision = fleet.request_slot(50, 0.0, needs=turn(1, 12))
    assert isinstance(decision, Buffered)
    assert decision.until is not None
    assert fleet.expire_waits(decision.until - 0.001) == []
    (moved,) = fleet.expire_waits(decision.until)
    assert moved.request_id == 50
    assert moved.upstream != holder.upstream
    assert moved.affinity is Affinity.SPILL_AFTER_WAIT
    assert not fleet.is_waiting(50)


def test_no_wait_when_prefill_elsewhere_is_cheaper() -> None:
    fleet, _, holder = busy_home(slow_prefill=False)
    decision = fleet.request_slot(50, 0.0, needs=turn(1, 12))
    assert isinstance(decision, Dispatch)
    assert (decision.upstream, decision.affinity) != (holder.upstream, Affinity.HIT)


def test_no_wait_for_a_home_running_tasks_without_a_limit_and_no_known_service_time() -> None:
    fleet, _, holder = busy_home()
    fleet.report(holder.agent_id, progress(fleet, holder.agent_id, n_remain=-1), 0.0, 0.0)
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(1, 12)), Dispatch)


def test_a_client_that_leaves_while_waiting_for_its_home_leaves_no_trace() -> None:
    fleet, _, holder = busy_home()
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(1, 12)), Buffered)
    assert fleet.requests_buffered == 1
    assert fleet.release(50, 0.0) == []
    assert fleet.requests_buffered == 0
    assert fleet.release(holder.request_id, 0.0) == []


def test_a_home_that_becomes_unusable_releases_its_waiters_at_once() -> None:
    fleet, _, holder = busy_home()
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(1, 12)), Buffered)
    fleet.drain(holder.agent_id)
    (moved,) = fleet.expire_waits(0.0)
    assert moved.request_id == 50
    assert moved.upstream != holder.upstream


def test_the_balancers_own_service_times_estimate_the_wait_when_reports_lag() -> None:
    fleet = fleet_of(1, 1)
    for agent in fleet.upstreams:
        fleet.answered(agent, AnswerTimings(100, 0, 10.0, 100, 0.1))
    first = fleet.request_slot(1, 0.0, needs=turn(1, 8))
    assert isinstance(first, Dispatch)
    fleet.release(1, 0.1)  # its requests take 0.1 s there
    holder = fleet.request_slot(2, 1.0, needs=turn(1, 9))
    assert isinstance(holder, Dispatch)
    assert holder.upstream == first.upstream
    # No report since: the slot looks idle in the last one, but the balancer knows better.
    decision = fleet.request_slot(3, 1.05, needs=turn(1, 12))
    assert isinstance(decision, Buffered)
    assert decision.until is not None
    assert fleet.upstreams[holder.agent_id].expected_wait(1.05) == pytest.approx(0.05)
    (home,) = fleet.release(2, 1.1)
    assert (home.request_id, home.upstream) == (3, first.upstream)
    assert home.affinity is Affinity.HIT_AFTER_WAIT


def test_a_prefix_found_gone_shrinks_what_the_server_is_believed_to_hold() -> None:
    fleet = fleet_of(2)
    client = Client(fleet)
    for conversation in range(1, 6):
        sent = client.send(turn(conversation, 10))
        fleet.release(sent.request_id, 0.0)
    (upstream,) = fleet.upstreams.values()
    assert fleet.prefixes.weight(upstream.identity) == 50
    # Conversation 1 comes back: the balancer believes 10 blocks are there, the server had
    # evicted them (it reused nothing).
    again = client.send(turn(1, 12))
    assert again.matched_blocks == 10
    # Conversations 2-5 went there since conversation 1 did.
    assert again.newer_blocks == 40
    gone = AnswerTimings(evaluated=1500, cached=0)
    fleet.answered(
        again.agent_id,
        gone,
        head_bytes=6144,
        matched_blocks=again.matched_blocks,
        newer_blocks=again.newer_blocks,
    )
    fleet.release(again.request_id, 0.0)
    believed = fleet.prefixes.weight(upstream.identity)
    assert upstream.learned_capacity == 40
    assert believed <= upstream.learned_capacity
    # Least recently used first out: the oldest conversations are forgotten, not the newest.
    assert fleet.prefixes.matched(upstream.identity, turn(2, 11).prefix) == 0
    assert fleet.prefixes.matched(upstream.identity, turn(5, 11).prefix) == 10
    # A turn that finds its prefix lets the belief grow back, slowly.
    last = client.send(turn(5, 12))
    assert last.matched_blocks == 10
    before = upstream.learned_capacity
    found = AnswerTimings(evaluated=100, cached=1400)
    fleet.answered(last.agent_id, found, head_bytes=6144, matched_blocks=last.matched_blocks)
    assert upstream.learned_capacity > before


def test_a_balancer_that_heard_a_peers_placement_sends_the_next_turn_there() -> None:
    # Two balancers in front of the same servers; A's report shows agent1 busier, so a new
    # conversation goes to agent0 there, and B would send it to agent1 on its own.
    mine, peer = fleet_of(2, 2), fleet_of(2, 2)
    mine.report("agent1", status(8001, 2, 1), 0.0, 0.0)
    peer.report("agent0", status(8000, 2, 1), 0.0, 0.0)
    sent = Client(mine).send(turn(1, 4))
    assert sent.upstream == "127.0.0.1:8000"
    assert sent.placement is not None
    assert peer.placed_by_peer(sent.placement)
    assert Client(peer).send(turn(1, 5)).upstream == "127.0.0.1:8000"


def test_a_peers_placement_on_an_unknown_server_or_under_least_busy_is_not_remembered() -> None:
    fleet = fleet_of(2)
    sent = Client(fleet_of(2)).send(turn(1, 4))
    assert sent.placement is not None
    assert not fleet.placed_by_peer(replace(sent.placement, server="127.0.0.1:9999"))
    assert not fleet_of(2, routing=Routing.LEAST_BUSY).placed_by_peer(sent.placement)
    assert len(fleet.prefixes) == 0
    assert Client(fleet_of(2, routing=Routing.LEAST_BUSY)).send(turn(1, 4)).placement is None


def test_a_waiting_turn_of_a_forgotten_conversation_returns_to_where_it_lived() -> None:
    fleet, client, home = forgotten(1, 1)
    blockers = {b.upstream: b for b in (client.send(turn(10 + n, 4)) for n in range(2))}
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(1, 6)), Buffered)
    (sent,) = fleet.release(blockers[home.address].request_id, 0.1)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, home.address, Affinity.RETURN)


def forgotten_with_busy_home() -> tuple[Fleet, Dispatch, Buffered]:
    """Conversation 1 was forgotten for room on its server, which is busy now, and its next
    turn (request 50) waits for it while the other server is free. Prefill is slow here (100
    tokens/s), so waiting pays."""
    fleet, client, home = forgotten(1, 1)
    for agent in fleet.upstreams:
        fleet.answered(agent, AnswerTimings(100, 0, 1.0, 100, 0.1))
    holder = client.send(None)
    if holder.upstream != home.address:
        other = holder
        holder = client.send(None)
        fleet.release(other.request_id, 0.0)
    assert holder.upstream == home.address
    waiting = fleet.request_slot(50, 0.0, needs=turn(1, 6))
    assert isinstance(waiting, Buffered)
    assert fleet.is_homing(50)
    return fleet, holder, waiting


def test_a_forgotten_conversation_waits_for_its_busy_server_and_returns_there() -> None:
    # Sent elsewhere at once, it would be computed again there and push another
    # conversation out of that server's cache; where it lived may still hold it.
    fleet, holder, waiting = forgotten_with_busy_home()
    assert waiting.until is not None
    assert 0 < waiting.until <= MAX_AFFINITY_WAIT
    # The other server stays free for others meanwhile.
    assert isinstance(fleet.request_slot(51, 0.0, needs=None), Dispatch)
    (sent,) = fleet.release(holder.request_id, 0.1)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, holder.upstream, Affinity.RETURN)


def test_a_forgotten_conversation_spills_when_its_server_stays_busy() -> None:
    fleet, holder, waiting = forgotten_with_busy_home()
    assert waiting.until is not None
    (moved,) = fleet.expire_waits(waiting.until)
    assert moved.request_id == 50
    assert moved.upstream != holder.upstream
    assert moved.affinity is Affinity.SPILL_AFTER_WAIT


def test_a_new_conversation_goes_where_fewest_live_even_if_busier_within_the_guard() -> None:
    # Least busy first placed 12 conversations 5/4/3 on real llama-servers: servers finish
    # first turns at different times. Where a conversation will live counts more.
    fleet = fleet_of(2, 2)
    client = Client(fleet)
    placed = []
    for conversation in range(3):
        sent = client.send(turn(conversation, 4))
        placed.append(sent.upstream)
        fleet.release(sent.request_id, 0.0)
    fuller = max(set(placed), key=placed.count)
    emptier = min(set(placed), key=placed.count)
    assert (placed.count(fuller), placed.count(emptier)) == (2, 1)
    busy = client.send(None)
    while busy.upstream != emptier:
        fleet.release(busy.request_id, 0.0)
        busy = client.send(None)
    # One of the emptier server's 2 slots is busy, the fuller one is idle.
    sent = client.send(turn(9, 4))
    assert (sent.upstream, sent.affinity) == (emptier, Affinity.MISS)
    # Both of its slots busy now: the other one takes the next.
    assert client.send(turn(10, 4)).upstream == fuller


def uneven(prefill_s: float = 1.0) -> tuple[Fleet, Client, str, str]:
    """Two 1-slot servers, idle: the fuller one served 2 conversations lately, the emptier 1.
    Prefill takes `prefill_s` per 100 tokens there."""
    fleet = fleet_of(1, 1)
    for agent in fleet.upstreams:
        fleet.answered(agent, AnswerTimings(100, 0, prefill_s, 100, 0.1))
    client = Client(fleet)
    placed = []
    for conversation in range(3):
        sent = client.send(turn(conversation, 8))
        placed.append(sent.upstream)
        fleet.release(sent.request_id, 0.0)
    fuller = max(set(placed), key=placed.count)
    emptier = min(set(placed), key=placed.count)
    assert (placed.count(fuller), placed.count(emptier)) == (2, 1)
    return fleet, client, fuller, emptier


def busy_on(fleet: Fleet, client: Client, address: str) -> Dispatch:
    """A request without a prefix that holds the slot of the server at `address`."""
    while True:
        sent = client.send(None)
        if sent.upstream == address:
            return sent
        fleet.release(sent.request_id, 0.0)


def test_a_new_conversation_waits_briefly_for_the_busy_server_where_fewest_live() -> None:
    # Placed at once on the free server, it would be that server's third conversation: on
    # real llama-servers a fifth conversation on a server that keeps four made them evict
    # each other at every turn.
    fleet, client, _, emptier = uneven()
    holder = busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    assert fleet.is_homing(50)
    assert waiting.until is not None
    assert 0 < waiting.until <= MAX_AFFINITY_WAIT
    (sent,) = fleet.release(holder.request_id, 0.1)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, emptier, Affinity.MISS)


def test_a_new_conversation_goes_to_the_fuller_server_when_the_emptier_stays_busy() -> None:
    fleet, client, fuller, emptier = uneven()
    busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    assert waiting.until is not None
    (moved,) = fleet.expire_waits(waiting.until)
    assert (moved.request_id, moved.upstream, moved.affinity) == (50, fuller, Affinity.MISS)


def test_a_new_conversation_waits_no_longer_than_its_prefill_would_cost() -> None:
    fleet, client, _, emptier = uneven(prefill_s=0.0001)  # 1,000,000 tokens/s
    busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    tokens = 8 * BLOCK_BYTES / fleet.bytes_per_token
    assert waiting.until == pytest.approx(SPILL_COST * tokens / 1_000_000)


def test_a_buffered_new_conversation_lets_a_fuller_servers_slot_go_for_a_while() -> None:
    fleet, client, fuller, emptier = uneven()
    on_fuller, on_emptier = busy_on(fleet, client, fuller), busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    assert not fleet.is_homing(50)
    # Its patience ends like a homed request's: the caller sets a timer for it.
    assert waiting.until == BUFFER_PATIENCE
    # The fuller server's slot frees first: held, not given to the new conversation.
    assert fleet.release(on_fuller.request_id, 0.1) == []
    assert fleet.is_waiting(50)
    (sent,) = fleet.release(on_emptier.request_id, 0.2)
    assert (sent.request_id, sent.upstream, sent.affinity) == (50, emptier, Affinity.MISS)


def test_a_buffered_new_conversation_takes_a_fuller_server_once_its_patience_ends() -> None:
    fleet, client, fuller, emptier = uneven()
    on_fuller = busy_on(fleet, client, fuller)
    busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    assert waiting.until is not None
    assert fleet.release(on_fuller.request_id, 0.1) == []
    (sent,) = fleet.expire_waits(waiting.until)
    assert (sent.request_id, sent.upstream) == (50, fuller)


def test_a_held_slot_still_goes_to_a_request_without_a_prefix_or_home() -> None:
    fleet, client, fuller, emptier = uneven()
    on_fuller = busy_on(fleet, client, fuller)
    busy_on(fleet, client, emptier)
    assert isinstance(fleet.request_slot(50, 0.0, needs=turn(9, 8)), Buffered)
    assert isinstance(fleet.request_slot(51, 0.05, needs=None), Buffered)
    (sent,) = fleet.release(on_fuller.request_id, 0.1)
    assert (sent.request_id, sent.upstream) == (51, fuller)
    assert fleet.is_waiting(50)


def test_a_buffered_new_conversation_lets_slots_go_no_longer_than_its_prefill_would_cost() -> None:
    # In a saturated fleet every slot held from a new conversation is a slot idle: at most as
    # long as computing its prompt SPILL_COST times takes.
    fleet, client, fuller, emptier = uneven(prefill_s=0.01)  # 10,000 tokens/s
    on_fuller = busy_on(fleet, client, fuller)
    busy_on(fleet, client, emptier)
    waiting = fleet.request_slot(50, 0.0, needs=turn(9, 8))
    assert isinstance(waiting, Buffered)
    tokens = 8 * BLOCK_BYTES / fleet.bytes_per_token
    assert waiting.until == pytest.approx(SPILL_COST * tokens / 10_000)
    assert fleet.release(on_fuller.request_id, 0.1) == []
    (sent,) = fleet.expire_waits(waiting.until)
    assert (sent.request_id, sent.upstream) == (50, fuller)
