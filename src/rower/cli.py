"""The `rower` command line: one subcommand per process, flags also read from `ROWER_*` variables.

Each subcommand lives in `rower.<name>.command` with two functions: `configure(parser)` adds its
flags, `run(args)` runs it and returns the exit status. Command modules import their heavy
dependencies inside `run`, so `rower sim` never pays for the terminal dashboard's imports.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar, cast

from rower import __version__
from rower.addresses import Address, AddressError

SUBCOMMANDS = {
    "agent": "runs next to one llama-server, polls it and streams its status to balancers",
    "balancer": "slot-aware reverse proxy and management server, in one process",
    "dashboard": "terminal dashboard of a running balancer",
    "sim": "a llama.cpp-compatible simulated llama-server, for demos, tests and benchmarks",
}

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


class Subcommand(Protocol):
    """What `rower.<name>.command` modules provide."""

    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def run(self, args: argparse.Namespace) -> int: ...


T = TypeVar("T")


def address(text: str) -> Address:
    """argparse type for `HOST:PORT` flags."""
    try:
        return Address.parse(text)
    except AddressError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def address_or_aws(text: str) -> Address:
    """argparse type for addresses that may use the `aws:metadata:local-ipv4` host."""
    try:
        return Address.parse(text, allow_aws_metadata=True)
    except AddressError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def milliseconds(text: str) -> int:
    """argparse type for durations, which are milliseconds as in Paddler 2.0."""
    if not text.isdigit() or int(text) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of milliseconds")
    return int(text)


def non_negative(text: str) -> int:
    """argparse type for counts that may be zero."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def positive(text: str) -> int:
    """argparse type for counts of at least one."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return int(text)


def model_name(text: str) -> str:
    """argparse type for model names: what clients send in `model`."""
    name = text.strip()
    if not name or len(name) > 256 or not name.isprintable():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a model name (1-256 printable characters)"
        )
    return name


def model_assignment(
    convert: Callable[[str], T], form: str = "MODEL=VALUE"
) -> Callable[[str], tuple[str, T]]:
    """argparse type for `MODEL=VALUE` flags (spelled `form` in errors), the value read by
    `convert`."""

    def parse(text: str) -> tuple[str, T]:
        name, sep, value = text.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"{text!r}: write {form}")
        return model_name(name), convert(value.strip())

    parse.__name__ = getattr(convert, "__name__", "value")
    return parse


def add_logging_flags(parser: argparse.ArgumentParser) -> None:
    """`--log-level` and `--log-format`, shared by every subcommand."""
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="least severe log level written to stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default="text",
        choices=["text", "json"],
        help="text for people, json (one object a line) for log collectors (default: text)",
    )


def env_var_name(option: str) -> str:
    """`--management-addr` -> `ROWER_MANAGEMENT_ADDR`."""
    return "ROWER_" + option.lstrip("-").upper().replace("-", "_")


def apply_environment(parser: argparse.ArgumentParser, environ: dict[str, str]) -> None:
    """Use `ROWER_<FLAG>` variables as defaults; a flag on the command line still wins.

    Repeatable flags take a comma-separated list; on/off flags take 1/0, true/false, yes/no.
    """
    for action in parser._actions:
        long_options = [o for o in action.option_strings if o.startswith("--")]
        if not long_options or action.dest in {"help", "version"}:
            continue
        value = next((environ[v] for v in map(env_var_name, long_options) if v in environ), None)
        if value is None:
            continue
        name = env_var_name(long_options[0])
        if isinstance(action, argparse._StoreTrueAction):
            lowered = value.strip().lower()
            if lowered not in _TRUE | _FALSE:
                parser.error(f"{name}={value!r}: use 1 or 0 (true/false, yes/no)")
            action.default = lowered in _TRUE
            continue
        convert = action.type if callable(action.type) else str
        try:
            if isinstance(action, argparse._AppendAction):
                action.default = [convert(part) for part in value.split(",") if part.strip()]
            else:
                action.default = convert(value)
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(f"{name}={value!r}: {error}")
        if action.choices is not None and action.default not in action.choices:
            parser.error(f"{name}={value!r}: choose from {', '.join(map(str, action.choices))}")
        action.required = False


def build_parser(
    environ: dict[str, str] | None = None, *, command: str | None = None
) -> argparse.ArgumentParser:
    """The whole `rower` parser, with every subcommand's flags.

    With `command`, only that subcommand reads `ROWER_*` variables: the same variable can mean
    another thing to another subcommand (`ROWER_MANAGEMENT_ADDR` lists several balancers for an
    agent, one address for a balancer) and must not fail the command that was not asked for.
    """
    environ = dict(os.environ) if environ is None else environ
    parser = argparse.ArgumentParser(
        prog="rower",
        description="Stateful, slot-aware load balancer for llama.cpp's llama-server. "
        "Every flag can also be set as ROWER_<FLAG> (e.g. ROWER_MANAGEMENT_ADDR).",
    )
    parser.add_argument("--version", action="version", version=f"rower {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, summary in SUBCOMMANDS.items():
        sub = commands.add_parser(name, help=summary, description=summary)
        module = load(name)
        module.configure(sub)
        add_logging_flags(sub)
        if command is None or command == name:
            apply_environment(sub, environ)
        sub.set_defaults(command_module=module)
    return parser


def load(name: str) -> Subcommand:
    """Import `rower.<name>.command`."""
    return cast(Subcommand, importlib.import_module(f"rower.{name}.command"))


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `rower` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    parser = build_parser(command=command)
    args = parser.parse_args(argv)
    module = cast(Subcommand, args.command_module)
    try:
        return module.run(args)
    except KeyboardInterrupt:
        return 130
