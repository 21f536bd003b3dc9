"""Shared machinery of the scheduling scenarios: policies, workloads and one measured run.

A *policy* is what stands between the clients and the servers (nginx, HAProxy, the ideal
dispatcher, Rower in one of its modes). A *run* sends one open-loop Poisson workload through one
policy and measures what the clients saw and what the servers did. Every policy of a scenario
gets the same workloads (same seed), on the same servers.
"""

from __future__ import annotations

import json
import math
import random
import statistics
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import procs
from bench.baselines import haproxy, nginx

LOADGEN_GRACE = 60.0
"""Seconds a run may take past its last arrival before the load generator is stopped."""


@dataclass(frozen=True)
class Policy:
    """A way to dispatch: `kind` is nginx-rr, nginx-lc, haproxy, haproxy-hash, ideal, rower or
    paddler.

    Attributes:
        interval_ms: how often Rower's agents report (rower, paddler).
        routing: Rower's `--routing` (None: the balancer's default).
        flags: more of the balancer's flags (rower).
    """

    name: str
    kind: str
    interval_ms: int = 1000
    routing: str | None = None
    flags: tuple[str, ...] = ()


SIM_POLICIES = (
    Policy("nginx round robin", "nginx-rr"),
    Policy("nginx least_conn", "nginx-lc"),
    Policy("HAProxy leastconn+maxconn", "haproxy"),
    Policy("ideal", "ideal"),
    Policy("Paddler policy, 1000 ms", "paddler", 1000),
    Policy("Paddler policy, 100 ms", "paddler", 100),
    Policy("Rower, 1000 ms", "rower", 1000),
    Policy("Rower, 100 ms", "rower", 100),
)


@dataclass(frozen=True)
class Upstream:
    """One server behind the policies: where it listens and how many slots it has."""

    address: str
    slots: int


@dataclass
class Front:
    """A started policy: the URL clients use and the pids whose CPU is its cost.

    Attributes:
        management: a Rower balancer's management address (its API and /metrics).
        agents: the pid of the process running its agents (their CPU is not the proxy's).
    """

    url: str
    pids: list[int] = field(default_factory=list)
    management: str | None = None
    agents: int | None = None


def start_policy(
    runner: procs.Procs, policy: Policy, upstreams: Sequence[Upstream], work: Path
) -> Front:
    """Start `policy` in front of `upstreams`; returns once it accepts and sees every server."""
    port = procs.free_port()
    addresses = [u.address for u in upstreams]
    if policy.kind in ("nginx-rr", "nginx-lc"):
        conf = nginx.config(work / "nginx", port, addresses, least_conn=policy.kind == "nginx-lc")
        proc = runner.start("nginx", nginx.argv(conf), port=port)
        time.sleep(0.2)
        return Front(f"http://127.0.0.1:{port}", _process_tree(proc.pid))
    if policy.kind in ("haproxy", "haproxy-hash"):
        header = SESSION_HEADER if policy.kind == "haproxy-hash" else None
        conf = haproxy.config(
            work / "haproxy", port, [(u.address, u.slots) for u in upstreams], hash_header=header
        )
        proc = runner.start(policy.kind, haproxy.argv(conf), port=port)
        return Front(f"http://127.0.0.1:{port}", _process_tree(proc.pid))
    if policy.kind == "ideal":
        specs = [f"{u.address}:{u.slots}" for u in upstreams]
        proc = runner.python("ideal", "bench.baselines.ideal", str(port), *specs, port=port)
        return Front(f"http://127.0.0.1:{port}", [proc.pid])
    return start_rowers(runner, [policy], upstreams, work)[0]


SESSION_HEADER = "X-Session-Id"
"""The header a client names its conversation in, for the front that hashes it (never Rower)."""


def start_rowers(
    runner: procs.Procs,
    policies: Sequence[Policy],
    upstreams: Sequence[Upstream],
    work: Path,
    *,
    extra: Sequence[str] = (),
    peered: Sequence[int] = (),
) -> list[Front]:
    """Start one Rower balancer per policy and one agent per upstream reporting to all of them.

    Several balancers fed by the same agents is how Rower runs highly available (the agents'
    `--management-addr` is repeatable); the agents poll at the first policy's interval. The
    balancers at the indices `peered` follow each other's placements (`--peer-balancer-addr`).
    """
    fronts: list[Front] = []
    managements = [f"127.0.0.1:{procs.free_port()}" for _ in policies]
    for index, policy in enumerate(policies):
        port, management = procs.free_port(), managements[index]
        peers = [managements[i] for i in peered if i != index] if index in peered else []
        argv = procs.rower(
            "balancer",
            "--management-addr",
            management,
            "--reverseproxy-addr",
            f"127.0.0.1:{port}",
            "--max-buffered-requests",
            "100000",
            "--buffered-request-timeout",
            "600000",
            "--slot-accounting",
            policy.kind,
            "--log-level",
            "warning",
            "--access-log",
            "off",  # as nginx's `access_log off` in the baselines
            *(("--routing", policy.routing) if policy.routing else ()),
            *(flag for peer in peers for flag in ("--peer-balancer-addr", peer)),
            *policy.flags,
            *extra,
        )
        balancer = runner.start(f"balancer-{policy.kind}-{port}", argv, port=port)
        fronts.append(Front(f"http://127.0.0.1:{port}", [balancer.pid], management))
    spec = {
        "agents": [
            {
                "target": u.address,
                "management": managements,
                "interval_ms": policies[0].interval_ms,
            }
            for u in upstreams
        ]
    }
    spec_path = work / f"agents-{managements[0].rsplit(':', 1)[1]}.json"
    spec_path.write_text(json.dumps(spec))
    agents = runner.python("agents", "bench.fleethost", str(spec_path))
    for management in managements:
        wait_agents(int(management.rsplit(":", 1)[1]), len(upstreams))
    for front in fronts:
        front.agents = agents.pid
    return fronts


def available(policy: Policy, kinds: set[str] | None = None) -> bool:
    """Whether `policy` can run here (its program is installed) and is among `kinds` (kind or
    name; None: every one)."""
    if kinds is not None and policy.kind not in kinds and policy.name not in kinds:
        return False
    if policy.kind.startswith("nginx"):
        return nginx.binary() is not None
    if policy.kind.startswith("haproxy"):
        return haproxy.binary() is not None
    return True


def wait_agents(management: int, count: int, seconds: float = 20.0) -> None:
    """Block until the balancer lists `count` usable agents."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            agents = get_json(f"http://127.0.0.1:{management}/api/v1/agents")["agents"]
            if (
                sum(1 for a in agents if a.get("is_usable", True) and not a["status"]["error"])
                >= count
            ):
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"fewer than {count} agents registered after {seconds} s")


def _process_tree(pid: int) -> list[int]:
    """A process and its children (nginx's worker), once the children are there."""
    children = Path(f"/proc/{pid}/task/{pid}/children")
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        if children.exists() and children.read_text().split():
            return [pid, *(int(c) for c in children.read_text().split())]
        time.sleep(0.05)
    return [pid]


def get_json(url: str, timeout: float = 3.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as answer:
        return json.loads(answer.read())


# Workloads.


@dataclass(frozen=True)
class Lengths:
    """Heavy-tailed (log-normal) request lengths, in tokens, clipped to [low, high]."""

    median: float
    sigma: float
    low: int
    high: int

    def sample(self, rng: random.Random) -> int:
        return max(
            self.low, min(self.high, round(self.median * math.exp(rng.gauss(0, self.sigma))))
        )


def prompt_text(rng: random.Random, tokens: int) -> str:
    """A prompt of about `tokens` tokens that shares no prefix with others (no cache hits)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    return "".join(" " + "".join(rng.choices(letters, k=3)) for _ in range(max(1, tokens - 1)))


def poisson_schedule(
    *,
    rate: float,
    duration: float,
    seed: int,
    prompt: Lengths,
    generation: Lengths,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Requests arriving as a Poisson process of `rate` per second for `duration` seconds."""
    rng = random.Random(seed)
    at = 0.0
    requests = []
    while True:
        at += rng.expovariate(rate)
        if at >= duration:
            return requests
        body = {
            "prompt": prompt_text(rng, prompt.sample(rng)),
            "n_predict": generation.sample(rng),
            "stream": True,
            **(extra or {}),
        }
        requests.append({"at": at, "body": body})


# One run.


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0..1) of `values`, nearest rank; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def run_load(
    runner: procs.Procs,
    front: Front,
    requests: list[dict[str, Any]],
    *,
    path: str,
    work: Path,
    counters: Callable[[], dict[str, float]],
    watch_pids: dict[str, list[int]],
    sampler: Callable[[], float] | None = None,
    fresh_connections: bool = False,
) -> dict[str, Any]:
    """Send `requests` through `front` and measure clients, servers and CPU.

    `fresh_connections`: the clients open a connection per request instead of keeping them
    alive (through HAProxy, a kept-alive client connection that llama-server's close after a
    streamed answer ends fails some of the next requests sent on it).
    """
    duration = requests[-1]["at"] if requests else 0.0
    schedule = {
        "url": front.url + path,
        "deadline": duration + LOADGEN_GRACE,
        "requests": requests,
        "fresh_connections": fresh_connections,
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", dir=work, delete=False) as file:
        json.dump(schedule, file)
    out = Path(file.name).with_suffix(".out.json")
    before = counters()
    meter = procs.CpuMeter(watch_pids)
    deferred: list[float] = []
    missed: list[str] = []
    stop_sampling = threading.Event()

    def sample() -> None:
        # A sample that fails is counted, not read as 0: a busy server that cannot answer
        # /metrics in time is exactly when requests may be deferred.
        while sampler is not None and not stop_sampling.wait(0.1):
            try:
                deferred.append(sampler())
            except OSError as error:
                missed.append(str(error))

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    loadgen = runner.python("loadgen", "bench.loadgen", "open", file.name, str(out))
    try:
        meter.wait("loadgen", loadgen, duration + LOADGEN_GRACE + 15)
    finally:
        runner.stop(loadgen)
    used = meter.read()
    stop_sampling.set()
    thread.join()
    after = counters()
    wall, machine = used.pop("wall"), used.pop("machine")
    cpu = {name: seconds / wall for name, seconds in used.items()}
    cpu["machine"] = machine
    records = json.loads(out.read_text())["records"] if out.exists() else []
    result = summarize(records, requests, before, after, cpu, max(deferred, default=None))
    result["cpu_wall"] = wall
    if sampler is not None:
        result["deferred_samples_missed"] = len(missed)
        if missed:
            print(f"{len(missed)} samples of deferred requests failed, e.g. {missed[0]}")
    return result


def summarize(
    records: list[dict[str, Any]],
    requests: list[dict[str, Any]],
    before: dict[str, float],
    after: dict[str, float],
    cpu: dict[str, float],
    peak_deferred: float | None,
) -> dict[str, Any]:
    ok = [r for r in records if r["status"] == 200 and r["error"] is None]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    e2e = [r["e2e"] for r in ok if r["e2e"] is not None]
    end = max((r["due"] + r["e2e"] for r in ok), default=0.0)
    start = min((r["due"] for r in records), default=0.0)
    span = max(1e-9, end - start)
    tokens = sum(r["tokens"] for r in ok)
    errors: dict[str, int] = {}
    for r in records:
        if r not in ok:
            key = r["error"] or f"HTTP {r['status']}"
            errors[key] = errors.get(key, 0) + 1
    errors_missing = len(requests) - len(records)
    if errors_missing:
        errors["not sent"] = errors_missing
    return {
        "requests": len(requests),
        "ok": len(ok),
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p95": percentile(ttft, 0.95),
        "ttft_p99": percentile(ttft, 0.99),
        "ttft_mean": statistics.fmean(ttft) if ttft else None,
        "e2e_p50": percentile(e2e, 0.5),
        "e2e_p99": percentile(e2e, 0.99),
        "goodput_rps": len(ok) / span,
        "goodput_tps": tokens / span,
        "over_dispatch": after.get("deferred", 0) - before.get("deferred", 0),
        "peak_deferred": peak_deferred,
        "cpu": cpu,
        "ttft_all": ttft,
    }


def wait_idle(counters: Callable[[], dict[str, float]], seconds: float = 30.0) -> None:
    """Block until no server has a request running or waiting."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        state = counters()
        if state.get("busy", 0) == 0 and state.get("waiting", 0) == 0:
            return
        time.sleep(0.1)


def sweep(
    policies: Sequence[Policy],
    upstreams: Sequence[Upstream],
    work: Path,
    *,
    loads: Sequence[float],
    capacity: float,
    schedule: Callable[[float, int], list[dict[str, Any]]],
    counters: Callable[[], dict[str, float]],
    server_pids: list[int],
    sampler: Callable[[], float] | None = None,
) -> list[dict[str, Any]]:
    """Every policy at every load: start the policy, send it `schedule(rate, load index)` of
    each load (a fraction of `capacity` req/s), wait until the servers are idle; one result
    per (policy, load). With a `sampler`, over-dispatch is its sampled peak, not a count."""
    runs = []
    for policy in policies:
        with procs.Procs(work / "logs") as runner:
            front = start_policy(runner, policy, upstreams, work)
            for index, load in enumerate(loads):
                result = run_load(
                    runner,
                    front,
                    schedule(load * capacity, index),
                    path="/completion",
                    work=work,
                    counters=counters,
                    watch_pids={"proxy": front.pids, "servers": server_pids},
                    sampler=sampler,
                )
                wait_idle(counters)
                if sampler is not None:
                    result["over_dispatch"] = None
                result.update(policy=policy.name, kind=policy.kind, load=load, rate=load * capacity)
                runs.append(result)
                print(sweep_line(result), flush=True)
        time.sleep(0.3)
    return runs


def sweep_line(result: dict[str, Any]) -> str:
    """One run of a sweep, as a line of progress."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    return (
        f"  {result['policy']:<28} load {result['load']:>4.0%}: ttft p50 {ms(result['ttft_p50'])} "
        f"p99 {ms(result['ttft_p99'])} ms, e2e p99 {ms(result['e2e_p99'])} ms, "
        f"{result['goodput_rps']:.1f} req/s, over-dispatch {result['over_dispatch']}, "
        f"errors {result['errors']}, cpu {result['cpu']}"
    )
