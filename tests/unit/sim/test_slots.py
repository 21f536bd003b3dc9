"""The sim's slot table: prompt cache, slot choice, deferral, pinning and release."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from rower.sim.slots import SlotTable, Task, common_prefix
from rower.sim.tokens import tokenize


def task(table: SlotTable, prompt: str, *, id_slot: int | None = None) -> Task:
    return Task(table.new_task_id(), tuple(tokenize(prompt)), id_slot=id_slot)


def finish(table: SlotTable, t: Task, generated: tuple[str, ...] = ()) -> list[Task]:
    t.generated.extend(generated)
    return table.release(t)


def test_common_prefix() -> None:
    assert common_prefix(["a", "b", "c"], ["a", "b", "x"]) == 2
    assert common_prefix(["a"], ["a", "b"]) == 1
    assert common_prefix([], ["a"]) == 0
    assert common_prefix(["x"], ["a"]) == 0


def test_first_prompt_has_nothing_cached() -> None:
    table = SlotTable(2)
    t = task(table, "the quick brown fox jumps over the lazy dog")
    assert table.submit(t)
    assert t.cache_n == 0
    assert t.prompt_n == len(t.prompt)


def test_repeated_prompt_reuses_all_but_one_token_in_the_same_slot() -> None:
    table = SlotTable(4)
    first = task(table, "the quick brown fox jumps over the lazy dog")
    table.submit(first)
    finish(table, first, (" and", " then"))
    again = task(table, "the quick brown fox jumps over the lazy dog")
    table.submit(again)
    assert again.slot == first.slot
    assert again.cache_n == len(again.prompt) - 1
    assert again.prompt_n == 1


def test_continued_conversation_reuses_prompt_and_generated_tokens() -> None:
    table = SlotTable(2)
    first = task(table, "question one")
    table.submit(first)
    finish(table, first, (" some", " word"))
    follow_up = task(table, "question one some word and question two")
    table.submit(follow_up)
    assert follow_up.cache_n == len(first.prompt) + 2


def test_free_slot_with_longest_common_prefix_wins() -> None:
    table = SlotTable(3)
    a, b, c = (task(table, p) for p in ("alpha beta gamma", "system prompt one", "zzz"))
    for t in (a, b, c):
        table.submit(t)
    assert [a.slot, b.slot, c.slot] == [0, 1, 2]
    for t in (a, b, c):
        finish(table, t)
    follow = task(table, "system prompt one and more words here")
    table.submit(follow)
    assert follow.slot == 1
    assert follow.cache_n == len(b.prompt)


def test_dissimilar_prompt_takes_least_recently_used_slot() -> None:
    table = SlotTable(2)
    a, b = task(table, "aaaa " * 12), task(table, "bbbb " * 12)
    table.submit(a)
    table.submit(b)
    finish(table, b)
    finish(table, a)
    other = task(table, "cccc " * 12)
    table.submit(other)
    assert other.slot == b.slot  # released first, so least recently used


def test_deferred_tasks_get_slots_in_fifo_order_and_are_counted() -> None:
    table = SlotTable(2)
    running = [task(table, f"running {i}") for i in range(2)]
    for t in running:
        assert table.submit(t)
    waiting = [task(table, f"waiting {i}") for i in range(3)]
    for t in waiting:
        assert not table.submit(t)
    assert [t.deferred for t in running + waiting] == [False, False, True, True, True]
    assert table.counters.requests_total == 5
    assert table.counters.requests_deferred == 3
    assert list(table.waiting) == waiting

    assert finish(table, running[1]) == [waiting[0]]
    assert waiting[0].slot == running[1].slot
    assert finish(table, running[0]) == [waiting[1]]
    assert list(table.waiting) == [waiting[2]]


def test_pinned_task_waits_for_its_slot_even_when_another_is_free() -> None:
    table = SlotTable(2)
    busy = task(table, "busy")
    table.submit(busy)
    assert busy.slot == 0
    pinned = task(table, "pinned", id_slot=0)
    assert not table.submit(pinned)
    assert table.idle == 1
    unpinned = task(table, "unpinned")
    assert table.submit(unpinned)
    assert unpinned.slot == 1
    assert finish(table, unpinned) == []  # slot 1 frees, but the pinned task wants slot 0
    assert finish(table, busy) == [pinned]
    assert pinned.slot == 0


def test_freed_slot_goes_first_to_a_task_pinned_to_it() -> None:
    table = SlotTable(1)
    holder = task(table, "holder")
    table.submit(holder)
    unpinned = task(table, "unpinned")
    pinned = task(table, "pinned", id_slot=0)
    table.submit(unpinned)
    table.submit(pinned)
    assert finish(table, holder) == [pinned]
    assert list(table.waiting) == [unpinned]


def test_slot_ids_wrap_around_as_in_llamacpp() -> None:
    table = SlotTable(2)
    t = task(table, "x", id_slot=3)
    table.submit(t)
    assert t.slot == 1


def test_waiting_task_that_gives_up_leaves_the_line() -> None:
    table = SlotTable(1)
    holder, a, b = task(table, "holder"), task(table, "a"), task(table, "b")
    for t in (holder, a, b):
        table.submit(t)
    assert table.release(a) == []
    assert list(table.waiting) == [b]
    assert finish(table, holder) == [b]


def test_release_is_idempotent() -> None:
    table = SlotTable(1)
    holder, waiter = task(table, "holder"), task(table, "waiter")
    table.submit(holder)
    table.submit(waiter)
    assert table.release(holder) == [waiter]
    assert table.release(holder) == []
    assert table.slots[0].task is waiter


def test_task_cancelled_before_evaluation_leaves_the_cache_alone() -> None:
    table = SlotTable(1)
    first = task(table, "keep this prompt cached please")
    table.submit(first)
    finish(table, first)
    cached = table.slots[0].cached
    other = task(table, "keep this prompt but then something else entirely")
    table.submit(other)
    table.release(other, evaluated=False)
    assert table.slots[0].cached == cached[: other.cache_n]


def test_counters_split_prompt_tokens_into_evaluated_and_cached() -> None:
    table = SlotTable(1)
    a = task(table, "one two three four")
    table.submit(a)
    finish(table, a)
    b = task(table, "one two three four")
    table.submit(b)
    assert table.counters.tokens_cached == b.cache_n
    assert table.counters.tokens_prompt == a.prompt_n + b.prompt_n


PROMPTS = ["shared prefix a", "shared prefix b", "other", "shared prefix a and more"]


class SlotTableMachine(RuleBasedStateMachine):
    """Random submissions and releases; the table must never lose or double-book a task."""

    def __init__(self) -> None:
        super().__init__()
        self.table = SlotTable(3)
        self.live: list[Task] = []
        self.submitted = 0

    @rule(prompt=st.sampled_from(PROMPTS), pin=st.none() | st.integers(0, 5))
    def submit(self, prompt: str, pin: int | None) -> None:
        t = task(self.table, prompt, id_slot=pin)
        self.table.submit(t)
        self.live.append(t)
        self.submitted += 1

    @precondition(lambda self: self.live)
    @rule(index=st.integers(0, 100), generated=st.integers(0, 3))
    def release(self, index: int, generated: int) -> None:
        t = self.live.pop(index % len(self.live))
        waiting_before = [w for w in self.table.waiting if w is not t]
        freed = t.slot
        assigned = finish(self.table, t, (" x",) * generated if t.slot is not None else ())
        assert len(assigned) <= 1
        for a in assigned:
            assert a.slot == freed
            # the first waiting task pinned to the freed slot, else the first unpinned one
            pinned = [w for w in waiting_before if w.id_slot == freed]
            unpinned = [w for w in waiting_before if w.id_slot is None]
            assert a is (pinned[0] if pinned else unpinned[0])

    @invariant()
    def every_live_task_is_either_running_or_waiting(self) -> None:
        running = [slot.task for slot in self.table.slots if slot.task is not None]
        assert sorted(t.id for t in running + list(self.table.waiting)) == sorted(
            t.id for t in self.live
        )
        for slot in self.table.slots:
            if slot.task is not None:
                assert slot.task.slot == slot.id
                assert slot.task.id_slot in (None, slot.id)
        for t in self.table.waiting:
            assert t.slot is None

    @invariant()
    def nobody_waits_for_a_free_slot_they_could_take(self) -> None:
        for t in self.table.waiting:
            candidates = [s for s in self.table.slots if t.id_slot in (None, s.id)]
            assert all(s.is_processing for s in candidates)

    @invariant()
    def counters_add_up(self) -> None:
        counters = self.table.counters
        assert counters.requests_total == self.submitted
        assert counters.requests_deferred >= len(self.table.waiting)


TestSlotTableMachine = SlotTableMachine.TestCase
TestSlotTableMachine.settings = settings(max_examples=40, stateful_step_count=25, deadline=None)
