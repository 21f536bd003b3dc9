"""The sim's slot table: which task holds which slot, who waits, and what each slot has cached.

Everything that decides slot state lives here, with no sockets and no clock, so it can be tested
by feeding it events. The rules follow llama-server's (tools/server/server-context.cpp):

- A task pinned with `id_slot` only ever takes that slot (ids wrap around, as in llama.cpp).
- Otherwise, among idle slots, the one whose cache shares the longest prefix with the prompt
  wins if that prefix is more than 10% of the prompt (llama.cpp's `--slot-prompt-similarity`);
  failing that, the least recently used slot.
- A task that finds no slot waits ("deferred"). When a slot frees, the oldest waiting task
  pinned to it takes it, else the oldest unpinned task.
- A slot keeps the tokens of its last task (prompt + generated) as its prompt cache; the next
  prompt reuses their common prefix, but at least one prompt token is always evaluated.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SLOT_PROMPT_SIMILARITY = 0.1


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common prefix of two token lists."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


@dataclass(eq=False)
class Task:
    """One inference request as the slot table sees it.

    Attributes:
        id: increasing task id, shown in `/slots` as `id_task`.
        prompt: prompt tokens.
        id_slot: the slot it is pinned to, or None for any.
        n_predict: most tokens it will generate.
        params: generation settings, echoed in `/slots`.
        slot: the slot it holds, once assigned.
        cache_n: prompt tokens reused from the slot's cache, once assigned.
        deferred: whether it had to wait for a slot.
        generated: tokens generated so far.
    """

    id: int
    prompt: tuple[str, ...]
    id_slot: int | None = None
    n_predict: int = 16
    params: Mapping[str, object] = field(default_factory=dict)
    slot: int | None = None
    cache_n: int = 0
    deferred: bool = False
    generated: list[str] = field(default_factory=list)

    @property
    def n_decoded(self) -> int:
        """Tokens generated so far."""
        return len(self.generated)

    @property
    def prompt_n(self) -> int:
        """Prompt tokens that must be evaluated (not found in the cache)."""
        return len(self.prompt) - self.cache_n


@dataclass(eq=False)
class Slot:
    """One llama-server slot.

    Attributes:
        id: slot id.
        cached: tokens in its KV cache: the last task's prompt and generated tokens.
        task: the task it is processing, or None when idle.
        last_task: the last task it processed, shown in `/slots` after it ends.
        last_used: logical time of its last release, for least-recently-used choice.
    """

    id: int
    cached: tuple[str, ...] = ()
    task: Task | None = None
    last_task: Task | None = None
    last_used: int = -1

    @property
    def is_processing(self) -> bool:
        """Whether a task holds the slot."""
        return self.task is not None


@dataclass
class Counters:
    """What the sim did since start; benchmarks read these from `/props`.

    Attributes:
        requests_total: tasks submitted.
        requests_deferred: tasks that found no slot and had to wait.
        requests_cancelled: tasks whose client went away before they finished.
        tokens_prompt: prompt tokens evaluated (not cached).
        tokens_cached: prompt tokens reused from slot caches.
        tokens_predicted: tokens generated.
    """

    requests_total: int = 0
    requests_deferred: int = 0
    requests_cancelled: int = 0
    tokens_prompt: int = 0
    tokens_cached: int = 0
    tokens_predicted: int = 0


class SlotTable:
    """`n_slots` slots and the FIFO of tasks waiting for one."""

    def __init__(self, n_slots: int) -> None:
        if n_slots < 1:
            raise ValueError("a slot table needs at least one slot")
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Task] = deque()
        self.counters = Counters()
        self._clock = 0
        self._next_task_id = 0

    def new_task_id(self) -> int:
        """A fresh task id."""
        task_id = self._next_task_id
        self._next_task_id += 1
        return task_id

    @property
    def busy(self) -> int:
        """Slots processing a task."""
        return sum(slot.is_processing for slot in self.slots)

    @property
    def idle(self) -> int:
        """Slots without a task."""
        return len(self.slots) - self.busy

    def submit(self, task: Task) -> bool:
        """Give `task` a slot now (True) or put it at the end of the waiting line (False)."""
        self.counters.requests_total += 1
        if task.id_slot is not None:
            task.id_slot %= len(self.slots)
        slot = self._choose(task)
        if slot is None:
            task.deferred = True
            self.counters.requests_deferred += 1
            self.waiting.append(task)
            return False
        self._assign(task, slot)
        return True

    def release(self, task: Task, *, evaluated: bool = True) -> list[Task]:
        """End `task`; returns the waiting tasks that got a slot because of it.

        A task still waiting leaves the line; a task holding a slot frees it and leaves its
        prompt and generated tokens in the slot's cache (only the part that was already cached
        when its prompt was never `evaluated`).
        """
        if task.slot is None:
            if task in self.waiting:
                self.waiting.remove(task)
            return []
        slot = self.slots[task.slot]
        if slot.task is not task:
            return []
        self._clock += 1
        slot.task = None
        slot.last_task = task
        slot.last_used = self._clock
        if evaluated:
            slot.cached = (*task.prompt, *task.generated)
        return self._dispatch(slot)

    def _dispatch(self, slot: Slot) -> list[Task]:
        for wanted in (slot.id, None):
            for task in self.waiting:
                if task.id_slot == wanted:
                    self.waiting.remove(task)
                    self._assign(task, slot)
                    return [task]
        return []

    def _choose(self, task: Task) -> Slot | None:
        idle = [
            slot
            for slot in self.slots
            if not slot.is_processing and task.id_slot in (None, slot.id)
        ]
        if not idle:
            return None
        best: Slot | None = None
        best_similarity = 0.0
        for slot in idle:
            if not slot.cached:
                continue
            similarity = common_prefix(slot.cached, task.prompt) / max(len(task.prompt), 1)
            if similarity > best_similarity and similarity > SLOT_PROMPT_SIMILARITY:
                best, best_similarity = slot, similarity
        if best is not None:
            return best
        return min(idle, key=lambda slot: (slot.last_used, slot.id))

    def _assign(self, task: Task, slot: Slot) -> None:
        task.slot = slot.id
        task.cache_n = max(0, min(common_prefix(slot.cached, task.prompt), len(task.prompt) - 1))
        slot.cached = slot.cached[: task.cache_n]
        slot.task = task
        self.counters.tokens_prompt += task.prompt_n
        self.counters.tokens_cached += task.cache_n
