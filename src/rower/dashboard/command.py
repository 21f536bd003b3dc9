"""`rower dashboard` command line (placeholder until the dashboard lands)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower dashboard`."""


def run(args: argparse.Namespace) -> int:
    """Run `rower dashboard`."""
    raise SystemExit("rower dashboard is not built yet")
