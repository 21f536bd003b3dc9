"""The memory of prefixes: what it finds, what it forgets, and what it costs."""

from __future__ import annotations

import random
import tracemalloc

from rower.balancer.prefix_memory import PrefixMemory


def conversation(seed: int, blocks: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    return tuple(rng.getrandbits(64) for _ in range(blocks))


def test_the_next_turn_finds_the_server_of_the_last_one() -> None:
    memory = PrefixMemory()
    turn = conversation(1, 10)
    memory.record("a:1", turn, capacity_blocks=1000)
    nxt = (*turn, *conversation(2, 3))
    assert list(memory.matches(nxt)) == [("a:1", 10)]
    assert memory.matched("a:1", nxt) == 10
    assert memory.matched("b:1", nxt) == 0
    assert list(memory.matches(conversation(3, 10))) == []


def test_a_longer_turn_replaces_the_shorter_one_and_the_latest_server_wins() -> None:
    memory = PrefixMemory()
    turn = conversation(1, 10)
    longer = (*turn, *conversation(2, 5))
    memory.record("a:1", turn, capacity_blocks=1000)
    memory.record("a:1", longer, capacity_blocks=1000)
    assert len(memory) == 1
    memory.record("b:1", (*longer, 7), capacity_blocks=1000)
    assert list(memory.matches((*longer, 7, 8))) == [("b:1", 16), ("a:1", 15)]


def test_a_server_remembers_what_it_can_hold_oldest_out_first() -> None:
    memory = PrefixMemory()
    first, second, third = conversation(1, 10), conversation(2, 10), conversation(3, 10)
    for turn in (first, second, third):
        memory.record("a:1", turn, capacity_blocks=25)
    assert memory.matched("a:1", first) == 0
    assert memory.matched("a:1", second) == 10
    assert memory.matched("a:1", third) == 10


def test_the_global_bound_is_shared_between_servers() -> None:
    memory = PrefixMemory(max_entries=10)
    for n in range(30):
        memory.record(f"s{n % 2}:1", conversation(n, 3), capacity_blocks=10**6)
    assert len(memory) <= 10


def test_forget_drops_a_server_but_not_what_others_hold() -> None:
    memory = PrefixMemory()
    turn = conversation(1, 5)
    memory.record("a:1", turn, capacity_blocks=100)
    memory.record("b:1", conversation(2, 5), capacity_blocks=100)
    memory.forget("a:1")
    assert list(memory.matches(turn)) == []
    assert list(memory.matches(conversation(2, 5))) == [("b:1", 5)]
    memory.forget("nobody:1")


def test_a_hundred_thousand_conversations_fit_well_under_100_mb() -> None:
    memory = PrefixMemory(max_entries=1_000_000)
    tracemalloc.start()
    try:
        for n in range(100_000):
            # 3 turns each of a ~3,000-token conversation (24 blocks).
            turn = conversation(n, 24)
            address = f"10.0.{n % 50}.1:8080"
            for extra in range(3):
                turn = (*turn, n * 10 + extra)
                memory.record(address, turn, capacity_blocks=10**7)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    del turn
    assert used < 40 * 1024 * 1024, f"{used / 2**20:.0f} MiB for 100,000 conversations"
    assert len(memory) == 100_000


def test_where_forgotten_conversations_lived_costs_little_and_stays_bounded() -> None:
    memory = PrefixMemory(max_entries=50_000)
    conversations = [conversation(n, 24) for n in range(60_000)]
    tracemalloc.start()
    try:
        for turn in conversations:
            # Room for one conversation: each new one forgets the one before.
            memory.record("a:1", turn, capacity_blocks=24)
        used, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert memory.last_server(conversations[-2]) == "a:1"
    assert memory.last_server(conversations[0]) is None, "bounded by max_entries"
    assert used < 50_000 * 160, f"{used / 50_000:.0f} bytes per forgotten conversation"


def test_recording_a_turn_says_what_was_sent_there_since_its_previous_turn() -> None:
    memory = PrefixMemory()
    first = conversation(1, 10)
    assert memory.record("a:1", first, capacity_blocks=1000) == 0
    memory.record("a:1", conversation(2, 4), capacity_blocks=1000)
    memory.record("b:1", conversation(3, 7), capacity_blocks=1000)
    memory.record("a:1", conversation(4, 5), capacity_blocks=1000)
    # Conversation 1 again on a:1: conversations 2 and 4 went there since (b:1's does not count).
    assert memory.record("a:1", (*first, *conversation(5, 2)), capacity_blocks=1000) == 9
    # Now it is the most recent there.
    assert memory.record("a:1", (*first, *conversation(5, 3)), capacity_blocks=1000) == 0


def test_a_leaf_forgotten_for_room_still_says_where_it_lives() -> None:
    memory = PrefixMemory()
    old, new = conversation(1, 10), conversation(2, 10)
    memory.record("a:1", old, capacity_blocks=15)
    memory.record("a:1", new, capacity_blocks=15)
    nxt = (*old, *conversation(3, 2))
    assert list(memory.matches(nxt)) == []
    assert memory.last_server(nxt) == "a:1"
    # Sent again, it is remembered as held, no longer as forgotten.
    memory.record("b:1", nxt, capacity_blocks=100)
    assert memory.last_server(nxt) is None
    # A restart forgets what a server holds, not that its conversations were its own.
    memory.forget("a:1")
    assert memory.last_server((*new, 7)) == "a:1"
