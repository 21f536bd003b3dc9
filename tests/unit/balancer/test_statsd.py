"""StatsD datagrams, received by a real UDP listener on loopback."""

from __future__ import annotations

import asyncio
import contextlib

from rower.addresses import Address
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.statsd import StatsdReporter, gauge_datagrams


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
