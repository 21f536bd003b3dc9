"""StatsD reporting: the fleet's gauges over UDP every interval, as Paddler sent them.

Each period sends one datagram per gauge, `name:value|g`, which every StatsD server reads. UDP
never blocks and a lost datagram is replaced by the next period's, so errors are only logged.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from rower.addresses import Address
from rower.balancer.fleet_totals import FleetTotals

log = logging.getLogger(__name__)


def gauge_datagrams(prefix: str, totals: FleetTotals) -> list[bytes]:
    """The StatsD datagrams for `totals`, one per gauge."""
    gauges = {
        "slots_idle": totals.slots_idle,
        "slots_processing": totals.slots_processing,
        "requests_buffered": totals.requests_buffered,
    }
    return [f"{prefix}.{name}:{value}|g".encode() for name, value in gauges.items()]


class _Sender(asyncio.DatagramProtocol):
    def error_received(self, exc: Exception) -> None:
        # A refused datagram (nobody listens yet) must not stop the reporting.
        log.debug("StatsD datagram not delivered: %s", exc)


class StatsdReporter:
    """Sends the fleet's gauges to a StatsD server every `interval` seconds.

    Args:
        address: the StatsD server (UDP).
        prefix: prepended to each gauge name, with a dot.
        interval: reporting period, in seconds.
        totals: what to report, read at each period.
    """

    def __init__(
        self,
        address: Address,
        *,
        prefix: str,
        interval: float,
        totals: Callable[[], FleetTotals],
    ) -> None:
        self.address = address
        self.prefix = prefix
        self.interval = interval
        self.totals = totals

    async def run(self) -> None:
        """Report until cancelled."""
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(
            _Sender, remote_addr=(self.address.host, self.address.port)
        )
        log.info("reporting StatsD gauges to %s every %g s", self.address, self.interval)
        try:
            while True:
                for datagram in gauge_datagrams(self.prefix, self.totals()):
                    transport.sendto(datagram)
                await asyncio.sleep(self.interval)
        finally:
            transport.close()
