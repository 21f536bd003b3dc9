"""`rower sim` command line (placeholder until the sim lands)."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower sim`."""


def run(args: argparse.Namespace) -> int:
    """Run `rower sim`."""
    raise SystemExit("rower sim is not built yet")
