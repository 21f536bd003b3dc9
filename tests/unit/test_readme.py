"""The README stays true: every flag of every command is documented there."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from rower.cli import SUBCOMMANDS, build_parser

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def documented_flags(command: str) -> list[str]:
    parser = build_parser({}, command=command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[
        command
    ]
    return [
        option
        for action in sub._actions
        if action.help != argparse.SUPPRESS
        for option in action.option_strings
        if option.startswith("--") and option != "--help"
    ]


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_flag_is_in_the_readme(command: str) -> None:
    assert f"rower {command}" in README
    missing = [flag for flag in documented_flags(command) if f"`{flag}" not in README]
    assert not missing, f"README does not document {missing} of rower {command}"


def test_readme_names_the_ci_command() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text().splitlines()[-1]
    assert ci.strip() in README
