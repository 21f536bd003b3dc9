"""`rower balancer` as a running process: both listeners, the publisher, and their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from aiohttp import web

from rower.balancer.dashboard_web import add_dashboard_routes
from rower.balancer.fleet import Fleet
from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.management import management_app
from rower.balancer.metrics import BalancerMetrics, add_metrics_routes
from rower.balancer.proxy import ReverseProxy, proxy_app, upstream_session
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate
from rower.balancer.statsd import StatsdReporter

log = logging.getLogger(__name__)


class Balancer:
    """The balancer's parts, wired together; `start` opens the listeners, `stop` closes them."""

    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.fleet = Fleet(
            max_buffered=settings.max_buffered_requests,
            slot_accounting=settings.slot_accounting,
        )
        self.gate = SlotGate(self.fleet, buffer_timeout=settings.buffered_request_timeout)
        self.publisher = FleetPublisher(self.gate)
        self.management = management_app(self.gate, self.publisher, settings)
        # Observability (metrics.py, statsd.py, dashboard_web.py): routes before start.
        self.metrics = BalancerMetrics(self.publisher) if settings.metrics_endpoint_enable else None
        if self.metrics is not None:
            add_metrics_routes(self.management, self.metrics)
        if settings.management_dashboard_enable:
            add_dashboard_routes(self.management)
        self._runners: list[web.AppRunner] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Listen on the management and reverse-proxy addresses."""
        session = upstream_session()
        self.proxy = ReverseProxy(
            self.gate,
            session,
            self.settings,
            on_outcome=self.metrics.observe if self.metrics is not None else None,
        )
        proxy = proxy_app(self.proxy)

        async def close_session(_: web.Application) -> None:
            await session.close()

        proxy.on_cleanup.append(close_session)
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="fleet publisher"))
        if self.settings.statsd_addr is not None:
            statsd = StatsdReporter(
                self.settings.statsd_addr,
                prefix=self.settings.statsd_prefix,
                interval=self.settings.statsd_reporting_interval,
                totals=lambda: FleetTotals.of(self.publisher.view()),
            )
            self._tasks.append(asyncio.create_task(statsd.run(), name="statsd reporter"))
        for app, address in (
            (self.management, self.settings.management_addr),
            (proxy, self.settings.reverseproxy_addr),
        ):
            runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
            await runner.setup()
            await web.TCPSite(runner, address.host, address.port, reuse_address=True).start()
            self._runners.append(runner)
        log.info(
            "balancer listening: management on %s, reverse proxy on %s",
            self.settings.management_addr,
            self.settings.reverseproxy_addr,
        )

    async def stop(self) -> None:
        """Close the listeners and the background tasks."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for runner in reversed(self._runners):
            await runner.cleanup()


async def serve(settings: BalancerSettings) -> None:
    """Run a balancer until SIGTERM or SIGINT."""
    balancer = Balancer(settings)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stopping.set)
    await balancer.start()
    try:
        await stopping.wait()
    finally:
        log.info("balancer stopping")
        await balancer.stop()
