"""`rower dashboard` command line."""

from __future__ import annotations

import argparse

from rower.cli import address


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower dashboard`."""
    parser.add_argument(
        "--management-addr",
        type=address,
        required=True,
        metavar="HOST:PORT",
        help="the balancer's management address (its --management-addr)",
    )
    parser.add_argument(
        "--management-token",
        default=None,
        metavar="TOKEN",
        help="the balancer's management token, sent as 'Authorization: Bearer TOKEN'; needed "
        "when the balancer runs with --management-token-guards-reads",
    )


def run(args: argparse.Namespace) -> int:
    """Run `rower dashboard` until q or Esc."""
    from rower.dashboard.app import DashboardApp

    DashboardApp(str(args.management_addr), token=args.management_token).run()
    return 0
