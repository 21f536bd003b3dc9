"""Scenario 1: scheduling on a simulated fleet, where timing is controlled.

8 `rower sim` servers of 4 slots (five fast, three half as fast), per-slot decoding that slows
as more slots are busy (`--decode-slowdown`), log-normal prompt and generation lengths, streamed
`/completion` requests arriving as a Poisson process at 50/80/95/110% of the fleet's capacity.
Every policy sees the same arrivals. The sims count requests that found no free slot and had to
wait inside the server ("deferred"): that is over-dispatch.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from bench import procs
from bench.scheduling import (
    SIM_POLICIES,
    Lengths,
    Upstream,
    available,
    get_json,
    poisson_schedule,
    sweep,
)

SLOTS = 4
SLOWDOWN = 0.15
PROMPT = Lengths(median=120, sigma=0.8, low=8, high=2000)
GENERATION = Lengths(median=30, sigma=0.9, low=4, high=200)


def fleet_spec(count: int) -> list[dict[str, Any]]:
    """Servers: the last three of eight (3/8 of any count) run at half speed."""
    slow = round(count * 3 / 8)
    return [
        {
            "port": procs.free_port(),
            "slots": SLOTS,
            "decode": 30.0 if index >= count - slow else 60.0,
            "prefill": 1000.0 if index >= count - slow else 2000.0,
            "slowdown": SLOWDOWN,
        }
        for index in range(count)
    ]


def capacity(spec: list[dict[str, Any]], samples: int = 20000) -> float:
    """Requests per second the fleet completes with every slot busy, for this length mix."""
    rng = random.Random(1)
    prompts = [PROMPT.sample(rng) for _ in range(samples)]
    gens = [GENERATION.sample(rng) for _ in range(samples)]
    mean_prompt = sum(prompts) / samples
    mean_gen = sum(gens) / samples
    total = 0.0
    for server in spec:
        step = (1 + server["slowdown"] * (server["slots"] - 1)) / server["decode"]
        service = mean_prompt / server["prefill"] + mean_gen * step
        total += server["slots"] / service
    return total


def run(
    out: Path,
    *,
    quick: bool = False,
    servers: int = 8,
    loads: tuple[float, ...] | None = None,
    duration: float | None = None,
    policy_kinds: set[str] | None = None,
) -> dict[str, Any]:
    """Run every policy at every load; returns (and writes) the results."""
    loads = loads or ((0.8, 1.1) if quick else (0.5, 0.8, 0.95, 1.1))
    duration = duration or (4.0 if quick else 10.0)
    policies = [p for p in SIM_POLICIES if available(p, policy_kinds)]
    spec = fleet_spec(servers)
    cap = capacity(spec)
    work = out / "work" / "sim"
    work.mkdir(parents=True, exist_ok=True)
    (work / "fleet.json").write_text(json.dumps({"sims": spec}))
    upstreams = [Upstream(f"127.0.0.1:{s['port']}", s["slots"]) for s in spec]
    with procs.Procs(work / "logs") as runner:
        host = runner.python("sims", "bench.fleethost", str(work / "fleet.json"))
        for s in spec:
            procs.wait_port(s["port"], proc=host)

        def counters() -> dict[str, float]:
            total = {"deferred": 0.0, "busy": 0.0, "waiting": 0.0}
            for s in spec:
                sim = get_json(f"http://127.0.0.1:{s['port']}/props")["rower_sim"]
                total["deferred"] += sim["requests_deferred"]
                total["busy"] += sim["slots_processing"]
                total["waiting"] += sim["requests_waiting"]
            return total

        def schedule(rate: float, index: int) -> list[dict[str, Any]]:
            return poisson_schedule(
                rate=rate,
                duration=duration,
                seed=1000 + index,
                prompt=PROMPT,
                generation=GENERATION,
            )

        runs = sweep(
            policies,
            upstreams,
            work,
            loads=loads,
            capacity=cap,
            schedule=schedule,
            counters=counters,
            server_pids=[host.pid],
        )
    results = {
        "scenario": "sim",
        "servers": spec,
        "capacity_rps": cap,
        "duration_s": duration,
        "prompt": PROMPT.__dict__,
        "generation": GENERATION.__dict__,
        "runs": runs,
    }
    (out / "sim.json").write_text(json.dumps(results, indent=1))
    return results
