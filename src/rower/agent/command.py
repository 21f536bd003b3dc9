"""`rower agent` command line: flags, the EC2 address lookup, the event loop and signals."""

from __future__ import annotations

import argparse

from rower.cli import address, address_or_aws, milliseconds
from rower.status import MAX_INTERVAL_MS


def interval(text: str) -> int:
    """argparse type for `--monitoring-interval`: at most what a balancer accepts."""
    value = milliseconds(text)
    if value > MAX_INTERVAL_MS:
        raise argparse.ArgumentTypeError(
            f"{value} ms is over {MAX_INTERVAL_MS} ms, the longest interval a balancer accepts"
        )
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower agent`."""
    parser.add_argument(
        "--management-addr",
        action="append",
        type=address,
        required=True,
        metavar="HOST:PORT",
        help="balancer to report to; repeat (or comma-separate in ROWER_MANAGEMENT_ADDR) "
        "to report to several",
    )
    parser.add_argument(
        "--local-llamacpp-addr",
        type=address,
        required=True,
        metavar="HOST:PORT",
        help="where this agent reaches llama-server",
    )
    parser.add_argument(
        "--external-llamacpp-addr",
        type=address_or_aws,
        default=None,
        metavar="HOST:PORT",
        help="where balancers reach llama-server (default: the local address); the host "
        "aws:metadata:local-ipv4 is replaced by the EC2 instance's private IPv4 at start",
    )
    parser.add_argument(
        "--llamacpp-api-key",
        "--local-llamacpp-api-key",
        default=None,
        metavar="KEY",
        help="sent to llama-server as 'Authorization: Bearer KEY'",
    )
    parser.add_argument("--name", default=None, metavar="NAME", help="display name")
    parser.add_argument(
        "--monitoring-interval",
        type=interval,
        default=1000,
        metavar="MS",
        help="milliseconds between two polls of llama-server (default: 1000)",
    )
    parser.add_argument(
        "--max-drain-time",
        type=milliseconds,
        default=30000,
        metavar="MS",
        help="on SIGTERM, report draining and wait this long at most for llama-server's "
        "slots to go idle before leaving; a second signal leaves at once (default: 30000)",
    )
    parser.add_argument(
        "--management-token",
        default=None,
        metavar="TOKEN",
        help="shared secret sent to balancers as 'Authorization: Bearer TOKEN'",
    )


def run(args: argparse.Namespace) -> int:
    """Run `rower agent` until SIGTERM or SIGINT; returns the exit status."""
    import asyncio
    import logging

    from rower.logs import configure_logging

    configure_logging(args.log_level, args.log_format)
    loop_factory = None
    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is not built for every platform
        logging.getLogger(__name__).debug("uvloop not available, using asyncio's loop")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(_main(args))


async def _main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal

    from rower.addresses import Address, AddressError
    from rower.agent.agent import Agent, AgentConfig
    from rower.agent.aws_metadata import AwsMetadataError, fetch_local_ipv4

    logger = logging.getLogger("rower.agent")
    local: Address = args.local_llamacpp_addr
    external: Address = args.external_llamacpp_addr or local
    if external.is_aws_metadata:
        try:
            # Through the one parser: what the metadata service says must be an address too.
            external = Address.parse(f"{await fetch_local_ipv4()}:{external.port}")
        except (AwsMetadataError, AddressError) as error:
            logger.error("cannot resolve --external-llamacpp-addr: %s", error)
            return 2
        logger.info("EC2 metadata: this instance's private IPv4 is %s", external.host)
    if external.is_unspecified:
        logger.error(
            "%s is where llama-server listens on every address, not one a balancer can reach "
            "(balancers refuse it): give --external-llamacpp-addr HOST:PORT",
            external,
        )
        return 2

    agent = Agent(
        AgentConfig(
            management_addrs=args.management_addr,
            local_llamacpp_addr=local,
            external_llamacpp_addr=external,
            llamacpp_api_key=args.llamacpp_api_key or None,
            name=args.name or None,
            monitoring_interval_ms=args.monitoring_interval,
            management_token=args.management_token or None,
            max_drain_time=args.max_drain_time / 1000,
        )
    )
    stop = asyncio.Event()
    hurry = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal)
    await agent.run(stop, hurry)
    return 0
