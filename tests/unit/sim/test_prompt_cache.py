"""The sim's host-RAM prompt cache: llama-server's `--cache-ram` rules, bounded in tokens."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rower.sim.slots import PromptCache, SlotTable, Task, common_prefix, starts_with
from rower.sim.tokens import tokenize

ALPHA = "alpha bravo charlie delta " * 60
BRAVO = "xray yankee zulu whiskey " * 60
GENERATED = (" the", " of", " and", " to")


def task(
    table: SlotTable, prompt: str, *, id_slot: int | None = None, completion: bool = True
) -> Task:
    return Task(table.new_task_id(), tuple(tokenize(prompt)), id_slot, completion=completion)


def run(
    table: SlotTable, prompt: str, *, id_slot: int | None = None, completion: bool = True
) -> Task:
    """Submit `prompt`, generate four tokens, release; the finished task."""
    t = task(table, prompt, id_slot=id_slot, completion=completion)
    assert table.submit(t)
    t.generated.extend(GENERATED)
    table.release(t)
    return t


def tokens(text: str) -> tuple[str, ...]:
    return tuple(tokenize(text))


# --- PromptCache alone ----------------------------------------------------------------------


def test_save_keeps_states_oldest_first_within_the_bound() -> None:
    cache = PromptCache(10)
    assert cache.save(("a", "b", "c", "d"))
    assert cache.save(("x", "y", "z"))
    assert cache.save(("p", "q", "r", "s"))  # 11 tokens: the oldest goes
    assert cache.states == [("x", "y", "z"), ("p", "q", "r", "s")]
    assert cache.n_tokens == 7


def test_a_state_larger_than_the_cache_is_not_saved_and_evicts_nothing() -> None:
    cache = PromptCache(4)
    cache.save(("a", "b"))
    assert not cache.save(tuple("abcdefgh"))
    assert cache.states == [("a", "b")]


def test_nothing_is_saved_that_a_cached_state_already_holds() -> None:
    cache = PromptCache(100)
    cache.save(("a", "b", "c"))
    assert not cache.save(("a", "b"))
    assert not cache.save(("a", "b", "c"))
    assert not cache.save(())
    assert cache.states == [("a", "b", "c")]


def test_saving_an_extension_drops_the_states_it_contains() -> None:
    cache = PromptCache(100)
    cache.save(("a", "b"))
    cache.save(("x",))
    assert cache.save(("a", "b", "c"))
    assert cache.states == [("x",), ("a", "b", "c")]


def test_restore_takes_the_state_the_prompt_shares_most_and_removes_it() -> None:
    cache = PromptCache(100)
    cache.save(("s", "a", "a", "a"))
    cache.save(("s", "b", "b", "b"))
    restored = cache.restore(("z", "z"), ("s", "b", "b", "b", "more"))
    assert restored == ("s", "b", "b", "b")
    assert cache.states == [("s", "a", "a", "a")]


def test_restore_keeps_what_the_slot_holds_when_it_is_as_good() -> None:
    cache = PromptCache(100)
    cache.save(("s", "b", "b"))
    assert cache.restore(("s", "b", "b"), ("s", "b", "b", "c")) is None
    assert cache.states == [("s", "b", "b")]


def test_restore_does_not_trash_a_large_state_for_a_small_share_of_it() -> None:
    cache = PromptCache(1000)
    big = tuple(["s"] + [f"t{i}" for i in range(99)])
    cache.save(big)
    # The prompt shares 20 of its 100 tokens: below 25 %, so not restored.
    assert cache.restore((), (*big[:20], "other")) is None
    assert cache.restore((), (*big[:30], "other")) == big


def test_an_empty_slot_takes_any_state_worth_restoring() -> None:
    cache = PromptCache(100)
    cache.save(("s", "a", "b", "c"))
    assert cache.restore((), ("s", "a", "x")) == ("s", "a", "b", "c")


# --- the slot table with a cache ------------------------------------------------------------


def test_off_by_default() -> None:
    table = SlotTable(1)
    assert table.cache is None
    run(table, ALPHA)
    run(table, BRAVO)
    again = run(table, ALPHA + " echo")
    assert again.cache_n <= 1
    assert (table.counters.cache_saves, table.counters.cache_restores) == (0, 0)


def test_a_prompt_pushed_out_of_its_slot_comes_back_from_the_cache() -> None:
    # tests/e2e/test_llama_server_facts.py checks the same sequence on llama-server.
    table = SlotTable(1, cache_ram_tokens=10_000)
    first = run(table, ALPHA)
    assert first.cache_n == 0
    assert run(table, BRAVO).cache_n <= 1
    again = run(table, ALPHA + " echo")
    assert again.cache_n >= len(first.prompt)
    assert again.cache_n >= 0.9 * len(again.prompt)
    assert table.counters.cache_restores == 1
    # BRAVO went to the cache in turn, and comes back the same way.
    assert run(table, BRAVO + " more").cache_n >= 0.9 * len(tokens(BRAVO))


def test_too_small_a_cache_forgets_the_oldest_prompt() -> None:
    size = len(tokens(ALPHA)) + len(GENERATED)
    table = SlotTable(1, cache_ram_tokens=size + 10)
    run(table, ALPHA)
    run(table, BRAVO)  # ALPHA saved
    run(table, "something else entirely, " * 60)  # BRAVO saved, ALPHA evicted
    assert run(table, ALPHA + " echo").cache_n <= 1
    assert table.cache is not None
    assert table.cache.n_tokens <= size + 10


def test_a_similar_slot_that_keeps_most_of_its_tokens_is_not_saved() -> None:
    table = SlotTable(1, cache_ram_tokens=10_000)
    first = run(table, ALPHA)
    follow = run(table, ALPHA + " echo foxtrot")
    assert follow.cache_n == len(first.prompt)
    assert table.counters.cache_saves == 0


def test_a_similar_slot_that_would_lose_most_of_its_tokens_is_saved_first() -> None:
    shared = "system prompt " * 5
    table = SlotTable(1, cache_ram_tokens=10_000)
    long_one = run(table, shared + ALPHA)
    # Shares the system prompt (most of this prompt) but keeps < 50 % of the slot's tokens.
    short = run(table, shared + "short question")
    assert short.cache_n == len(tokens(shared)) - 1  # the trailing space is another piece
    assert table.counters.cache_saves == 1
    # Too little in common with the slot now (< 10 %): the long prompt comes back from RAM.
    back = run(table, shared + ALPHA + " and more")
    assert back.cache_n >= len(long_one.prompt)


def test_idle_slots_are_saved_after_every_assignment() -> None:
    table = SlotTable(2, cache_ram_tokens=10_000)
    first = run(table, ALPHA)
    assert table.cache is not None
    assert first.slot is not None
    assert table.cache.states == []
    busy = task(table, BRAVO)
    table.submit(busy)
    assert busy.slot != first.slot
    # Saved when the next task started; its own slot stayed idle and kept its tokens.
    idle = table.slots[first.slot]
    assert idle.cached == (*first.prompt, *GENERATED)
    assert table.cache.states == [idle.cached]


def test_pinned_task_on_a_dissimilar_slot_bypasses_the_cache() -> None:
    table = SlotTable(1, cache_ram_tokens=10_000)
    run(table, ALPHA)
    run(table, BRAVO, id_slot=0)
    assert table.counters.cache_saves == 0
    assert run(table, ALPHA + " echo", id_slot=0).cache_n <= 1


def test_embeddings_neither_save_nor_restore_their_slot() -> None:
    table = SlotTable(1, cache_ram_tokens=10_000)
    run(table, ALPHA)
    run(table, BRAVO, completion=False)
    assert (table.counters.cache_saves, table.counters.cache_restores) == (0, 0)


def test_counters_count_saves_and_restores() -> None:
    table = SlotTable(1, cache_ram_tokens=10_000)
    run(table, ALPHA)
    run(table, BRAVO)
    run(table, ALPHA + " echo")
    assert (table.counters.cache_saves, table.counters.cache_restores) == (2, 1)
    assert table.counters.tokens_cached >= len(tokens(ALPHA))


def test_starts_with() -> None:
    assert starts_with(("a", "b"), ("a",))
    assert starts_with(("a",), ())
    assert not starts_with(("a",), ("a", "b"))
    assert not starts_with(("a", "b"), ("b",))


# --- every state it can reach ----------------------------------------------------------------

HEADS = ["shared system prompt " * 3, "other head " * 3, ""]
TAILS = ["question one", "question two and more", "x"]
LIMIT = 60


class CachedSlotTableMachine(RuleBasedStateMachine):
    """Random conversations on a table with a small cache: the cache's rules always hold."""

    def __init__(self) -> None:
        super().__init__()
        self.table = SlotTable(2, cache_ram_tokens=LIMIT)
        self.live: list[Task] = []

    @rule(head=st.sampled_from(HEADS), tail=st.sampled_from(TAILS), turns=st.integers(0, 2))
    def submit(self, head: str, tail: str, turns: int) -> None:
        t = task(self.table, head + (tail + " ") * turns + tail)
        self.table.submit(t)
        self.live.append(t)

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), generated=st.integers(0, 3))
    def release(self, index: int, generated: int) -> None:
        t = self.live.pop(index % len(self.live))
        if t.slot is not None:
            t.generated.extend(GENERATED[:generated])
        self.table.release(t)

    @invariant()
    def cache_is_bounded(self) -> None:
        assert self.table.cache is not None
        assert self.table.cache.n_tokens <= LIMIT

    @invariant()
    def no_state_is_a_prefix_of_another(self) -> None:
        assert self.table.cache is not None
        states = self.table.cache.states
        for i, a in enumerate(states):
            assert a
            for j, b in enumerate(states):
                if i != j:
                    assert not starts_with(b, a), (a, b)

    @invariant()
    def cached_tokens_are_a_prefix_of_the_prompt(self) -> None:
        for slot in self.table.slots:
            if slot.task is not None:
                t = slot.task
                assert t.cache_n < len(t.prompt)
                assert common_prefix(slot.cached, t.prompt) >= t.cache_n


TestCachedSlotTableMachine = CachedSlotTableMachine.TestCase
TestCachedSlotTableMachine.settings = settings(
    max_examples=40, stateful_step_count=25, deadline=None
)
