"""The balancer's configuration, as parsed from flags and `ROWER_*` variables."""

from __future__ import annotations

from dataclasses import dataclass, field

from rower.addresses import Address
from rower.balancer.fleet import Routing
from rower.balancer.models import ModelRules
from rower.balancer.prefix_memory import DEFAULT_MAX_ENTRIES
from rower.balancer.upstream import SlotAccounting


@dataclass(frozen=True, slots=True)
class BalancerSettings:
    """Everything `rower balancer` can be told; durations in seconds."""

    management_addr: Address
    reverseproxy_addr: Address
    buffered_request_timeout: float = 10.0
    max_buffered_requests: int = 30
    management_dashboard_enable: bool = False
    metrics_endpoint_enable: bool = False
    management_cors_allowed_hosts: tuple[str, ...] = ()
    slots_endpoint_enable: bool = False
    rewrite_host_header: bool = False
    statsd_addr: Address | None = None
    statsd_prefix: str = "rower"
    statsd_reporting_interval: float = 10.0
    management_token: str | None = None
    slot_accounting: SlotAccounting = SlotAccounting.ROWER
    # Limits and shutdown (docs/reliability.md).
    shutdown_grace_period: float = 30.0
    max_request_body_bytes: int = 64 * 1024 * 1024
    max_header_bytes: int = 8190
    max_status_line_bytes: int = 1024 * 1024
    max_agents: int = 1024
    request_body_timeout: float = 30.0
    stream_flush_interval: float = 0.05
    """Seconds a stream's tokens may wait to be read together (`stream_pacing`; 0: never)."""
    # Routing (docs/routing.md).
    routing: Routing = Routing.CACHE_AWARE
    prompt_cache_contexts: int = 8
    prefix_memory_entries: int = DEFAULT_MAX_ENTRIES
    peer_balancer_addrs: tuple[Address, ...] = ()
    """Other balancers whose placements this one follows (`peers`)."""
    # Models (docs/models.md).
    models: ModelRules = field(default_factory=ModelRules)
    # Hostile clients and agents (docs/reliability.md).
    request_header_timeout: float = 10.0
    idle_connection_timeout: float = 20.0
    max_client_connections: int = 4096
    max_slots_per_agent: int = 1024
    management_token_guards_reads: bool = False
    # The access log (docs/observability.md): stderr, off, or a file path.
    access_log: str = "stderr"
    log_format: str = "text"
