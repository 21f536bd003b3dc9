"""Scenario 7: a burst of requests for one model and the time to first token of another.

Two models, two `rower sim` servers of 4 slots each per model (each model's servers in their own
process, as separate machines would be), one Rower balancer declaring both (`--model`). Model B
gets streamed `/completion` requests as a Poisson process at half its servers' capacity; in the
"burst" phase, model A also gets a burst of many times its slots at once, a quarter into the
phase. Both phases send B the same arrivals (same seed), one after the other on the same
servers and balancer: B's TTFT alone and during A's burst, same run.

The control is the same fleet where every server names one model (one pool, one buffer): the
same requests (they still name A or B; a one-model fleet takes any name), so B waits behind A's
burst. It shows the burst is big enough to matter, and what one buffer per model removes.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench import procs
from bench.scheduling import (
    Lengths,
    Policy,
    Upstream,
    get_json,
    percentile,
    poisson_schedule,
    prompt_text,
    start_rowers,
    wait_idle,
)

MODELS = ("alpha", "beta")
"""A (the bursting model) and B (the measured one)."""
SERVERS_PER_MODEL = 2
SLOTS = 4
DECODE = 40.0
"""Tokens a second per slot (no slowdown with more busy slots: each model's own work)."""
PREFILL = 2000.0
PROMPT = Lengths(median=100, sigma=0.5, low=16, high=400)
GENERATION = Lengths(median=32, sigma=0.5, low=8, high=96)
B_LOAD = 0.5
"""B's arrival rate, as a share of its servers' capacity."""
BURST_AT = 0.25
"""When A's burst arrives, as a share of the phase."""
FLEETS = {
    "per model": "each server names its model; the balancer keeps one buffer per model",
    "one pool (control)": "every server names the same model: one buffer for all requests",
}
PHASES = ("alone", "burst")


@dataclass(frozen=True)
class Shape:
    """How long a phase lasts (seconds), how big A's burst is (requests), how many repeats."""

    duration: float
    burst: int
    repeats: int


def shape(quick: bool) -> Shape:
    return Shape(duration=5.0, burst=32, repeats=1) if quick else Shape(20.0, 64, 3)


def capacity() -> float:
    """Requests per second one model's servers complete with every slot busy."""
    service = PROMPT.median / PREFILL + GENERATION.median * 1.13 / DECODE
    # 1.13: the mean of a log-normal of sigma 0.5 over its median.
    return SERVERS_PER_MODEL * SLOTS / service


def schedule(phase: str, seed: int, shape: Shape) -> list[dict[str, Any]]:
    """One phase's requests, sorted by arrival, each with the model it names."""
    b = poisson_schedule(
        rate=B_LOAD * capacity(),
        duration=shape.duration,
        seed=seed,
        prompt=PROMPT,
        generation=GENERATION,
        extra={"model": MODELS[1]},
    )
    requests = [{**r, "model": MODELS[1]} for r in b]
    if phase == "burst":
        rng = random.Random(seed + 1)
        at = BURST_AT * shape.duration
        for _ in range(shape.burst):
            body = {
                "prompt": prompt_text(rng, PROMPT.sample(rng)),
                "n_predict": GENERATION.sample(rng),
                "stream": True,
                "model": MODELS[0],
            }
            requests.append({"at": at, "body": body, "model": MODELS[0]})
    return sorted(requests, key=lambda r: r["at"])


def sim_spec(fleet: str) -> dict[str, list[dict[str, Any]]]:
    """Each model's servers, for its own `bench.fleethost` process."""
    return {
        model: [
            {
                "port": procs.free_port(),
                "slots": SLOTS,
                "decode": DECODE,
                "prefill": PREFILL,
                "model": model if fleet == "per model" else "shared",
            }
            for _ in range(SERVERS_PER_MODEL)
        ]
        for model in MODELS
    }


def run_phase(
    runner: procs.Procs, url: str, requests: list[dict[str, Any]], work: Path, shape: Shape
) -> dict[str, Any]:
    """Send one phase's requests (open loop) and split what the clients saw by model."""
    path = work / f"phase-{time.monotonic_ns()}.json"
    deadline = shape.duration + 60.0
    plan = {"url": url + "/completion", "deadline": deadline, "requests": requests}
    path.write_text(json.dumps(plan))
    out = path.with_suffix(".out.json")
    loadgen = runner.python("loadgen", "bench.loadgen", "open", str(path), str(out))
    try:
        loadgen.wait(deadline + 15)
    finally:
        runner.stop(loadgen)
    records = json.loads(out.read_text())["records"] if out.exists() else []
    found: dict[str, Any] = {"not_sent": len(requests) - len(records)}
    for model in MODELS:
        mine = [rec for rec, req in zip(records, requests, strict=False) if req["model"] == model]
        ok = [r for r in mine if r["status"] == 200 and r["error"] is None and r["ttft"]]
        ttft = [r["ttft"] for r in ok]
        found[model] = {
            "requests": len(mine),
            "errors": len(mine) - len(ok),
            "ttft_p50": percentile(ttft, 0.5),
            "ttft_p95": percentile(ttft, 0.95),
            "ttft_p99": percentile(ttft, 0.99),
            "ttft_max": max(ttft, default=None),
            "points": [(r["due"], r["ttft"]) for r in ok],
        }
    return found


def run_fleet(fleet: str, shape: Shape, work: Path) -> list[dict[str, Any]]:
    """Every repeat's two phases on one fleet (servers and balancer started once)."""
    spec = sim_spec(fleet)
    upstreams = [
        Upstream(f"127.0.0.1:{s['port']}", s["slots"]) for sims in spec.values() for s in sims
    ]
    declared = ("--model", MODELS[0], "--model", MODELS[1]) if fleet == "per model" else ()
    runs = []
    with procs.Procs(work / "logs") as runner:
        for model, sims in spec.items():
            spec_path = work / f"sims-{model}-{sims[0]['port']}.json"
            spec_path.write_text(json.dumps({"sims": sims}))
            host = runner.python(f"sims-{model}", "bench.fleethost", str(spec_path))
            for s in sims:
                procs.wait_port(s["port"], proc=host)
        (front,) = start_rowers(
            runner, [Policy("Rower", "rower", interval_ms=1000)], upstreams, work, extra=declared
        )

        def activity() -> dict[str, float]:
            total = {"busy": 0.0, "waiting": 0.0}
            for sims in spec.values():
                for s in sims:
                    sim = get_json(f"http://127.0.0.1:{s['port']}/props")["rower_sim"]
                    total["busy"] += sim["slots_processing"]
                    total["waiting"] += sim["requests_waiting"]
            return total

        for repeat in range(shape.repeats):
            pair = []
            for phase in PHASES:
                result = run_phase(
                    runner, front.url, schedule(phase, 7 + repeat, shape), work, shape
                )
                wait_idle(activity)
                result.update(fleet=fleet, phase=phase, repeat=repeat)
                pair.append(result)
            add_window(pair, shape)
            for result in pair:
                print(_line(result), flush=True)
            runs += pair
    return runs


def add_window(pair: list[dict[str, Any]], shape: Shape) -> None:
    """B's TTFT over the burst's window in both phases: from A's burst until its last request
    got its first token (the same arrivals of B, with and without the burst).

    The arrivals are the same, so each request of B during the burst has its twin alone (same
    time, same prompt): `paired_p50`/`paired_p95` are the quantiles of TTFT during / alone over
    those pairs, which leaves out what the prompts' lengths do to TTFT.
    """
    alone, burst = (pair[PHASES.index(phase)] for phase in PHASES)
    start = BURST_AT * shape.duration
    end = start + (burst[MODELS[0]]["ttft_max"] or 0.0)
    for result in pair:
        ttft = [t for due, t in result[MODELS[1]]["points"] if start <= due <= end]
        result["window"] = [start, end]
        result[MODELS[1]].update(
            window_requests=len(ttft),
            window_ttft_p50=percentile(ttft, 0.5),
            window_ttft_p95=percentile(ttft, 0.95),
        )
    twins = {round(due, 6): t for due, t in alone[MODELS[1]]["points"]}
    paired = [
        t / twins[round(due, 6)]
        for due, t in burst[MODELS[1]]["points"]
        if start <= due <= end and round(due, 6) in twins
    ]
    burst[MODELS[1]].update(paired_p50=percentile(paired, 0.5), paired_p95=percentile(paired, 0.95))


MEDIAN_KEYS = (
    "requests",
    "errors",
    "ttft_p50",
    "ttft_p95",
    "ttft_p99",
    "ttft_max",
    "window_requests",
    "window_ttft_p50",
    "window_ttft_p95",
    "paired_p50",
    "paired_p95",
)


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (fleet, phase): medians over repeats; per fleet, B's burst / alone ratios."""
    rows = []
    for fleet in dict.fromkeys(r["fleet"] for r in runs):
        alone = [r for r in runs if r["fleet"] == fleet and r["phase"] == "alone"]
        burst = [r for r in runs if r["fleet"] == fleet and r["phase"] == "burst"]
        ratios: dict[str, list[float]] = {
            key: [] for key in ("ttft_p50", "ttft_p95", "window_ttft_p50", "window_ttft_p95")
        }
        for before, during in zip(alone, burst, strict=True):
            for key, values in ratios.items():
                if before[MODELS[1]][key] and during[MODELS[1]][key] is not None:
                    values.append(during[MODELS[1]][key] / before[MODELS[1]][key])
        for phase, mine in (("alone", alone), ("burst", burst)):
            row: dict[str, Any] = {"fleet": fleet, "phase": phase, "repeats": len(mine)}
            for model in MODELS:
                for key in MEDIAN_KEYS:
                    values = [r[model][key] for r in mine if r[model].get(key) is not None]
                    row[f"{model}_{key}"] = statistics.median(values) if values else None
            if phase == "burst":
                for key, values in ratios.items():
                    row[f"ratio_{key}"] = statistics.median(values) if values else None
            rows.append(row)
    return rows


def run(
    out: Path,
    *,
    quick: bool = False,
    duration: float | None = None,
    burst: int | None = None,
    repeats: int | None = None,
    fleets: tuple[str, ...] = tuple(FLEETS),
) -> dict[str, Any]:
    """Both fleets, every repeat; writes models.json."""
    chosen = shape(quick)
    chosen = Shape(duration or chosen.duration, burst or chosen.burst, repeats or chosen.repeats)
    work = out / "work" / "models"
    work.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runs = [r for fleet in fleets for r in run_fleet(fleet, chosen, work)]
    results = {
        "scenario": "models",
        "models": MODELS,
        "servers_per_model": SERVERS_PER_MODEL,
        "slots": SLOTS,
        "decode": DECODE,
        "prefill": PREFILL,
        "prompt": asdict(PROMPT),
        "generation": asdict(GENERATION),
        "capacity_rps": capacity(),
        "b_load": B_LOAD,
        "burst_at": BURST_AT,
        "shape": asdict(chosen),
        "fleets": {name: FLEETS[name] for name in fleets},
        "seconds": time.monotonic() - started,
        "runs": runs,
        "medians": medians(runs),
    }
    (out / "models.json").write_text(json.dumps(results, indent=1))
    return results


def _line(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    a, b = result[MODELS[0]], result[MODELS[1]]
    return (
        f"  #{result['repeat']} {result['fleet']:<20} {result['phase']:<6} B: {b['requests']} req, "
        f"ttft p50 {ms(b['ttft_p50'])} p95 {ms(b['ttft_p95'])} ms, errors {b['errors']}; "
        f"A: {a['requests']} req, ttft p50 {ms(a['ttft_p50'])} p95 {ms(a['ttft_p95'])} ms, "
        f"errors {a['errors']}"
    )
