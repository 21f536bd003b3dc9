"""StatsD datagrams, received by a real UDP listener on loopback."""

from __future__ import annotations

import asyncio
import contextlib

from rower.addresses import Address
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.statsd import StatsdReporter, gauge_datagrams, statsd_model_name
from rower.status import ModelSummary


class Listener(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.received: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str | object, ...]) -> None:
        self.received.put_nowait(data)


def test_one_gauge_per_datagram_with_the_prefix() -> None:
    totals = FleetTotals(slots_idle=3, slots_processing=5, requests_buffered=2, agents_registered=2)
    assert gauge_datagrams("fleet.a", totals) == [
        b"fleet.a.slots_idle:3|g",
        b"fleet.a.slots_processing:5|g",
        b"fleet.a.requests_buffered:2|g",
    ]


def test_each_model_has_its_gauges_after_the_fleets_under_a_safe_name() -> None:
    models = (
        ModelSummary("", 1, 2, 0, 2, 0),
        ModelSummary("Qwen2.5-7B:q4|x", 1, 1, 3, 4, 5),
        ModelSummary("qwen2_5-7B_q4_x", 1, 1, 0, 1, 1),
        ModelSummary("embed"),
    )
    totals = FleetTotals(4, 3, 6, 3, models)
    datagrams = gauge_datagrams("rower", totals)
    assert datagrams[:3] == [
        b"rower.slots_idle:4|g",
        b"rower.slots_processing:3|g",
        b"rower.requests_buffered:6|g",
    ]
    assert datagrams[3:] == [
        b"rower.model.unnamed.slots_idle:2|g",
        b"rower.model.unnamed.slots_processing:0|g",
        b"rower.model.unnamed.requests_buffered:0|g",
        b"rower.model.Qwen2_5-7B_q4_x.slots_idle:1|g",
        b"rower.model.Qwen2_5-7B_q4_x.slots_processing:3|g",
        b"rower.model.Qwen2_5-7B_q4_x.requests_buffered:5|g",
        # Another model with that safe name (case differs): its own gauges.
        b"rower.model.qwen2_5-7B_q4_x.slots_idle:1|g",
        b"rower.model.qwen2_5-7B_q4_x.slots_processing:0|g",
        b"rower.model.qwen2_5-7B_q4_x.requests_buffered:1|g",
        b"rower.model.embed.slots_idle:0|g",
        b"rower.model.embed.slots_processing:0|g",
        b"rower.model.embed.requests_buffered:0|g",
    ]


def test_models_with_the_same_safe_name_are_summed() -> None:
    models = (ModelSummary("a.b", 1, 1, 1, 2, 1), ModelSummary("a:b", 1, 2, 0, 2, 3))
    assert gauge_datagrams("p", FleetTotals(3, 1, 4, 2, models))[3:] == [
        b"p.model.a_b.slots_idle:3|g",
        b"p.model.a_b.slots_processing:1|g",
        b"p.model.a_b.requests_buffered:4|g",
    ]
    assert statsd_model_name("llama-3.1-8b-instruct/Q4_K_M") == "llama-3_1-8b-instruct_Q4_K_M"


async def test_reports_current_totals_every_interval() -> None:
    loop = asyncio.get_running_loop()
    transport, listener = await loop.create_datagram_endpoint(Listener, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    reads = iter(range(100))

    def totals() -> FleetTotals:
        n = next(reads)
        return FleetTotals(
            slots_idle=n, slots_processing=10 - n, requests_buffered=0, agents_registered=1
        )

    reporter = StatsdReporter(
        Address("127.0.0.1", port), prefix="rower", interval=0.05, totals=totals
    )
    task = asyncio.create_task(reporter.run())
    try:
        received = [await asyncio.wait_for(listener.received.get(), 5) for _ in range(6)]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        transport.close()
    assert received == [
        b"rower.slots_idle:0|g",
        b"rower.slots_processing:10|g",
        b"rower.requests_buffered:0|g",
        b"rower.slots_idle:1|g",
        b"rower.slots_processing:9|g",
        b"rower.requests_buffered:0|g",
    ]


async def test_keeps_reporting_while_nobody_listens() -> None:
    # A port nobody listens on: ICMP "port unreachable" comes back as error_received.
    loop = asyncio.get_running_loop()
    probe, _ = await loop.create_datagram_endpoint(
        asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0)
    )
    port = probe.get_extra_info("sockname")[1]
    probe.close()
    calls = 0

    def totals() -> FleetTotals:
        nonlocal calls
        calls += 1
        return FleetTotals(0, 0, 0, 0)

    reporter = StatsdReporter(Address("127.0.0.1", port), prefix="p", interval=0.02, totals=totals)
    task = asyncio.create_task(reporter.run())
    await asyncio.sleep(0.3)
    assert not task.done()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert calls >= 3
