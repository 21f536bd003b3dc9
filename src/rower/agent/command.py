"""`rower agent` command line (placeholder until the agent lands)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower agent`."""


def run(args: argparse.Namespace) -> int:
    """Run `rower agent`."""
    raise SystemExit("rower agent is not built yet")
