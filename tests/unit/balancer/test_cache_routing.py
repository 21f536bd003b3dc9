"""The cache-aware pick, fed events: where conversations go, and when they spill."""

from __future__ import annotations

from rower.balancer.cache_routing import Affinity
from rower.balancer.fleet import Dispatch, Fleet, Routing
from rower.balancer.request_needs import RequestNeeds
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


def test_a_conversation_sharing_only_a_system_prompt_finds_a_server_that_has_it() -> None:
    fleet = fleet_of(2, 2, 2)
    client = Client(fleet)
    system = tuple(range(5))
    first = client.send(
        RequestNeeds("/v1/chat/completions", True, prefix=(*system, 10, 11), shared_blocks=5)
    )
    fleet.release(first.request_id, 0.0)
    second = client.send(
        RequestNeeds("/v1/chat/completions", True, prefix=(*system, 20, 21), shared_blocks=5)
    )
    assert (second.upstream, second.affinity, second.matched_blocks) == (
        first.upstream,
        Affinity.HIT,
        5,
    )


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
    (spilled,) = fleet.release(other.request_id, 0.0)
    assert (spilled.request_id, spilled.affinity) == (98, Affinity.SPILL_BUSY)
    # Request 98 took the conversation's longest head to the other server: going home now
    # reuses only the 5 blocks sent there before.
    (home,) = fleet.release(own.request_id, 0.0)
    assert (home.request_id, home.upstream) == (99, first.upstream)
    assert (home.affinity, home.matched_blocks) == (Affinity.SPILL_BUSY, 5)
