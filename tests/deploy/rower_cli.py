"""What `rower` accepts, for checking the command lines in deployment files.

Every deployment file (compose, Kubernetes, systemd, Dockerfile) hands `rower` flags and
`ROWER_*` variables. Rather than keep a list here that could drift, these helpers ask the real
parser: a command line passes only if `rower.cli.build_parser()` itself accepts it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
from collections.abc import Mapping, Sequence

from rower.cli import SUBCOMMANDS, build_parser, env_var_name

_COMPOSE_VARIABLE = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


def subcommand_parser(command: str) -> argparse.ArgumentParser:
    """The parser of `rower COMMAND`, with no `ROWER_*` variables applied."""
    parser = build_parser(environ={})
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return subparsers.choices[command]


def long_options(command: str) -> set[str]:
    """Every `--flag` that `rower COMMAND` knows."""
    return {
        option
        for action in subcommand_parser(command)._actions
        for option in action.option_strings
        if option.startswith("--")
    }


def environment_names(command: str) -> set[str]:
    """Every `ROWER_*` variable that `rower COMMAND` reads."""
    return {env_var_name(option) for option in long_options(command) - {"--help"}}


def check_command_line(argv: Sequence[str], environ: Mapping[str, str]) -> argparse.Namespace:
    """Parse `rower ARGV` with `environ` as the parser would; fail with argparse's message.

    Also fails on a `ROWER_*` variable that the subcommand does not read: `rower` ignores
    those, so a typo there would silently fall back to a default.
    """
    assert argv, "no rower subcommand"
    command = argv[0]
    assert command in SUBCOMMANDS, f"{command!r} is not a rower subcommand"
    unknown = {name for name in environ if name.startswith("ROWER_")} - environment_names(command)
    assert not unknown, f"rower {command} reads no {sorted(unknown)}"
    errors = io.StringIO()
    try:
        with contextlib.redirect_stderr(errors):
            return build_parser(environ=dict(environ)).parse_args(list(argv))
    except SystemExit:
        raise AssertionError(
            f"rower rejects {' '.join(argv)} with {dict(environ)}:\n{errors.getvalue()}"
        ) from None


def compose_interpolate(value: str) -> str:
    """Compose's `${NAME:-default}`: the default, as on a machine with no such variable."""
    return _COMPOSE_VARIABLE.sub(lambda match: match.group(2) or "", value)
