"""`rower balancer` command line (placeholder until the balancer lands)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower balancer`."""


def run(args: argparse.Namespace) -> int:
    """Run `rower balancer`."""
    raise SystemExit("rower balancer is not built yet")
