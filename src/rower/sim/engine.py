"""The sim's clock: runs tasks through the slot table in real time.

A handler asks for a slot with `async with engine.hold(task) as run:` (waiting in line when every
slot is busy), then awaits `run.prefill()` and iterates `run.decode()`. Leaving the block, by
finishing, by error or because the client went away and aiohttp cancelled the handler, frees
the slot at once and hands it to the next waiting task.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from types import TracebackType

from rower.sim import tokens
from rower.sim.slots import SlotTable, Task
from rower.sim.timing import Speed, Timings

# Past this many tokens behind schedule in a row, yield to the loop anyway so a fast generation
# cannot starve other connections.
_YIELD_EVERY = 64

# uvloop's clock and timers have millisecond resolution; the schedule needs better.
_now = time.perf_counter

# How a handler ends when its client went away: aiohttp cancels it, or a write fails.
_CLIENT_GONE = (asyncio.CancelledError, ConnectionError)


class Engine:
    """A slot table, a speed and the futures of tasks waiting for a slot."""

    def __init__(self, table: SlotTable, speed: Speed) -> None:
        self.table = table
        self.speed = speed
        self._waiters: dict[int, asyncio.Future[None]] = {}

    def hold(self, task: Task) -> Hold:
        """A context manager that waits for a slot for `task` and frees it on exit."""
        return Hold(self, task)

    def _wake(self, assigned: Sequence[Task]) -> None:
        for task in assigned:
            waiter = self._waiters.get(task.id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)


class Hold:
    """`async with` a slot: see `Engine.hold`."""

    def __init__(self, engine: Engine, task: Task) -> None:
        self._engine = engine
        self._run = Run(engine, task)

    async def __aenter__(self) -> Run:
        engine, task = self._engine, self._run.task
        if engine.table.submit(task):
            return self._run
        waiter = asyncio.get_running_loop().create_future()
        engine._waiters[task.id] = waiter
        try:
            await waiter
        except BaseException:
            # Cancelled while waiting, or just after a slot was handed over: either way the
            # task gives up its place (or its fresh slot) to the next one.
            engine.table.counters.requests_cancelled += 1
            engine._wake(engine.table.release(task, evaluated=False))
            raise
        finally:
            del engine._waiters[task.id]
        return self._run

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        run, table = self._run, self._engine.table
        if exc_type is not None and issubclass(exc_type, _CLIENT_GONE):
            table.counters.requests_cancelled += 1
        self._engine._wake(table.release(run.task, evaluated=run.prefilled))


class Run:
    """A task holding a slot: its prompt evaluation, its generation and their timings."""

    def __init__(self, engine: Engine, task: Task) -> None:
        self.task = task
        self.prefilled = False
        self.text = ""
        self.stop_type = "none"
        self.stopping_word = ""
        self._engine = engine
        self._prompt_ms = 0.0
        self._predicted_ms = 0.0

    @property
    def timings(self) -> Timings:
        """What llama-server would report for this task so far."""
        return Timings(
            cache_n=self.task.cache_n,
            prompt_n=self.task.prompt_n,
            prompt_ms=self._prompt_ms,
            predicted_n=self.task.n_decoded,
            predicted_ms=self._predicted_ms,
        )

    async def prefill(self) -> None:
        """Evaluate the prompt tokens that the slot's cache does not hold."""
        start = _now()
        due = start + self._engine.speed.prefill_seconds(self.task.prompt_n)
        if (delay := due - _now()) > 0:
            await asyncio.sleep(delay)
        self._prompt_ms = (_now() - start) * 1e3
        self.prefilled = True

    async def decode(
        self, *, stop: Sequence[str] = (), seed: int | None = None
    ) -> AsyncIterator[str]:
        """Generate up to `task.n_predict` tokens, one per decode step, yielding their text.

        Each token is due at a fixed point of a schedule that starts now, so the time the
        consumer spends between tokens (writing to a socket) does not slow the generation.
        Stops early at the first `stop` string, which is not yielded.
        """
        engine, task = self._engine, self.task
        start = due = _now()
        pieces = tokens.generation(task.prompt, seed)
        text = ""
        self.stop_type = "limit"
        for step in range(task.n_predict):
            due += engine.speed.decode_step_seconds(engine.table.busy)
            delay = due - _now()
            if delay > 0:
                await asyncio.sleep(delay)
            elif step % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            piece = next(pieces)
            task.generated.append(piece)
            engine.table.counters.tokens_predicted += 1
            self._predicted_ms = (_now() - start) * 1e3
            before = len(text)
            text += piece
            cut, word = _first_stop(text, stop, len(piece))
            if word is not None:
                self.stop_type, self.stopping_word = "word", word
                self.text = text[:cut]
                if cut > before:
                    yield text[before:cut]
                break
            self.text = text
            yield piece

    async def hang(self) -> None:
        """Hold the slot and never answer, until the client goes away (`--hang`)."""
        await asyncio.get_running_loop().create_future()


def _first_stop(text: str, stop: Sequence[str], last_piece: int) -> tuple[int, str | None]:
    """Where the earliest stop string that the last piece completed starts, and which it is."""
    best: tuple[int, str | None] = (len(text), None)
    for word in stop:
        if not word:
            continue
        at = text.find(word, max(0, len(text) - last_piece - len(word)))
        if at >= 0 and at < best[0]:
            best = (at, word)
    return best
