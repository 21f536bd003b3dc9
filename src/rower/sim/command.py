"""`rower sim` command line: a llama.cpp-compatible simulated llama-server."""

from __future__ import annotations

import argparse

from rower.cli import address, non_negative, positive


def _speed(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of tokens per second")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number from 0 to 1")
    return value


def _factor(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number >= 0")
    return value


def _model_name(text: str) -> str:
    if not text.strip() or len(text) > 256:
        raise argparse.ArgumentTypeError(f"{text!r} is not a model name (1 to 256 characters)")
    return text


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the flags of `rower sim`."""
    parser.add_argument(
        "--addr",
        type=address,
        default=address("127.0.0.1:8080"),
        metavar="HOST:PORT",
        help="where to listen (default: 127.0.0.1:8080)",
    )
    parser.add_argument(
        "--slots", type=positive, default=4, metavar="N", help="number of slots (default: 4)"
    )
    parser.add_argument(
        "--model",
        type=_model_name,
        default="sim",
        metavar="NAME",
        help="model name it reports (default: sim)",
    )
    parser.add_argument(
        "--alias",
        action="append",
        type=_model_name,
        default=[],
        metavar="NAME",
        help="another name of the model, listed in /v1/models aliases as llama-server's "
        "--alias lists them; repeat for several",
    )
    parser.add_argument(
        "--ctx-size",
        type=positive,
        default=4096,
        metavar="N",
        help="context size of each slot, in tokens (default: 4096)",
    )
    parser.add_argument(
        "--n-predict",
        type=non_negative,
        default=16,
        metavar="N",
        help="tokens generated when a request sets neither n_predict nor max_tokens (default: 16)",
    )
    parser.add_argument(
        "--prefill-tokens-per-second",
        type=_speed,
        default=2000.0,
        metavar="X",
        help="prompt evaluation speed of a slot (default: 2000)",
    )
    parser.add_argument(
        "--decode-tokens-per-second",
        type=_speed,
        default=50.0,
        metavar="Y",
        help="generation speed of a slot while it is the only busy one (default: 50)",
    )
    parser.add_argument(
        "--decode-slowdown",
        type=_factor,
        default=0.0,
        metavar="F",
        help="each slot decodes at Y / (1 + F * (busy slots - 1)), as a GPU slows with batch "
        "size (default: 0, slots are independent)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        metavar="KEY",
        help="require `Authorization: Bearer KEY` on every endpoint but /health",
    )
    parser.add_argument(
        "--loading-ms",
        type=non_negative,
        default=0,
        metavar="MS",
        help="answer 503 'Loading model' on every endpoint for this long after start (default: 0)",
    )
    parser.add_argument(
        "--cache-ram-tokens",
        type=non_negative,
        default=0,
        metavar="N",
        help="host-RAM prompt cache of at most N tokens, as llama-server's --cache-ram "
        "(MiB there: N = MiB x 2^20 / the model's KV bytes per token); 0 = none (default: 0)",
    )
    parser.add_argument(
        "--metrics",
        action="store_true",
        help="serve Prometheus text at /metrics (else 501, as llama-server without --metrics)",
    )
    faults = parser.add_argument_group("fault switches")
    faults.add_argument(
        "--no-slots",
        action="store_true",
        help="disable /slots: 501, as llama-server started with --no-slots",
    )
    faults.add_argument(
        "--hang",
        action="store_true",
        help="inference requests take a slot and never get an answer until the client "
        "goes away; other endpoints still answer",
    )
    faults.add_argument(
        "--slots-delay-ms",
        type=non_negative,
        default=0,
        metavar="MS",
        help="/slots waits this long before answering (default: 0)",
    )
    faults.add_argument(
        "--fail-rate",
        type=_fraction,
        default=0.0,
        metavar="P",
        help="fraction of inference requests answered with 500 at once (default: 0)",
    )


def run(args: argparse.Namespace) -> int:
    """Run `rower sim`."""
    import asyncio

    from rower.logs import configure_logging
    from rower.sim.responses import Identity
    from rower.sim.server import Faults, SimConfig, serve
    from rower.sim.timing import Speed

    configure_logging(args.log_level, args.log_format)
    config = SimConfig(
        identity=Identity(
            model=args.model,
            n_ctx=args.ctx_size,
            total_slots=args.slots,
            aliases=tuple(args.alias),
        ),
        speed=Speed(
            prefill_tokens_per_second=args.prefill_tokens_per_second,
            decode_tokens_per_second=args.decode_tokens_per_second,
            decode_slowdown=args.decode_slowdown,
        ),
        api_key=args.api_key,
        loading_seconds=args.loading_ms / 1000,
        default_n_predict=args.n_predict,
        cache_ram_tokens=args.cache_ram_tokens,
        metrics=args.metrics,
        faults=Faults(
            no_slots=args.no_slots,
            hang=args.hang,
            slots_delay=args.slots_delay_ms / 1000,
            fail_rate=args.fail_rate,
        ),
    )
    try:
        import uvloop
    except ImportError:
        asyncio.run(serve(config, args.addr))
    else:
        uvloop.run(serve(config, args.addr))
    return 0
