"""StatsD reporting: the fleet's gauges over UDP every interval, as Paddler sent them.

Each period sends one datagram per gauge, `name:value|g`, which every StatsD server reads. UDP
never blocks and a lost datagram is replaced by the next period's, so errors are only logged.

Paddler's three fleet totals come first, unchanged; then the same per model, under
`{prefix}.model.<name>.`, the model's name made safe for StatsD's dotted paths
(`statsd_model_name`).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

from rower.addresses import Address
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.models import UNKNOWN

log = logging.getLogger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")

UNNAMED_MODEL = "unnamed"
"""The StatsD name of servers whose agent names no model."""


def statsd_model_name(model: str) -> str:
    """`model` as one segment of a StatsD name: every character but letters, digits, `_` and
    `-` becomes `_` (a dot would split the path, `:` and `|` end the name)."""
    return UNNAMED_MODEL if model == UNKNOWN else _UNSAFE.sub("_", model)


def gauge_datagrams(prefix: str, totals: FleetTotals) -> list[bytes]:
    """The StatsD datagrams for `totals`, one per gauge: the fleet's, then each model's.

    Two models whose safe names are the same (`qwen2.5` and `qwen2_5`) are reported as one, summed.
    """
    gauges = {
        "slots_idle": totals.slots_idle,
        "slots_processing": totals.slots_processing,
        "requests_buffered": totals.requests_buffered,
    }
    for model in totals.models:
        path = f"model.{statsd_model_name(model.model)}"
        for name, value in (
            ("slots_idle", model.slots_idle),
            ("slots_processing", model.slots_processing),
            ("requests_buffered", model.requests_buffered),
        ):
            gauges[f"{path}.{name}"] = gauges.get(f"{path}.{name}", 0) + value
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
