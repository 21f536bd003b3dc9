"""Scenario: uniform load on real llama-servers of unequal size (issue 12, item 3).

3 llama-servers of 1, 2 and 3 slots, one thread each (so the server with more slots has no more
throughput: its slots share one thread), streamed requests with Poisson arrivals at 80% and 95%
of a capacity measured at the start. Fronts: HAProxy leastconn+maxconn (the baseline), Rower as
committed (`HEAD`, run from a `git archive` of it: what others are editing in the working tree
is not measured), and the same code with the pick as it was at `BEFORE` ("most free slots
first": `upstream_index.py` of that commit), so that the pick is the only difference. Every
front runs every load in each repeat, in an order rotated from one repeat to the next, so a
drift of the machine touches all of them alike; the report takes medians.

Measured per run, besides the clients' view: CPU seconds of the servers, the balancer, the
agents and the load generator; where each request went (tokens generated per server, and the
busy slots of each sampled at 10 Hz); over-dispatch (the peak of llama-server's
`requests_deferred` gauge, summed over the servers); and for Rower, the mean time a request
waited in its buffer (from its `/metrics`).
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import statistics
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.scheduling import (
    Front,
    Lengths,
    Policy,
    Upstream,
    get_json,
    poisson_schedule,
    prompt_text,
    run_load,
    start_policy,
    wait_agents,
    wait_idle,
)

ROOT = Path(__file__).resolve().parent.parent
SLOTS = (1, 2, 3)
PROMPT = Lengths(median=40, sigma=0.6, low=4, high=400)
GENERATION = Lengths(median=120, sigma=0.6, low=16, high=600)
EXTRA = {"ignore_eos": True, "cache_prompt": False}
BEFORE = "25667d4"
"""The last commit with the pick "most free slots first" (SPEC's)."""
PICK = "src/rower/balancer/upstream_index.py"
"""The file that holds the pick's order."""
INTERVAL_MS = 1000
"""How often the agents report (the default)."""


@dataclass(frozen=True)
class FrontSpec:
    """One front of the comparison: a policy, and for Rower the source tree it runs from."""

    name: str
    kind: str
    source: Path | None = None
    """`src` directory of the Rower to run (None: this checkout's)."""
    args: tuple[str, ...] = ()
    """More flags of the Rower balancer."""


def calibrate(
    servers: Sequence[llama_servers.LlamaServer],
    generation: Lengths,
    *,
    seconds: float = 6.0,
    seed: int = 1,
) -> float:
    """Requests a second the fleet completes with every slot kept busy for `seconds`: a closed
    loop per slot, straight to the servers, of requests drawn as the runs' are (streamed, the
    same prompt and generation lengths). Requests still running at the end count for the
    share of their tokens generated (so a long one does not stretch the measure)."""
    import random

    deadline = time.monotonic() + seconds
    lock = threading.Lock()
    rng = random.Random(seed)

    def loop(port: int) -> float:
        done = 0.0
        while time.monotonic() < deadline:
            with lock:
                prompt, wanted = prompt_text(rng, PROMPT.sample(rng)), generation.sample(rng)
            body = {"prompt": prompt, "n_predict": wanted, "stream": True, **EXTRA}
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/completion",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            events = 0
            with urllib.request.urlopen(request, timeout=120) as answer:
                for line in answer:
                    events += line.count(b'"stop":false')
                    if time.monotonic() > deadline:
                        break
            done += min(1.0, events / wanted)
        return done

    started = time.monotonic()
    jobs = [s.port for s in servers for _ in range(s.slots)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        completed = sum(pool.map(loop, jobs))
    return completed / (time.monotonic() - started)


def commit_of(revision: str) -> str:
    """The short commit id `revision` names in this repository."""
    return subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", revision],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def source_at(revision: str, work: Path) -> Path:
    """This repository's `src` at `revision`, extracted under `work` (git archive: no checkout,
    and not the working tree: what others are editing in it is not measured)."""
    target = work / f"src-{revision}"
    if not (target / "src" / "rower").is_dir():
        target.mkdir(parents=True, exist_ok=True)
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", revision, "src"],
            capture_output=True,
            check=True,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target / "src"


def source_with(revision: str, work: Path, path: str, other: str) -> Path:
    """`source_at(revision)` with the file at `path` as it was at `other`: an A/B of one file."""
    target = work / f"src-{revision}-with-{Path(path).stem}-of-{other}"
    if not (target / "src" / "rower").is_dir():
        shutil.copytree(source_at(revision, work), target / "src", dirs_exist_ok=True)
        old = subprocess.run(
            ["git", "-C", str(ROOT), "show", f"{other}:{path}"], capture_output=True, check=True
        ).stdout
        (target / path).write_bytes(old)
    return target / "src"


def start_rower_fronts(
    runner: procs.Procs,
    specs: Sequence[FrontSpec],
    upstreams: Sequence[Upstream],
    work: Path,
    interval_ms: int = INTERVAL_MS,
) -> dict[str, Front]:
    """One balancer per spec (each from its source tree), and one agent per server reporting
    to all of them (so every Rower sees the same reports)."""
    fronts: dict[str, Front] = {}
    managements: list[str] = []
    for spec in specs:
        port, management = procs.free_port(), procs.free_port()
        argv = procs.rower(
            "balancer",
            "--management-addr",
            f"127.0.0.1:{management}",
            "--reverseproxy-addr",
            f"127.0.0.1:{port}",
            "--max-buffered-requests",
            "100000",
            "--buffered-request-timeout",
            "600000",
            "--log-level",
            "warning",
            "--access-log",
            "off",
            "--metrics-endpoint-enable",
            *spec.args,
        )
        env = {"PYTHONPATH": str(spec.source)} if spec.source else None
        balancer = runner.start(f"balancer-{port}", argv, port=port, env=env)
        address = f"127.0.0.1:{management}"
        fronts[spec.name] = Front(f"http://127.0.0.1:{port}", [balancer.pid], address)
        managements.append(address)
    agents_spec = {
        "agents": [
            {"target": u.address, "management": managements, "interval_ms": interval_ms}
            for u in upstreams
        ]
    }
    path = work / "agents-unequal.json"
    path.write_text(json.dumps(agents_spec))
    agents = runner.python("agents", "bench.fleethost", str(path))
    for address in managements:
        wait_agents(int(address.rsplit(":", 1)[1]), len(upstreams))
    for front in fronts.values():
        front.agents = agents.pid
    return fronts


class ServerSampler:
    """Reads every server's `/metrics` at 10 Hz: the summed `requests_deferred` (the run's
    over-dispatch sampler) and each server's busy slots (`requests_processing`); and, for a
    Rower front (`balancer`), its buffered requests and the slots it believes busy, at 2 Hz
    (its `/metrics` and `/api/v1/agents` cost it CPU that HAProxy's runs do not pay)."""

    BALANCER_EVERY = 5
    """Balancer samples are taken with every 5th server sample."""

    def __init__(self, servers: Sequence[llama_servers.LlamaServer]) -> None:
        self.servers = servers
        self.balancer: str | None = None
        self.lock = threading.Lock()
        self.samples: list[tuple[list[float], float | None, float | None, float | None]] = []
        self.calls = 0

    def __call__(self) -> float:
        deferred = 0.0
        busy = []
        for server in self.servers:
            samples = llama_servers.metrics(server.port)
            value = samples.get("llamacpp:requests_deferred")
            if value is None:
                raise ValueError("no llamacpp:requests_deferred in llama-server's /metrics")
            deferred += value
            busy.append(samples.get("llamacpp:requests_processing", 0.0))
        buffered = believed = taken = None
        self.calls += 1
        if self.balancer is not None and self.calls % self.BALANCER_EVERY == 0:
            url = f"http://{self.balancer}/metrics"
            with urllib.request.urlopen(url, timeout=3) as answer:
                rower = llama_servers.prometheus_samples(answer.read().decode())
            buffered = rower.get("rower_requests_buffered", 0.0)
            agents = get_json(f"http://{self.balancer}/api/v1/agents")["agents"]
            believed = sum(float(a["status"]["slots_processing"]) for a in agents)
            taken = sum(float(a["slots_taken"]) for a in agents)
        with self.lock:
            self.samples.append((busy, buffered, believed, taken))
        return deferred

    def take(self) -> dict[str, Any]:
        """What the samples since the last call show: each server's mean busy slots; for
        Rower, the share of samples with requests buffered while the servers had a slot free,
        the mean of (slots Rower believes busy - slots the servers show busy), and of the
        part of its belief that is work it does not know (`others`: believed - its own)."""
        with self.lock:
            samples, self.samples = self.samples, []
        total = sum(s.slots for s in self.servers)
        busy = [
            statistics.fmean(b[i] for b, _, _, _ in samples) if samples else 0.0
            for i in range(len(self.servers))
        ]
        rower = [(b, q, v, t) for b, q, v, t in samples if q is not None and v is not None]
        return {
            "busy_mean": busy,
            "buffered_while_free": (
                sum(1 for b, q, _, _ in rower if q and sum(b) < total) / len(rower)
                if rower
                else None
            ),
            "buffered_mean": statistics.fmean(q for _, q, _, _ in rower) if rower else None,
            "believed_excess": (
                statistics.fmean(v - sum(b) for b, _, v, _ in rower) if rower else None
            ),
            "others_mean": (
                statistics.fmean(v - (t or 0) for _, _, v, t in rower) if rower else None
            ),
        }


def tokens_per_server(servers: Sequence[llama_servers.LlamaServer]) -> list[float]:
    return [
        llama_servers.metrics(s.port).get("llamacpp:tokens_predicted_total", 0.0) for s in servers
    ]


def server_seconds(servers: Sequence[llama_servers.LlamaServer]) -> float:
    """Seconds the servers' slots spent on prompts and generation, summed (their counters)."""
    total = 0.0
    for server in servers:
        samples = llama_servers.metrics(server.port)
        total += samples.get("llamacpp:prompt_seconds_total", 0.0)
        total += samples.get("llamacpp:tokens_predicted_seconds_total", 0.0)
    return total


def rower_sums(front: Front) -> dict[str, float]:
    """Rower's histograms of buffer wait and request duration: sums, counts, and the count of
    waits under 10 ms (zeros for another front)."""
    if front.management is None:
        return {}
    with urllib.request.urlopen(f"http://{front.management}/metrics", timeout=3) as answer:
        samples = llama_servers.prometheus_samples(answer.read().decode())

    def total(prefix: str) -> float:
        return sum(v for k, v in samples.items() if k.startswith(prefix))

    return {
        "wait_sum": total("rower_buffer_wait_seconds_sum"),
        "wait_count": total("rower_buffer_wait_seconds_count"),
        "wait_quick": samples.get('rower_buffer_wait_seconds_bucket{le="0.01"}', 0.0),
        "duration_sum": total("rower_request_duration_seconds_sum"),
    }


def rotated(items: Sequence[FrontSpec], by: int) -> list[FrontSpec]:
    by %= max(1, len(items))
    return [*items[by:], *items[:by]]


def run(
    out: Path,
    *,
    quick: bool = False,
    repeats: int | None = None,
    loads: tuple[float, ...] = (0.8, 0.95),
    duration: float | None = None,
    build: bool = True,
    generation: Lengths = GENERATION,
    before: str | None = None,
    old_pick: str | None = BEFORE,
    after: str | None = "HEAD",
    variants: Sequence[FrontSpec] = (),
    calibration_seconds: float = 6.0,
    interval_ms: int = INTERVAL_MS,
    first_repeat: int = 0,
) -> dict[str, Any]:
    """Every front at every load, `repeats` times interleaved; returns (and writes) the results.

    Rower runs as committed at `after` (None: from this checkout, as the smoke test does, which
    needs no git history), beside `after` with the pick of `old_pick` (None: not run), and, if
    `before` names a commit, Rower as committed then.
    `variants`: more fronts to compare (experiments), placed before "Rower" (the last front,
    whose ratios to HAProxy are the targets); `interval_ms`: how often the agents report;
    `first_repeat`: the number of the first repeat (its schedules' seeds and the fronts'
    order follow it), so that sessions merged later run different schedules.
    """
    found = llama_servers.tools(build=build)
    if found is None:
        results: dict[str, Any] = {
            "scenario": "unequal",
            "skipped": "llama-server or model missing",
        }
        (out / "unequal.json").write_text(json.dumps(results))
        return results
    server, model = found
    repeats = repeats or (1 if quick else 3)
    duration = duration or (8.0 if quick else 14.0)
    work = out / "work" / "unequal"
    work.mkdir(parents=True, exist_ok=True)
    specs = [FrontSpec("HAProxy leastconn+maxconn", "haproxy")]
    if before:
        specs.append(FrontSpec(f"Rower before ({before})", "rower", source_at(before, work)))
    commit = commit_of(after) if after else None
    if commit and old_pick:
        name = f"Rower, most free first ({commit} with {old_pick}'s {Path(PICK).name})"
        specs.append(FrontSpec(name, "rower", source_with(commit, work, PICK, old_pick)))
    specs.extend(variants)
    if commit:
        specs.append(FrontSpec(f"Rower ({commit})", "rower", source_at(commit, work)))
    else:
        specs.append(FrontSpec("Rower", "rower"))
    runs: list[dict[str, Any]] = []
    with procs.Procs(work / "logs") as runner:
        servers = [
            llama_servers.start(runner, server, model, count=1, slots=n, slot_context=2048)[0]
            for n in SLOTS
        ]
        upstreams = [Upstream(s.address, s.slots) for s in servers]
        calibrate(servers, generation, seconds=1.0)  # warm up
        measured = [
            calibrate(servers, generation, seconds=calibration_seconds, seed=seed)
            for seed in range(3)
        ]
        cap = statistics.median(measured)
        print(f"  capacity {[round(m, 2) for m in measured]} req/s with every slot busy")
        fronts = {
            spec.name: start_policy(runner, Policy(spec.name, spec.kind), upstreams, work)
            for spec in specs
            if spec.kind != "rower"
        }
        fronts |= start_rower_fronts(
            runner, [s for s in specs if s.kind == "rower"], upstreams, work
        )
        sampler = ServerSampler(servers)
        for repeat in range(first_repeat, first_repeat + repeats):
            for load_index, load in enumerate(loads):
                requests = poisson_schedule(
                    rate=load * cap,
                    duration=duration,
                    seed=3000 + 10 * repeat + load_index,
                    prompt=PROMPT,
                    generation=generation,
                    extra=EXTRA,
                )
                for spec in rotated(specs, repeat + load_index):
                    front = fronts[spec.name]
                    result = one_run(runner, front, requests, servers, sampler, work)
                    result.update(policy=spec.name, load=load, rate=load * cap, repeat=repeat)
                    runs.append(result)
                    print(line(result), flush=True)
    results = {
        "scenario": "unequal",
        "slots": list(SLOTS),
        "threads_per_server": 1,
        "calibrations": measured,
        "capacity_rps": cap,
        "duration_s": duration,
        "repeats": repeats,
        "interval_ms": interval_ms,
        "before": before,
        "old_pick": old_pick,
        "prompt": PROMPT.__dict__,
        "generation": generation.__dict__,
        "policies": [s.name for s in specs],
        "runs": runs,
    }
    (out / "unequal.json").write_text(json.dumps(results, indent=1))
    return results


def one_run(
    runner: procs.Procs,
    front: Front,
    requests: list[dict[str, Any]],
    servers: Sequence[llama_servers.LlamaServer],
    sampler: ServerSampler,
    work: Path,
) -> dict[str, Any]:
    """One schedule through one front, then wait until the servers are idle."""

    def counters() -> dict[str, float]:
        return llama_servers.activity(servers)

    watch = {"proxy": front.pids, "servers": [s.pid for s in servers]}
    if front.agents is not None:
        watch["agents"] = [front.agents]
    if front.management is not None:
        wait_no_busy_belief(front.management)
    tokens_before = tokens_per_server(servers)
    seconds_before = server_seconds(servers)
    rower_before = rower_sums(front)
    sampler.balancer = front.management
    sampler.take()
    result = run_load(
        runner,
        front,
        requests,
        path="/completion",
        work=work,
        counters=counters,
        watch_pids=watch,
        sampler=sampler,
        fresh_connections=True,
    )
    result.update(sampler.take())
    wait_idle(counters)
    tokens_after = tokens_per_server(servers)
    served = (server_seconds(servers) - seconds_before) / max(1, result["ok"])
    rower = {k: v - rower_before[k] for k, v in rower_sums(front).items()}
    waited = rower.get("wait_count", 0.0)
    result["over_dispatch"] = None
    result["tokens_share"] = _shares(
        [a - b for a, b in zip(tokens_after, tokens_before, strict=True)]
    )
    result["waited_share"] = 1 - rower["wait_quick"] / waited if waited else None
    result["buffer_wait_mean"] = rower["wait_sum"] / waited if waited else None
    # How long a request held a slot in Rower's count (its duration less its wait) beyond the
    # seconds the server's slot spent on it: what the balancer's belief lags the server by.
    result["slot_time_server"] = served
    result["slot_time_rower"] = (
        (rower["duration_sum"] - rower["wait_sum"]) / waited if waited else None
    )
    del result["ttft_all"]
    return result


def wait_no_busy_belief(management: str, seconds: float = 10.0) -> None:
    """Block until the Rower at `management` believes no slot busy.

    Every Rower front hears the same agents, so the previous front's requests are others' work
    to it, and the servers going idle (`wait_idle`) reaches its estimate only with the agents'
    next report: without this wait a run would begin with up to a second of slots believed
    busy that are free (a cost of the rig, not of Rower; HAProxy starts each run empty).
    """
    deadline = time.monotonic() + seconds
    while True:
        agents = get_json(f"http://{management}/api/v1/agents")["agents"]
        busy = sum(int(a["status"]["slots_processing"]) for a in agents)
        if busy == 0:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the balancer at {management} still believes {busy} slots busy {seconds:g} s "
                "after the servers went idle: are its agents reporting?"
            )
        time.sleep(0.05)


def _shares(values: list[float]) -> list[float]:
    total = sum(values)
    return [v / total if total else 0.0 for v in values]


def line(result: dict[str, Any]) -> str:
    """One run, as a line of progress."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    def num(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    cpu = result["cpu"]
    return (
        f"  r{result['repeat']} {result['policy']:<26} {result['load']:>4.0%}: ttft p50 "
        f"{ms(result['ttft_p50'])} p95 {ms(result['ttft_p95'])} p99 {ms(result['ttft_p99'])} "
        f"ms, e2e p50 {ms(result['e2e_p50'])}, {result['goodput_rps']:.2f} req/s, "
        f"peak deferred {result['peak_deferred']}, errors {result['error_kinds']}, busy "
        f"{[round(b, 2) for b in result['busy_mean']]}, buffer wait "
        f"{ms(result['buffer_wait_mean'])} ms (waited {num(result['waited_share'])}), "
        f"buffered while free {num(result['buffered_while_free'])}, buffered "
        f"{num(result['buffered_mean'])}, believed excess {num(result['believed_excess'])}, "
        f"others {num(result['others_mean'])}, slot time server {ms(result['slot_time_server'])}"
        f" rower {ms(result['slot_time_rower'])} ms, cpu servers {cpu.get('servers', 0):.2f} "
        f"proxy {cpu.get('proxy', 0):.2f} agents {cpu.get('agents', 0):.2f} "
        f"loadgen {cpu.get('loadgen', 0):.2f} machine {cpu.get('machine', 0):.0%}"
    )


def medians(data: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per (policy, load): the median over repeats of each measure."""
    rows = []
    for load in sorted({r["load"] for r in data["runs"]}):
        for policy in data["policies"]:
            group = [r for r in data["runs"] if r["load"] == load and r["policy"] == policy]
            if not group:
                continue

            def med(
                get: Callable[[dict[str, Any]], float | None], group: list[dict[str, Any]] = group
            ) -> float | None:
                values = [v for r in group if (v := get(r)) is not None]
                return statistics.median(values) if values else None

            rows.append(
                {
                    "policy": policy,
                    "load": load,
                    "repeats": len(group),
                    **{
                        key: med(lambda r, key=key: r.get(key))  # type: ignore[misc]
                        for key in (
                            "ttft_p50",
                            "ttft_p95",
                            "ttft_p99",
                            "e2e_p50",
                            "e2e_p99",
                            "goodput_rps",
                            "goodput_tps",
                            "peak_deferred",
                            "errors",
                            "buffer_wait_mean",
                            "cpu_wall",
                        )
                    },
                    **{
                        f"cpu_{name}": med(lambda r, name=name: r["cpu"].get(name))  # type: ignore[misc]
                        for name in ("servers", "proxy", "agents", "loadgen", "machine")
                    },
                    "busy_mean": [
                        statistics.median(r["busy_mean"][i] for r in group)
                        for i in range(len(data["slots"]))
                    ],
                    "tokens_share": [
                        statistics.median(r["tokens_share"][i] for r in group)
                        for i in range(len(data["slots"]))
                    ],
                }
            )
    return rows
