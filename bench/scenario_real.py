"""Scenario 2: the same scheduling question on real llama-servers (tiny model, CPU).

3 llama-servers of 2 slots each, long generations (`ignore_eos`), Poisson arrivals at 80% and
95% of a capacity measured at the start of the run. llama-server has no counter of deferred
requests, so over-dispatch is sampled: the peak of `llamacpp:requests_deferred` (its gauge of
requests waiting inside the server) summed over the servers, read every 100 ms.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import procs
from bench.scenario_sim import _available, _line
from bench.scheduling import (
    SIM_POLICIES,
    Lengths,
    Upstream,
    get_json,
    poisson_schedule,
    run_load,
    start_policy,
    wait_idle,
)

SERVERS = 3
SLOTS = 2
PROMPT = Lengths(median=40, sigma=0.6, low=4, high=400)
GENERATION = Lengths(median=300, sigma=0.7, low=32, high=1500)
EXTRA = {"ignore_eos": True, "cache_prompt": False}


def tools(*, build: bool = True) -> tuple[Path, Path] | None:
    """The cached llama-server binary and tiny model, built if missing; None if impossible."""
    root = Path(__file__).resolve().parent.parent
    if not build:
        sys.path.insert(0, str(root / "scripts"))
        import llamacpp_cache  # type: ignore[import-not-found]

        server, model = llamacpp_cache.llama_server_path(), llamacpp_cache.tiny_model_path()
        return (server, model) if server.is_file() and model.is_file() else None

    def last_line_of(script: str, timeout: float) -> Path:
        printed = subprocess.run(
            [sys.executable, str(root / "scripts" / script)],
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        ).stdout.strip()
        return Path(printed.splitlines()[-1])

    try:
        return last_line_of("build_llama_server.py", 1800), last_line_of("make_tiny_model.py", 600)
    except (subprocess.SubprocessError, OSError):
        return None


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    # Not 0: a server without the metric (no --metrics, another build) has not shown "none".
    raise ValueError(f"no {name} in llama-server's /metrics")


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
    found = tools(build=build)
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
        if _available(p, kinds) and (p.kind not in ("rower", "paddler") or p.interval_ms == 1000)
    ]
    work = out / "work" / "real"
    work.mkdir(parents=True, exist_ok=True)
    ports = [procs.free_port() for _ in range(SERVERS)]
    upstreams = [Upstream(f"127.0.0.1:{port}", SLOTS) for port in ports]
    runs: list[dict[str, Any]] = []
    with procs.Procs(work / "logs") as runner:
        servers = []
        for port in ports:
            argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
            argv += ["-np", str(SLOTS), "-c", str(SLOTS * 4096), "-t", "1", "--metrics"]
            servers.append(runner.start(f"llama-server-{port}", argv, port=port))
        for port in ports:
            _wait_healthy(port)
        tokens_per_second = calibrate(ports)
        mean_generation = _mean(generation)
        cap = tokens_per_second / mean_generation

        def counters() -> dict[str, float]:
            total = {"busy": 0.0, "waiting": 0.0}
            for port in ports:
                slots = get_json(f"http://127.0.0.1:{port}/slots")
                total["busy"] += sum(1 for slot in slots if slot["is_processing"])
                total["waiting"] += deferred(port)
            return total

        def deferred(port: int) -> float:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as answer:
                return _metric(answer.read().decode(), "llamacpp:requests_deferred")

        def sampler() -> float:
            return sum(deferred(port) for port in ports)

        for policy in policies:
            with procs.Procs(work / "logs") as front_runner:
                front = start_policy(front_runner, policy, upstreams, work)
                for index, load in enumerate(loads):
                    requests = poisson_schedule(
                        rate=load * cap,
                        duration=duration,
                        seed=2000 + index,
                        prompt=PROMPT,
                        generation=generation,
                        extra=EXTRA,
                    )
                    result = run_load(
                        front_runner,
                        front,
                        requests,
                        path="/completion",
                        work=work,
                        counters=counters,
                        watch_pids={"proxy": front.pids, "servers": [s.pid for s in servers]},
                        sampler=sampler,
                    )
                    wait_idle(counters)
                    result["over_dispatch"] = None
                    result.update(policy=policy.name, kind=policy.kind, load=load, rate=load * cap)
                    runs.append(result)
                    print(_line(result), flush=True)
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


def _wait_healthy(port: int, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if get_json(f"http://127.0.0.1:{port}/health").get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"llama-server on port {port} not healthy after {seconds} s")
