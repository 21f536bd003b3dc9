"""Prometheus metrics of one balancer, served at `/api/v1/metrics` and `/metrics`.

Two kinds of numbers. The fleet's state (slots, buffered requests, agents) is read from the
fleet when Prometheus scrapes, by a custom collector, so it is never out of date and costs
nothing between scrapes. What happened to proxied requests is counted as it happens, from the
reverse proxy's `ProxyOutcome`s. Each balancer has its own registry: two balancers in one
process (as in tests) never mix their numbers, and the process-wide default registry is left
alone.

Per model (`rower_model_*`, label `model`): the same gauges from the view's model summaries,
and the inference requests' statuses, waits and first bytes. The label takes only the fleet's
own models (what agents serve, declared ones) and two fixed values, so a client cannot make a
series per name it sends: `(unknown)` for a request whose model the fleet does not serve (or
that named none where it had to) and `(unnamed)` for servers whose agent names no model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.fleet_totals import FleetTotals
from rower.balancer.http_limits import ListenerStats
from rower.balancer.models import UNKNOWN
from rower.balancer.outcome import Failure, ProxyOutcome
from rower.balancer.paths import path_class, takes_slot
from rower.balancer.peers import PeerFollower
from rower.balancer.placement_feed import PlacementFeed
from rower.status import ModelSummary

SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
"""From a cached embedding (milliseconds) to a long generation (minutes)."""

AGENT_LABELS = ("agent_id", "agent_name", "model")
"""`model` too: a router-mode server's loaded models are one entry each, under one agent id."""

UNKNOWN_MODEL_LABEL = "(unknown)"
"""`model` of requests for no model the fleet serves: one series, whatever names they sent."""
UNNAMED_MODEL_LABEL = "(unnamed)"
"""`model` of servers whose agent names no model (and of requests waiting for such a fleet)."""


def model_label(model: str) -> str:
    """The `model` label of one of the fleet's models (`models.UNKNOWN` included)."""
    return UNNAMED_MODEL_LABEL if model == UNKNOWN else model


UPSTREAM_FAILURES = frozenset(
    {Failure.UPSTREAMS_REFUSED, Failure.UPSTREAM_FAILED, Failure.UPSTREAM_CUT}
)
"""What `rower_upstream_errors` counts; "no server registered" is the fleet's state, not one."""


class FleetCollector(Collector):
    """The fleet's gauges, computed from the publisher's view at each scrape."""

    def __init__(
        self, publisher: FleetPublisher, listeners: Mapping[str, ListenerStats] | None = None
    ) -> None:
        self.publisher = publisher
        self.listeners = dict(listeners or {})

    def collect(self) -> Iterator[Metric]:
        """Yield the fleet-wide, per-listener and per-agent metric families."""
        view = self.publisher.view()
        totals = FleetTotals.of(view)
        yield GaugeMetricFamily(
            "rower_slots_idle", "Idle llama.cpp slots, summed over agents", totals.slots_idle
        )
        yield GaugeMetricFamily(
            "rower_slots_processing",
            "Busy llama.cpp slots, summed over agents",
            totals.slots_processing,
        )
        yield GaugeMetricFamily(
            "rower_requests_buffered",
            "Requests waiting in the buffer for a free slot",
            totals.requests_buffered,
        )
        yield GaugeMetricFamily(
            "rower_agents_registered",
            "Agents with an open status stream",
            totals.agents_registered,
        )
        yield CounterMetricFamily(
            "rower_upstream_quarantines",
            "Times an upstream was quarantined after refusing a connection",
            self.publisher.gate.fleet.quarantines,
        )
        yield from self._listener_families()
        yield from _model_families(view.models)
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "idle": GaugeMetricFamily(
                "rower_agent_slots_idle",
                "Idle slots of one agent's llama-server",
                labels=AGENT_LABELS,
            ),
            "processing": GaugeMetricFamily(
                "rower_agent_slots_processing",
                "Busy slots of one agent's llama-server",
                labels=AGENT_LABELS,
            ),
            "total": GaugeMetricFamily(
                "rower_agent_slots_total", "Slots of one agent's llama-server", labels=AGENT_LABELS
            ),
            "usable": GaugeMetricFamily(
                "rower_agent_usable",
                "1 when requests may be sent to the agent's llama-server (no issue, not stale, "
                "not quarantined), else 0",
                labels=AGENT_LABELS,
            ),
            "evaluated": CounterMetricFamily(
                "rower_agent_prompt_tokens_evaluated",
                "Prompt tokens the agent's llama-server computed for this balancer's requests "
                "(timings.prompt_n of its answers)",
                labels=AGENT_LABELS,
            ),
            "cached": CounterMetricFamily(
                "rower_agent_prompt_tokens_cached",
                "Prompt tokens the agent's llama-server reused from its prompt cache for them "
                "(timings.cache_n); reuse = cached / (cached + evaluated)",
                labels=AGENT_LABELS,
            ),
        }
        for agent in view.agents:
            status = agent.status
            labels = [agent.agent_id, status.agent_name or "", model_label(status.model or UNKNOWN)]
            total = status.slots_total or status.slots_idle + status.slots_processing
            families["idle"].add_metric(labels, status.slots_idle)
            families["processing"].add_metric(labels, status.slots_processing)
            families["total"].add_metric(labels, total)
            families["usable"].add_metric(labels, 1 if agent.is_usable else 0)
            families["evaluated"].add_metric(labels, agent.prompt_tokens_evaluated)
            families["cached"].add_metric(labels, agent.prompt_tokens_cached)
        yield from families.values()

    def _listener_families(self) -> Iterator[Metric]:
        connections = GaugeMetricFamily(
            "rower_client_connections",
            "Client connections open on a listener (agents' included on the management one)",
            labels=["listener"],
        )
        refusals = CounterMetricFamily(
            "rower_client_refusals",
            "Connections and requests a listener refused: malformed, framing, header_too_large, "
            "header_timeout, over_capacity",
            labels=["listener", "reason"],
        )
        for name, stats in self.listeners.items():
            connections.add_metric([name], stats.connections)
            for reason, count in sorted(stats.refused.items()):
                refusals.add_metric([name, reason], count)
        yield connections
        yield refusals


class PeerCollector(Collector):
    """What this balancer told the balancers following it, and heard from those it follows."""

    def __init__(self, feed: PlacementFeed, peers: Sequence[PeerFollower]) -> None:
        self.feed = feed
        self.peers = list(peers)

    def collect(self) -> Iterator[Metric]:
        """Yield the placement families (docs/routing.md, "Several balancers")."""
        feed = self.feed
        yield GaugeMetricFamily(
            "rower_placement_followers",
            "Balancers following this one's placements now",
            value=feed.followers,
        )
        yield CounterMetricFamily(
            "rower_placements_told",
            "Placements told to the balancers following this one",
            value=feed.published,
        )
        yield CounterMetricFamily(
            "rower_placement_followers_dropped",
            "Followers whose stream was ended because they fell behind",
            value=feed.dropped_followers,
        )
        connected = GaugeMetricFamily(
            "rower_peer_connected",
            "Whether this balancer follows a peer's placements now (1) or tries again (0)",
            labels=["peer"],
        )
        heard = CounterMetricFamily(
            "rower_peer_placements",
            "Placements heard from a peer: applied, or unknown_server (a server this balancer "
            "does not know)",
            labels=["peer", "outcome"],
        )
        refused = CounterMetricFamily(
            "rower_peer_refused_lines",
            "Lines from a peer that were not placements (each ended its stream)",
            labels=["peer"],
        )
        for peer in self.peers:
            name, counts = str(peer.peer), peer.counts
            connected.add_metric([name], 1 if counts.connected else 0)
            heard.add_metric([name, "applied"], counts.applied)
            heard.add_metric([name, "unknown_server"], counts.unknown_server)
            refused.add_metric([name], counts.refused_lines)
        yield connected
        yield heard
        yield refused


def _model_families(models: list[ModelSummary]) -> Iterator[Metric]:
    families = {
        "idle": GaugeMetricFamily(
            "rower_model_slots_idle",
            "Idle slots of the servers of one model (usable ones; a router's model that is not "
            "loaded has none)",
            labels=["model"],
        ),
        "processing": GaugeMetricFamily(
            "rower_model_slots_processing",
            "Busy slots of the servers of one model",
            labels=["model"],
        ),
        "total": GaugeMetricFamily(
            "rower_model_slots_total", "Slots of the servers of one model", labels=["model"]
        ),
        "buffered": GaugeMetricFamily(
            "rower_model_requests_buffered",
            "Requests waiting in one model's buffer: what an autoscaler starts a server of "
            "that model for (0 for a declared model with no server yet)",
            labels=["model"],
        ),
        "agents": GaugeMetricFamily(
            "rower_model_agents",
            "Servers of one model registered (a router's loaded models count one each)",
            labels=["model"],
        ),
    }
    for model in models:
        label = [model_label(model.model)]
        families["idle"].add_metric(label, model.slots_idle)
        families["processing"].add_metric(label, model.slots_processing)
        families["total"].add_metric(label, model.slots_total)
        families["buffered"].add_metric(label, model.requests_buffered)
        families["agents"].add_metric(label, model.agents)
    yield from families.values()


class BalancerMetrics:
    """The balancer's Prometheus registry; `observe` is the reverse proxy's outcome listener."""

    def __init__(
        self,
        publisher: FleetPublisher,
        *,
        listeners: Mapping[str, ListenerStats] | None = None,
        peers: Sequence[PeerFollower] = (),
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(FleetCollector(publisher, listeners))
        self.registry.register(PeerCollector(publisher.gate.placements, peers))
        self.fleet = publisher.gate.fleet
        self.requests = Counter(
            "rower_proxied_requests",
            "Requests answered by the reverse proxy, by path class and HTTP status",
            ["path", "status"],
            registry=self.registry,
        )
        self.buffer_wait = Histogram(
            "rower_buffer_wait_seconds",
            "Time an inference request waited for a free slot before it was dispatched",
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.time_to_first_byte = Histogram(
            "rower_time_to_first_byte_seconds",
            "Time from the request's arrival to llama-server's response headers, by path class",
            ["path"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.duration = Histogram(
            "rower_request_duration_seconds",
            "Time from the request's arrival to the end of its response, by path class",
            ["path"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.buffer_full = Counter(
            "rower_buffer_full_rejections",
            "Requests answered 429: the buffer was full or buffering is off",
            registry=self.registry,
        )
        self.buffer_timeouts = Counter(
            "rower_buffer_timeouts",
            "Requests answered 504: no slot became free within --buffered-request-timeout",
            registry=self.registry,
        )
        self.affinity = Counter(
            "rower_affinity_requests",
            "Requests routed with a prompt prefix (--routing cache-aware), by what the pick did: "
            "hit (to the server holding its longest head), hit_after_wait (there, after waiting "
            "for it), miss (no server had it), return (to where its conversation lived, which "
            "the memory had forgotten, at once or after waiting for it), spill_after_wait "
            "(waited for that server in vain), spill_busy / spill_load / spill_unusable (that "
            "server was full, too much busier than the least busy one, or not usable)",
            ["outcome"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "rower_upstream_errors",
            "Requests that failed at llama-server: refused, unreachable, or broken mid-response",
            registry=self.registry,
        )
        self.connections_reused = Counter(
            "rower_upstream_connections_reused",
            "Requests llama-server answered on a kept-alive connection (the rest opened one)",
            registry=self.registry,
        )
        self.retries = Counter(
            "rower_upstream_retries",
            "Requests sent again on a new connection because a kept-alive one failed before "
            "any byte of the answer (the server had closed it)",
            registry=self.registry,
        )
        self.model_requests = Counter(
            "rower_model_proxied_requests",
            "Inference requests answered by the reverse proxy, by model and HTTP status",
            ["model", "status"],
            registry=self.registry,
        )
        self.model_buffer_wait = Histogram(
            "rower_model_buffer_wait_seconds",
            "Time an inference request of one model waited for a free slot before dispatch",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.model_time_to_first_byte = Histogram(
            "rower_model_time_to_first_byte_seconds",
            "Time from an inference request's arrival to llama-server's response headers, by model",
            ["model"],
            buckets=SECONDS_BUCKETS,
            registry=self.registry,
        )
        self.client_disconnects = Counter(
            "rower_client_disconnects",
            "Requests whose client closed the connection before the answer was complete "
            "(waiting in the buffer or mid-response): not an upstream's failure",
            registry=self.registry,
        )

    def observe(self, outcome: ProxyOutcome) -> None:
        """Count one proxied request."""
        path = path_class(outcome.path)
        self.requests.labels(path, str(outcome.status)).inc()
        if outcome.dispatch is not None and outcome.dispatch.affinity is not None:
            self.affinity.labels(outcome.dispatch.affinity.value).inc()
        self.duration.labels(path).observe(outcome.seconds_total)
        if outcome.seconds_to_first_byte is not None:
            self.time_to_first_byte.labels(path).observe(outcome.seconds_to_first_byte)
        if takes_slot(outcome.path):
            self._observe_model(outcome)
            if outcome.upstream is not None:
                self.buffer_wait.observe(outcome.seconds_waiting)
        if outcome.connection_reused:
            self.connections_reused.inc()
        if outcome.retried:
            self.retries.inc()
        failure = outcome.failure
        if failure is Failure.BUFFER_FULL:
            self.buffer_full.inc()
        elif failure is Failure.BUFFER_TIMEOUT:
            self.buffer_timeouts.inc()
        elif failure in UPSTREAM_FAILURES:
            self.upstream_errors.inc()
        elif failure is Failure.CLIENT_DISCONNECTED:
            self.client_disconnects.inc()

    def _observe_model(self, outcome: ProxyOutcome) -> None:
        model = self.model_of(outcome)
        self.model_requests.labels(model, str(outcome.status)).inc()
        if outcome.upstream is not None:
            self.model_buffer_wait.labels(model).observe(outcome.seconds_waiting)
        if outcome.seconds_to_first_byte is not None:
            self.model_time_to_first_byte.labels(model).observe(outcome.seconds_to_first_byte)

    def model_of(self, outcome: ProxyOutcome) -> str:
        """The `model` label of an inference request: the model it was dispatched for, else
        the one its name reaches now, else `(unknown)`."""
        if outcome.dispatch is not None:
            return model_label(outcome.dispatch.model)
        # A 429, 504 or client gone before dispatch: its name resolved again (the fleet's
        # models only, whatever it sent).
        resolved = self.fleet.resolve(outcome.model)
        return model_label(resolved) if isinstance(resolved, str) else UNKNOWN_MODEL_LABEL

    def exposition(self) -> bytes:
        """The registry in Prometheus' text format."""
        return generate_latest(self.registry)

    async def handle(self, request: web.Request) -> web.Response:
        """`GET /api/v1/metrics` and `GET /metrics`."""
        return web.Response(
            body=self.exposition(), headers={"Content-Type": CONTENT_TYPE_PLAIN_0_0_4}
        )


def add_metrics_routes(app: web.Application, metrics: BalancerMetrics) -> None:
    """Serve `metrics` on the management application."""
    app.router.add_get("/api/v1/metrics", metrics.handle)
    app.router.add_get("/metrics", metrics.handle)
