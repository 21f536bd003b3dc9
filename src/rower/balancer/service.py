"""`rower balancer` as a running process: both listeners, the publisher, and their lifetimes."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal

from aiohttp import web

from rower.balancer.access_log import open_access_log
from rower.balancer.client_connection import ClientListener
from rower.balancer.dashboard_web import add_dashboard_routes
from rower.balancer.fleet import Fleet
from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.http_limits import (
    LimitedAppRunner,
    ListenerLimits,
    ListenerStats,
    raise_open_file_limit,
)
from rower.balancer.management import management_app
from rower.balancer.metrics import BalancerMetrics, add_metrics_routes
from rower.balancer.outcome import OutcomeListener, all_of
from rower.balancer.peers import PeerFollower
from rower.balancer.proxy import ReverseProxy
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate
from rower.balancer.statsd import StatsdReporter
from rower.balancer.upstream_client import UpstreamClient

log = logging.getLogger(__name__)

LISTEN_BACKLOG = 2048
"""Connections the kernel queues before accepting (capped by `net.core.somaxconn`): aiohttp's
128 drops connections in a burst (thousands of clients, or agents reconnecting after a restart)
and they retry only after a second or more."""

SHUTDOWN_TIMEOUT = 0.5
"""Handlers still running when a listener closes are cut after this, in seconds; the proxy's
streams had the grace period already (`drain`)."""


class Balancer:
    """The balancer's parts, wired together; `start` opens the listeners, `stop` closes them."""

    def __init__(self, settings: BalancerSettings) -> None:
        self.settings = settings
        self.fleet = Fleet(
            max_buffered=settings.max_buffered_requests,
            slot_accounting=settings.slot_accounting,
            max_agents=settings.max_agents,
            routing=settings.routing,
            prompt_cache_contexts=settings.prompt_cache_contexts,
            prefix_memory_entries=settings.prefix_memory_entries,
            models=settings.models,
        )
        self.gate = SlotGate(
            self.fleet,
            buffer_timeout=settings.buffered_request_timeout,
            model_timeouts=settings.models.buffer_timeout,
        )
        self.publisher = FleetPublisher(self.gate)
        self.management = management_app(self.gate, self.publisher, settings)
        self.listener_stats = {"reverse-proxy": ListenerStats(), "management": ListenerStats()}
        self.peers = [
            PeerFollower(peer, self.gate.placed_by_peer, token=settings.management_token)
            for peer in settings.peer_balancer_addrs
        ]
        # Observability (metrics.py, statsd.py, dashboard_web.py): routes before start.
        self.metrics = (
            BalancerMetrics(self.publisher, listeners=self.listener_stats, peers=self.peers)
            if settings.metrics_endpoint_enable
            else None
        )
        if self.metrics is not None:
            add_metrics_routes(self.management, self.metrics)
        if settings.management_dashboard_enable:
            add_dashboard_routes(self.management)
        self.access_log = open_access_log(settings.access_log, settings.log_format)
        self._runners: list[web.AppRunner] = []
        self._proxy_listener: ClientListener | None = None
        self._upstream: UpstreamClient | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        """Listen on the management and reverse-proxy addresses."""
        upstream = self._upstream = UpstreamClient()
        self.proxy = ReverseProxy(
            self.gate,
            upstream,
            self.settings,
            on_outcome=self._outcome_listener(),
        )
        self._tasks.append(asyncio.create_task(self.publisher.run(), name="fleet publisher"))
        for peer in self.peers:
            self._tasks.append(asyncio.create_task(peer.run(), name=f"peer {peer.peer}"))
        if self.settings.statsd_addr is not None:
            statsd = StatsdReporter(
                self.settings.statsd_addr,
                prefix=self.settings.statsd_prefix,
                interval=self.settings.statsd_reporting_interval,
                totals=lambda: FleetTotals.of(self.publisher.view()),
            )
            self._tasks.append(asyncio.create_task(statsd.run(), name="statsd reporter"))
        limits = listener_limits(self.settings)
        raise_open_file_limit(sum(limit.max_connections for limit in limits.values()) + 256)
        address = self.settings.management_addr
        runner = LimitedAppRunner(
            self.management,
            limits=limits["management"],
            stats=self.listener_stats["management"],
            handler_cancellation=True,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        site = web.TCPSite(
            runner, address.host, address.port, reuse_address=True, backlog=LISTEN_BACKLOG
        )
        await site.start()
        self._runners.append(runner)
        # The public side is Rower's own HTTP server (client_connection.py).
        address = self.settings.reverseproxy_addr
        self._proxy_listener = ClientListener(
            self.proxy,
            limits=limits["reverse-proxy"],
            stats=self.listener_stats["reverse-proxy"],
            max_body_bytes=self.settings.max_request_body_bytes,
        )
        await self._proxy_listener.start(address.host, address.port, backlog=LISTEN_BACKLOG)
        log.info(
            "balancer listening: management on %s, reverse proxy on %s",
            self.settings.management_addr,
            self.settings.reverseproxy_addr,
        )

    def _outcome_listener(self) -> OutcomeListener | None:
        """Everything that hears of each proxied request: the metrics and the access log."""
        listeners: list[OutcomeListener] = []
        if self.metrics is not None:
            listeners.append(self.metrics.observe)
        if self.access_log is not None:
            listeners.append(self.access_log.observe)
        return all_of(listeners)

    async def drain(self, grace_period: float, cut_short: asyncio.Event | None = None) -> None:
        """Stop taking requests and let those in flight finish, for `grace_period` seconds at most.

        Waiting requests get a 503 at once, the proxy listener closes (new connections are
        refused, so clients fail over at once), and the management listener stays up so agents
        keep reporting. `cut_short` ends the wait early (a second SIGTERM).
        """
        self.gate.close()
        if self._proxy_listener is not None:
            self._proxy_listener.stop_listening()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_period
        in_flight = self.fleet.requests_in_flight
        if in_flight:
            log.info("waiting up to %g s for %d requests in flight", grace_period, in_flight)
        while self.fleet.requests_in_flight and loop.time() < deadline:
            if cut_short is not None and cut_short.is_set():
                break
            await asyncio.sleep(0.05)
        if self.fleet.requests_in_flight:
            log.warning(
                "cutting %d requests still in flight after the grace period",
                self.fleet.requests_in_flight,
            )

    async def stop(self) -> None:
        """Close the listeners and the background tasks."""
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._proxy_listener is not None:
            await self._proxy_listener.close(SHUTDOWN_TIMEOUT)
            self._proxy_listener = None
        if self._upstream is not None:
            await self._upstream.close()
        for runner in reversed(self._runners):
            await runner.cleanup()


def listener_limits(settings: BalancerSettings) -> dict[str, ListenerLimits]:
    """What each listener allows a client connection (docs/reliability.md).

    Every agent holds one connection to the management listener for as long as it runs, so
    that listener takes `--max-agents` more than the cap.
    """
    connections = {
        "reverse-proxy": settings.max_client_connections,
        "management": settings.max_client_connections + settings.max_agents,
    }
    return {
        name: ListenerLimits(
            name=name,
            max_header_bytes=settings.max_header_bytes,
            header_timeout=settings.request_header_timeout,
            idle_timeout=settings.idle_connection_timeout,
            max_connections=most,
        )
        for name, most in connections.items()
    }


def tune_garbage_collector() -> None:
    """Make full collections rare: with 10,000 open connections one took 150-450 ms.

    What exists after start lives as long as the process, so it leaves the collector's view
    (`gc.freeze`), and collections run after 50,000 allocations instead of 700. Reference
    counting frees almost everything the proxy allocates; cycles are rare.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def serve(settings: BalancerSettings) -> None:
    """Run a balancer until SIGTERM or SIGINT, then drain it; a second signal cuts the drain."""
    balancer = Balancer(settings)
    stopping = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stopping.is_set():
            hurry.set()
        stopping.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    await balancer.start()
    tune_garbage_collector()
    try:
        await stopping.wait()
        log.info("balancer stopping")
        await balancer.drain(settings.shutdown_grace_period, hurry)
    finally:
        await balancer.stop()
