"""Scenario 2: the same scheduling question on real llama-servers (tiny model, CPU).

3 llama-servers of 2 slots each, long generations (`ignore_eos`), Poisson arrivals at 80% and
95% of a capacity measured at the start of the run. llama-server has no counter of deferred
requests, so over-dispatch is sampled: the peak of `llamacpp:requests_deferred` (its gauge of
requests waiting inside the server) summed over the servers, read every 100 ms.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.scheduling import (
    SIM_POLICIES,
    Lengths,
    Upstream,
    available,
    poisson_schedule,
    sweep,
)

SERVERS = 3
SLOTS = 2
PROMPT = Lengths(median=40, sigma=0.6, low=4, high=400)
GENERATION = Lengths(median=300, sigma=0.7, low=32, high=1500)
EXTRA = {"ignore_eos": True, "cache_prompt": False}


def calibrate(ports: list[int], n_predict: int = 300) -> float:
    """Generated tokens per second of the whole fleet with every slot busy."""

    def one(port: int) -> int:
        body = json.dumps({"prompt": "hello", "n_predict": n_predict, **EXTRA}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/completion",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=120) as answer:
            return int(json.loads(answer.read())["timings"]["predicted_n"])

    started = time.monotonic()
    jobs = [port for port in ports for _ in range(SLOTS)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        tokens = sum(pool.map(one, jobs))
    return tokens / (time.monotonic() - started)


def run(
    out: Path,
    *,
    quick: bool = False,
    loads: tuple[float, ...] | None = None,
    duration: float | None = None,
    policy_kinds: set[str] | None = None,
    build: bool = True,
    generation: Lengths = GENERATION,
) -> dict[str, Any]:
    """Run the policies on real llama-servers; returns (and writes) the results.

    `generation` (tokens per request) is shorter in the smoke test, to keep it to seconds.
    """
    found = llama_servers.tools(build=build)
    if found is None:
        results: dict[str, Any] = {"scenario": "real", "skipped": "llama-server or model missing"}
        (out / "real.json").write_text(json.dumps(results))
        return results
    server, model = found
    loads = loads or ((0.8,) if quick else (0.8, 0.95))
    duration = duration or (4.0 if quick else 20.0)
    kinds = policy_kinds or {"nginx-lc", "haproxy", "ideal", "paddler", "rower"}
    policies = [
        p
        for p in SIM_POLICIES
        if available(p, kinds) and (p.kind not in ("rower", "paddler") or p.interval_ms == 1000)
    ]
    work = out / "work" / "real"
    work.mkdir(parents=True, exist_ok=True)
    with procs.Procs(work / "logs") as runner:
        servers = llama_servers.start(
            runner, server, model, count=SERVERS, slots=SLOTS, slot_context=4096
        )
        ports = [s.port for s in servers]
        tokens_per_second = calibrate(ports)
        mean_generation = _mean(generation)
        cap = tokens_per_second / mean_generation

        def schedule(rate: float, index: int) -> list[dict[str, Any]]:
            return poisson_schedule(
                rate=rate,
                duration=duration,
                seed=2000 + index,
                prompt=PROMPT,
                generation=generation,
                extra=EXTRA,
            )

        runs = sweep(
            policies,
            [Upstream(s.address, SLOTS) for s in servers],
            work,
            loads=loads,
            capacity=cap,
            schedule=schedule,
            counters=lambda: llama_servers.activity(servers),
            server_pids=[s.pid for s in servers],
            sampler=lambda: sum(llama_servers.deferred(s) for s in servers),
        )
    results = {
        "scenario": "real",
        "servers": SERVERS,
        "slots": SLOTS,
        "fleet_tokens_per_second": tokens_per_second,
        "capacity_rps": cap,
        "duration_s": duration,
        "prompt": PROMPT.__dict__,
        "generation": GENERATION.__dict__,
        "runs": runs,
    }
    (out / "real.json").write_text(json.dumps(results, indent=1))
    return results


def _mean(lengths: Lengths, samples: int = 20000) -> float:
    import random

    rng = random.Random(1)
    return sum(lengths.sample(rng) for _ in range(samples)) / samples
