"""The sim's engine in real time: waiting for slots, cancellation, decode speed, stop strings."""

from __future__ import annotations

import asyncio
import time

import pytest

from rower.sim import tokens
from rower.sim.engine import Engine, Run
from rower.sim.slots import SlotTable, Task
from rower.sim.timing import Speed


def make_engine(n_slots: int, **speed: float) -> Engine:
    return Engine(SlotTable(n_slots), Speed(**speed))


def make_task(engine: Engine, prompt: str = "hello world", n_predict: int = 4) -> Task:
    return Task(engine.table.new_task_id(), tuple(tokens.tokenize(prompt)), n_predict=n_predict)


async def generate(run: Run, **options: object) -> str:
    await run.prefill()
    return "".join([piece async for piece in run.decode(**options)])  # type: ignore[arg-type]


async def test_generates_n_predict_tokens_and_frees_the_slot() -> None:
    engine = make_engine(1, decode_tokens_per_second=10_000)
    task = make_task(engine, n_predict=5)
    async with engine.hold(task) as run:
        assert engine.table.busy == 1
        text = await generate(run)
    assert task.n_decoded == 5
    assert text == "".join(task.generated)
    assert run.stop_type == "limit"
    assert engine.table.busy == 0
    assert run.timings.predicted_n == 5


async def test_decode_takes_n_over_speed_seconds() -> None:
    engine = make_engine(1, decode_tokens_per_second=400)
    task = make_task(engine, n_predict=40)
    started = time.perf_counter()
    async with engine.hold(task) as run:
        await generate(run)
    elapsed = time.perf_counter() - started
    assert 0.095 <= elapsed < 0.25  # 40 / 400 = 0.1 s
    assert run.timings.predicted_ms == pytest.approx(100, abs=30)


async def test_prefill_takes_uncached_tokens_over_prefill_speed() -> None:
    engine = make_engine(1, prefill_tokens_per_second=1000, decode_tokens_per_second=10_000)
    prompt = " ".join(["word"] * 100)  # 101 tokens with BOS
    first = make_task(engine, prompt, n_predict=0)
    async with engine.hold(first) as run:
        await run.prefill()
    assert run.timings.prompt_ms == pytest.approx(101, abs=30)
    again = make_task(engine, prompt, n_predict=0)
    async with engine.hold(again) as run:
        await run.prefill()
    assert again.cache_n == 100
    assert run.timings.prompt_ms < 5


async def test_decode_slowdown_with_busy_slots() -> None:
    engine = make_engine(2, decode_tokens_per_second=400, decode_slowdown=1.0)
    other = make_task(engine, "other")
    task = make_task(engine, n_predict=20)
    started = time.perf_counter()
    async with engine.hold(other), engine.hold(task) as run:
        await generate(run)
    elapsed = time.perf_counter() - started
    assert 0.095 <= elapsed < 0.25  # 20 tokens at 400 / (1 + 1 * (2 - 1)) = 200 tokens/s


async def test_task_waits_for_a_slot_and_gets_it_when_freed() -> None:
    engine = make_engine(1, decode_tokens_per_second=10_000)
    first, second = make_task(engine, "first"), make_task(engine, "second")
    order: list[str] = []

    async def use(task: Task, name: str, hold_for: float) -> None:
        async with engine.hold(task) as run:
            order.append(f"{name} start")
            await asyncio.sleep(hold_for)
            await generate(run)
            order.append(f"{name} end")

    one = asyncio.create_task(use(first, "first", 0.05))
    await asyncio.sleep(0.01)
    two = asyncio.create_task(use(second, "second", 0))
    await asyncio.sleep(0.01)
    assert list(engine.table.waiting) == [second]
    await asyncio.gather(one, two)
    assert order == ["first start", "first end", "second start", "second end"]
    assert second.deferred
    assert engine.table.counters.requests_deferred == 1


async def test_cancelled_waiter_leaves_the_line_and_is_counted() -> None:
    engine = make_engine(1)
    holder, waiter = make_task(engine, "holder"), make_task(engine, "waiter")
    async with engine.hold(holder):
        pending = asyncio.create_task(engine.hold(waiter).__aenter__())
        await asyncio.sleep(0.01)
        assert list(engine.table.waiting) == [waiter]
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        assert not engine.table.waiting
    assert engine.table.counters.requests_cancelled == 1
    assert engine.table.idle == 1


async def test_cancelled_generation_frees_its_slot_for_the_next_waiter() -> None:
    engine = make_engine(1, decode_tokens_per_second=20)
    long, next_ = make_task(engine, "long", n_predict=1000), make_task(engine, "next")

    async def run_long() -> None:
        async with engine.hold(long) as run:
            await generate(run)

    running = asyncio.create_task(run_long())
    await asyncio.sleep(0.01)
    waiting = asyncio.create_task(engine.hold(next_).__aenter__())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    running.cancel()
    run = await asyncio.wait_for(waiting, 0.1)
    assert run.task is next_
    assert next_.slot == 0
    assert engine.table.counters.requests_cancelled == 1


async def test_stop_string_ends_generation_without_being_returned() -> None:
    engine = make_engine(1, decode_tokens_per_second=100_000)
    probe = make_task(engine, "stop test", n_predict=8)
    async with engine.hold(probe) as run:
        full = await generate(run)
    stop_word = probe.generated[3]  # the same prompt generates the same pieces
    task = make_task(engine, "stop test", n_predict=8)
    async with engine.hold(task) as run:
        text = await generate(run, stop=[stop_word])
    assert run.stop_type == "word"
    assert run.stopping_word == stop_word
    assert text == full[: full.index(stop_word)]
    assert run.text == text
