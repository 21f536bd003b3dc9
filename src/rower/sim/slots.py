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

With a host-RAM prompt cache (llama-server's `--cache-ram`, here bounded in tokens), the rules
of `get_available_slot` and `server_prompt_cache` (tools/server/server-task.cpp) apply too:

- When a completion task takes a slot by least-recently-used choice, or by similarity while it
  would keep less than half of the slot's tokens, the slot's tokens are first saved to the
  cache, then the cached state that the prompt shares most with replaces them, if it beats
  what the slot holds (see `PromptCache`). A task pinned with `id_slot` to a dissimilar slot
  neither saves nor restores.
- After every assignment, each idle slot is saved to the cache as well (llama-server's
  `--cache-idle-slots`, on by default): the slot keeps its tokens, the cache gets a copy that
  outlives the slot's next reuse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

SLOT_PROMPT_SIMILARITY = 0.1
SAVE_BELOW_KEEP = 0.5
"""A slot chosen by similarity is saved to the cache first if the task keeps less than this
share of its tokens."""
RESTORE_MIN_KEEP = 0.25
"""A cached state is restored only if the prompt shares at least this share of it ("don't
trash large prompts")."""


_CHUNK = 256


def common_prefix(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common prefix of two token lists."""
    if type(a) is not type(b):
        a, b = tuple(a), tuple(b)
    n = min(len(a), len(b))
    # Whole chunks compare in C: conversations share thousands of tokens, and the prompt
    # cache compares every prompt with every saved state.
    start = 0
    while start < n and a[start : start + _CHUNK] == b[start : start + _CHUNK]:
        start += _CHUNK
    start = min(start, n)
    end = min(start + _CHUNK, n)
    while start < end and a[start] == b[start]:
        start += 1
    return start


def starts_with(tokens: Sequence[str], prefix: Sequence[str]) -> bool:
    """Whether `tokens` begins with all of `prefix`."""
    return len(prefix) <= len(tokens) and common_prefix(prefix, tokens) == len(prefix)


@dataclass(eq=False)
class Task:
    """One inference request as the slot table sees it.

    Attributes:
        id: increasing task id, shown in `/slots` as `id_task`.
        prompt: prompt tokens.
        id_slot: the slot it is pinned to, or None for any.
        n_predict: most tokens it will generate.
        limited: whether the request set a token limit (else `/slots` says `n_remain` -1, and
            the generation still stops at the end of the slot's context).
        completion: a completion (it may use the host-RAM prompt cache), not an embedding.
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
    limited: bool = True
    completion: bool = True
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

    @property
    def n_remain(self) -> int:
        """Tokens it may still generate, as `/slots` shows it: -1 without a limit."""
        return max(self.n_predict - self.n_decoded, 0) if self.limited else -1


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


class PromptCache:
    """llama-server's host-RAM prompt cache: saved slot states, oldest first, bounded in tokens.

    llama-server bounds it in MiB (`--cache-ram`); a state's size is its token count times
    the model's KV bytes per token, so a bound in tokens is the same rule without a model.
    """

    def __init__(self, limit_tokens: int) -> None:
        if limit_tokens < 1:
            raise ValueError("a prompt cache holds at least one token")
        self.limit_tokens = limit_tokens
        self.states: list[tuple[str, ...]] = []

    @property
    def n_tokens(self) -> int:
        """Tokens held, over every state."""
        return sum(len(state) for state in self.states)

    def save(self, tokens: tuple[str, ...]) -> bool:
        """Keep a copy of a slot's `tokens`; False when not needed or too large.

        Nothing is saved when a cached state already starts with all of `tokens`; states that
        `tokens` extends are dropped (they are no longer needed); the oldest states make room.
        """
        if not tokens or len(tokens) > self.limit_tokens:
            return False
        if any(starts_with(state, tokens) for state in self.states):
            return False
        self.states = [state for state in self.states if not starts_with(tokens, state)]
        while self.states and self.n_tokens + len(tokens) > self.limit_tokens:
            self.states.pop(0)
        self.states.append(tokens)
        return True

    def restore(self, held: tuple[str, ...], prompt: tuple[str, ...]) -> tuple[str, ...] | None:
        """The state to load into a slot that holds `held` for `prompt`, taken out of the cache.

        The best state shares at least `RESTORE_MIN_KEEP` of itself with the prompt and beats
        both what the slot holds and every other state on the share of itself that the prompt
        keeps and on the share of the prompt it covers. None: the slot keeps what it holds.
        """
        common = common_prefix(held, prompt)
        best_keep = common / len(held) if held else -1.0
        best_sim = common / max(len(prompt), 1)
        best: int | None = None
        for index, state in enumerate(self.states):
            common = common_prefix(state, prompt)
            keep, sim = common / len(state), common / max(len(prompt), 1)
            if keep < RESTORE_MIN_KEEP:
                continue
            if keep > best_keep and sim > best_sim:
                best, best_keep, best_sim = index, keep, sim
        return None if best is None else self.states.pop(best)


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
        cache_saves: slot states copied to the host-RAM prompt cache.
        cache_restores: cached states loaded into a slot for a new task.
    """

    requests_total: int = 0
    requests_deferred: int = 0
    requests_cancelled: int = 0
    tokens_prompt: int = 0
    tokens_cached: int = 0
    tokens_predicted: int = 0
    cache_saves: int = 0
    cache_restores: int = 0


class SlotTable:
    """`n_slots` slots, the FIFO of tasks waiting for one, and the host-RAM prompt cache.

    `cache_ram_tokens` bounds the prompt cache; 0 = none (llama-server's `--cache-ram 0`).
    """

    def __init__(self, n_slots: int, *, cache_ram_tokens: int = 0) -> None:
        if n_slots < 1:
            raise ValueError("a slot table needs at least one slot")
        self.slots = [Slot(i) for i in range(n_slots)]
        self.waiting: deque[Task] = deque()
        self.cache = PromptCache(cache_ram_tokens) if cache_ram_tokens > 0 else None
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
        choice = self._choose(task)
        if choice is None:
            task.deferred = True
            self.counters.requests_deferred += 1
            self.waiting.append(task)
            return False
        self._assign(task, choice)
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
                    # The same choice as at submission: the freed slot is the only idle one
                    # this task may take, but it may go through the prompt cache.
                    choice = self._choose(task)
                    assert choice is not None, "a freed slot is idle"
                    self._assign(task, choice)
                    return [task]
        return []

    def _choose(self, task: Task) -> tuple[Slot, bool] | None:
        """The slot for `task`, and whether its state goes through the prompt cache first."""
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
            keep = best_similarity * len(task.prompt) / len(best.cached)
            return best, keep < SAVE_BELOW_KEEP
        if task.id_slot is not None:
            # Pinned to a dissimilar slot: llama-server takes it without touching the cache.
            return idle[0], False
        return min(idle, key=lambda slot: (slot.last_used, slot.id)), True

    def _assign(self, task: Task, choice: tuple[Slot, bool]) -> None:
        slot, through_cache = choice
        if through_cache and task.completion and self.cache is not None:
            self._save(slot)
            restored = self.cache.restore(slot.cached, task.prompt)
            if restored is not None:
                slot.cached = restored
                self.counters.cache_restores += 1
        task.slot = slot.id
        task.cache_n = max(0, min(common_prefix(slot.cached, task.prompt), len(task.prompt) - 1))
        slot.cached = slot.cached[: task.cache_n]
        slot.task = task
        self.counters.tokens_prompt += task.prompt_n
        self.counters.tokens_cached += task.cache_n
        if self.cache is not None:
            for idle in self.slots:
                if not idle.is_processing:
                    self._save(idle)

    def _save(self, slot: Slot) -> None:
        assert self.cache is not None
        if self.cache.save(slot.cached):
            self.counters.cache_saves += 1
