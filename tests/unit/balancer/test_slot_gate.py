"""The asyncio face of the core: waiting, timing out, leaving, and slots handed on."""

from __future__ import annotations

import asyncio

import pytest

from rower.balancer.fleet import Fleet
from rower.balancer.slot_gate import SlotGate, SlotUnavailable
from rower.status import StatusUpdate


def gate(*, max_buffered: int = 10, timeout: float = 5.0) -> SlotGate:
    return SlotGate(Fleet(max_buffered=max_buffered), buffer_timeout=timeout)


def report(g: SlotGate, agent: str, slots: int, addr: str = "127.0.0.1:1") -> None:
    g.report(
        agent,
        StatusUpdate(external_llamacpp_addr=addr, slots_idle=slots, slots_total=slots),
    )


async def test_waiters_are_served_in_arrival_order() -> None:
    g = gate()
    report(g, "a", 1)
    first = await g.acquire(g.new_request_id())
    order: list[int] = []

    async def wait(request_id: int) -> None:
        await g.acquire(request_id)
        order.append(request_id)
        g.release(request_id)

    ids = [g.new_request_id() for _ in range(3)]
    tasks = [asyncio.create_task(wait(i)) for i in ids]
    await asyncio.sleep(0)
    assert g.fleet.requests_buffered == 3
    g.release(first.request_id)
    await asyncio.gather(*tasks)
    assert order == ids
    assert g.fleet.requests_in_flight == 0


async def test_timeout_is_504_and_leaves_the_buffer() -> None:
    g = gate(timeout=0.05)
    with pytest.raises(SlotUnavailable) as error:
        await g.acquire(g.new_request_id())
    assert error.value.status == 504
    assert g.fleet.requests_buffered == 0


async def test_full_buffer_is_429_with_retry_after() -> None:
    g = gate(max_buffered=1, timeout=3)
    waiting = asyncio.create_task(g.acquire(g.new_request_id()))
    await asyncio.sleep(0)
    with pytest.raises(SlotUnavailable) as error:
        await g.acquire(g.new_request_id())
    assert (error.value.status, error.value.retry_after) == (429, 3)
    waiting.cancel()


async def test_a_slot_granted_to_a_cancelled_waiter_goes_to_the_next() -> None:
    g = gate()
    report(g, "a", 1)
    holder = await g.acquire(g.new_request_id())
    leaving = asyncio.create_task(g.acquire(g.new_request_id()))
    staying = asyncio.create_task(g.acquire(g.new_request_id()))
    await asyncio.sleep(0)
    # The slot frees and the client leaves in the same loop iteration.
    g.release(holder.request_id)
    leaving.cancel()
    dispatch = await asyncio.wait_for(staying, 1)
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert g.fleet.requests_in_flight == 1
    g.release(dispatch.request_id)
    assert g.fleet.requests_in_flight == 0
    assert g.fleet.requests_buffered == 0


async def test_agent_appearing_serves_the_buffer() -> None:
    g = gate()
    waiting = asyncio.create_task(g.acquire(g.new_request_id()))
    await asyncio.sleep(0)
    report(g, "late", 2, "127.0.0.1:9")
    dispatch = await asyncio.wait_for(waiting, 1)
    assert dispatch.upstream == "127.0.0.1:9"


async def test_a_request_waiting_for_its_busy_home_goes_elsewhere_at_its_deadline() -> None:
    from rower.balancer.answer_timings import AnswerTimings
    from rower.balancer.cache_routing import Affinity
    from rower.balancer.request_needs import RequestNeeds
    from rower.status import SlotStatus

    g = gate()
    report(g, "home", 1, "127.0.0.1:1")
    report(g, "other", 1, "127.0.0.1:2")
    for agent in ("home", "other"):
        # Prefill of 1,000 tokens/s: 2 blocks (~256 tokens) cost ~0.26 s to compute again.
        g.answered(agent, AnswerTimings(1000, 0, 1.0, 1000, 1.0))
    turn = RequestNeeds("/completion", True, prefix=(1, 2))
    first = await g.acquire(g.new_request_id(), needs=turn)
    g.release(first.request_id)
    home = first.agent_id
    holder = await g.acquire(
        g.new_request_id(), needs=RequestNeeds("/completion", True, prefix=(1, 2, 3))
    )
    assert holder.agent_id == home
    # Its one slot: 10 tokens to go at 1,000 tokens/s, so waiting looks cheaper than prefill.
    busy = SlotStatus(id=0, is_processing=True, n_remain=10)
    address = "127.0.0.1:1" if home == "home" else "127.0.0.1:2"
    g.report(
        home,
        StatusUpdate(
            external_llamacpp_addr=address, slots_processing=1, slots_total=1, slots=[busy]
        ),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    # The home never frees its slot (the estimate was wrong): at the deadline the request
    # goes to the other server, at most the prefill it would have saved later.
    moved = await g.acquire(
        g.new_request_id(), needs=RequestNeeds("/completion", True, prefix=(1, 2, 3, 4))
    )
    waited = loop.time() - started
    assert moved.agent_id != home
    assert moved.affinity is Affinity.SPILL_AFTER_WAIT
    assert 0.3 < waited < 1.5, waited  # 384 tokens to prefill at 1,000 tokens/s: 0.38 s
    assert g.fleet.requests_buffered == 0
