"""`rower balancer` command line."""

from __future__ import annotations

import argparse
import sys

from rower.cli import address, milliseconds, model_assignment, model_name, non_negative, positive


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower balancer`."""
    parser.add_argument(
        "--management-addr",
        type=address,
        required=True,
        metavar="HOST:PORT",
        help="where agents report and operators read the fleet (API, SSE, metrics, dashboard)",
    )
    parser.add_argument(
        "--reverseproxy-addr",
        type=address,
        required=True,
        metavar="HOST:PORT",
        help="the public side: the OpenAI / llama.cpp API, proxied to free slots",
    )
    parser.add_argument(
        "--management-dashboard-enable",
        action="store_true",
        help="serve the web dashboard at /dashboard on the management address",
    )
    parser.add_argument(
        "--metrics-endpoint-enable",
        action="store_true",
        help="serve Prometheus metrics at /api/v1/metrics and /metrics",
    )
    parser.add_argument(
        "--management-cors-allowed-host",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="exact origin allowed by CORS on the management API (repeatable)",
    )
    parser.add_argument(
        "--slots-endpoint-enable",
        action="store_true",
        help="let clients reach llama-server's /slots through the proxy (403 otherwise)",
    )
    parser.add_argument(
        "--rewrite-host-header",
        action="store_true",
        help="send the upstream's own address as Host: instead of the client's",
    )
    parser.add_argument(
        "--buffered-request-timeout",
        "--buffered-requests-timeout",
        type=milliseconds,
        default=10000,
        metavar="MS",
        help="longest wait for a free slot before answering 504 (default: 10000)",
    )
    parser.add_argument(
        "--max-buffered-requests",
        type=non_negative,
        default=30,
        metavar="N",
        help="most requests waiting for a slot; more get 429; 0 = never wait (default: 30)",
    )
    parser.add_argument(
        "--statsd-addr", type=address, metavar="HOST:PORT", help="send StatsD gauges over UDP"
    )
    parser.add_argument(
        "--statsd-prefix",
        default="rower",
        metavar="P",
        help="StatsD metric prefix (default: rower)",
    )
    parser.add_argument(
        "--statsd-reporting-interval",
        type=milliseconds,
        default=10000,
        metavar="MS",
        help="StatsD reporting period (default: 10000)",
    )
    parser.add_argument(
        "--management-token",
        metavar="TOKEN",
        help="shared secret agents must send (Authorization: Bearer TOKEN)",
    )
    parser.add_argument(
        "--shutdown-grace-period",
        type=milliseconds,
        default=30000,
        metavar="MS",
        help="on SIGTERM, how long streams in flight may run on before they are cut; waiting "
        "requests get 503 at once (default: 30000)",
    )
    parser.add_argument(
        "--max-request-body-bytes",
        type=positive,
        default=64 * 1024 * 1024,
        metavar="N",
        help="largest request body the proxy relays; larger ones get 413 (default: 67108864)",
    )
    parser.add_argument(
        "--max-header-bytes",
        type=positive,
        default=8190,
        metavar="N",
        help="longest request line or header field on both listeners; longer gets 431 "
        "(default: 8190)",
    )
    parser.add_argument(
        "--max-status-line-bytes",
        type=positive,
        default=1024 * 1024,
        metavar="N",
        help="longest NDJSON status line an agent may send; longer gets 413 and the stream "
        "is closed (default: 1048576)",
    )
    parser.add_argument(
        "--max-agents",
        type=positive,
        default=1024,
        metavar="N",
        help="most agents registered at once; a new one beyond gets 429 (default: 1024)",
    )
    parser.add_argument(
        "--request-body-timeout",
        type=milliseconds,
        default=30000,
        metavar="MS",
        help="longest time a client may take to send its whole request body; slower gets 408 "
        "(the body is read before a slot is taken) (default: 30000)",
    )
    parser.add_argument(
        "--stream-flush-interval",
        type=non_negative,
        default=50,
        metavar="MS",
        help="read a stream's tokens from llama-server at most once per MS and write them to "
        "the client together (less balancer CPU per token); the first token after a quiet MS "
        "and the end of the answer never wait; 0: each token as it comes (default: 50)",
    )
    parser.add_argument(
        "--routing",
        choices=("cache-aware", "least-busy"),
        default="cache-aware",
        help="cache-aware: a conversation goes back to the server holding its prefix while that "
        "server has a free slot; least-busy: fewest busy slots first (default: cache-aware)",
    )
    parser.add_argument(
        "--prompt-cache-contexts",
        type=positive,
        default=8,
        metavar="N",
        help="slot contexts' worth of prompts one llama-server is assumed to keep, in its slots "
        "and its --cache-ram; bounds what the balancer remembers sending it (default: 8)",
    )
    parser.add_argument(
        "--prefix-memory-entries",
        type=positive,
        default=200_000,
        metavar="N",
        help="most prefix entries remembered over the whole fleet, one per conversation and server "
        "(default: 200000)",
    )
    parser.add_argument(
        "--peer-balancer-addr",
        dest="peer_balancer_addrs",
        action="append",
        default=[],
        type=address,
        metavar="HOST:PORT",
        help="the management address of another balancer in front of the same agents: follow "
        "what it sends where, so that a conversation whose turns come through either finds "
        "one server (repeatable; give each balancer the others)",
    )
    parser.add_argument(
        "--request-header-timeout",
        type=milliseconds,
        default=10000,
        metavar="MS",
        help="longest time from a request's first byte to the end of its headers, on both "
        "listeners; slower gets 408 and the connection is closed (default: 10000)",
    )
    parser.add_argument(
        "--idle-connection-timeout",
        type=milliseconds,
        default=20000,
        metavar="MS",
        help="a client connection with no request under way is closed after this long, on "
        "both listeners (default: 20000)",
    )
    parser.add_argument(
        "--max-client-connections",
        type=positive,
        default=4096,
        metavar="N",
        help="most open connections on the reverse-proxy listener (the management listener: N "
        "plus --max-agents); one more gets 503 and is closed (default: 4096)",
    )
    parser.add_argument(
        "--max-slots-per-agent",
        type=positive,
        default=1024,
        metavar="N",
        help="most slots one agent may report; a status line with more gets 400 (default: 1024)",
    )
    parser.add_argument(
        "--management-token-guards-reads",
        action="store_true",
        help="the management token is needed to read the fleet too (/api/v1/agents, its "
        "stream, metrics); /health and the dashboard's page stay open",
    )
    parser.add_argument(
        "--access-log",
        default="stderr",
        metavar="stderr|off|FILE",
        help="one line per proxied request, in --log-format, to stderr (with the other logs), "
        "to FILE (appended; reopened when moved), or off (default: stderr)",
    )
    parser.add_argument(
        "--model",
        dest="models",
        action="append",
        default=[],
        type=model_name,
        metavar="NAME",
        help="a model the fleet serves even before a server of it registers: its requests wait "
        "in its own buffer (scale from zero per model) (repeatable)",
    )
    parser.add_argument(
        "--default-model",
        type=model_name,
        metavar="NAME",
        help="the model of requests that name none, in a fleet of several models (without it "
        "they get 400)",
    )
    parser.add_argument(
        "--model-alias",
        action="append",
        default=[],
        type=model_assignment(model_name, "CLIENT=MODEL"),
        metavar="CLIENT=MODEL",
        help="requests naming CLIENT go to MODEL (a model id or alias of the fleet) (repeatable)",
    )
    parser.add_argument(
        "--model-max-buffered-requests",
        action="append",
        default=[],
        type=model_assignment(non_negative, "MODEL=N"),
        metavar="MODEL=N",
        help="--max-buffered-requests for one model (repeatable)",
    )
    parser.add_argument(
        "--model-buffered-request-timeout",
        action="append",
        default=[],
        type=model_assignment(milliseconds, "MODEL=MS"),
        metavar="MODEL=MS",
        help="--buffered-request-timeout for one model (repeatable)",
    )
    parser.add_argument(
        "--slot-accounting",
        choices=("rower", "paddler"),
        default="rower",
        help=argparse.SUPPRESS,  # benchmarks only: paddler = Paddler 1.x's free-slot count
    )


def run(args: argparse.Namespace) -> int:
    """Run `rower balancer`."""
    from rower.balancer.fleet import Routing
    from rower.balancer.models import ModelRules
    from rower.balancer.own_listeners import OwnListeners
    from rower.balancer.service import serve
    from rower.balancer.settings import BalancerSettings
    from rower.balancer.upstream import SlotAccounting
    from rower.logs import configure_logging
    from rower.runtime import run_async

    configure_logging(args.log_level, args.log_format)
    settings = BalancerSettings(
        management_addr=args.management_addr,
        reverseproxy_addr=args.reverseproxy_addr,
        buffered_request_timeout=args.buffered_request_timeout / 1000,
        max_buffered_requests=args.max_buffered_requests,
        management_dashboard_enable=args.management_dashboard_enable,
        metrics_endpoint_enable=args.metrics_endpoint_enable,
        management_cors_allowed_hosts=tuple(args.management_cors_allowed_host),
        slots_endpoint_enable=args.slots_endpoint_enable,
        rewrite_host_header=args.rewrite_host_header,
        statsd_addr=args.statsd_addr,
        statsd_prefix=args.statsd_prefix,
        statsd_reporting_interval=args.statsd_reporting_interval / 1000,
        management_token=args.management_token,
        slot_accounting=SlotAccounting(args.slot_accounting),
        shutdown_grace_period=args.shutdown_grace_period / 1000,
        max_request_body_bytes=args.max_request_body_bytes,
        max_header_bytes=args.max_header_bytes,
        max_status_line_bytes=args.max_status_line_bytes,
        max_agents=args.max_agents,
        request_body_timeout=args.request_body_timeout / 1000,
        stream_flush_interval=args.stream_flush_interval / 1000,
        routing=Routing(args.routing),
        prompt_cache_contexts=args.prompt_cache_contexts,
        prefix_memory_entries=args.prefix_memory_entries,
        peer_balancer_addrs=tuple(dict.fromkeys(args.peer_balancer_addrs)),
        models=ModelRules(
            declared=tuple(dict.fromkeys(args.models)),
            default=args.default_model,
            renames=dict(args.model_alias),
            max_buffered=dict(args.model_max_buffered_requests),
            buffer_timeout={m: ms / 1000 for m, ms in args.model_buffered_request_timeout},
        ),
        request_header_timeout=args.request_header_timeout / 1000,
        idle_connection_timeout=args.idle_connection_timeout / 1000,
        max_client_connections=args.max_client_connections,
        max_slots_per_agent=args.max_slots_per_agent,
        management_token_guards_reads=args.management_token_guards_reads,
        access_log=args.access_log,
        log_format=args.log_format,
    )
    if settings.management_token_guards_reads and settings.management_token is None:
        print(
            "rower balancer: --management-token-guards-reads needs --management-token: "
            "give both, or leave reads open",
            file=sys.stderr,
        )
        return 2
    own = OwnListeners(
        {
            "management listener": settings.management_addr,
            "reverse-proxy listener": settings.reverseproxy_addr,
        }
    )
    for peer in settings.peer_balancer_addrs:
        mine = peer == settings.management_addr or (
            peer.ip is not None and own.owner_of_ip(peer.ip, peer.port)
        )
        if mine:
            print(
                f"rower balancer: --peer-balancer-addr {peer} is this balancer's own listener; "
                "give the management addresses of the other balancers",
                file=sys.stderr,
            )
            return 2
    return run_async(serve(settings))
