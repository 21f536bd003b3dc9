"""Scenario 3b: what the proxy costs in front of real llama-servers (issue 12's measurements).

The fast upstream of scenario 3 writes a whole stream in a few large writes; llama-server writes
one small event per token, so the proxy reads and writes once per token too. This scenario puts
direct, Rower and nginx (kept-alive upstreams) in front of the same real llama-server (32 slots,
the tiny model), in interleaved rounds (direct, Rower, nginx, direct, ...); medians over rounds:

- time to first byte at concurrency 1 of a one-token streamed completion (added = minus direct);
- `streams` concurrent streamed completions of `events` tokens each: tokens/s through the front
  (ratio to direct) and the front's CPU per 1,000 relayed events;
- `GET /health` with wrk at 64 connections: requests/s (ratio to nginx), and the front's CPU
  per request.

    python -m bench.scenario_proxy_real OUT_DIR [--quick] [--rounds N] [--profile SECONDS]

`--profile` also runs py-spy on the balancer during one extra Rower round (streams, then
/health) and writes flame graphs (SVG) and py-spy's raw samples next to the results.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.scenario_proxy import closed
from bench.scheduling import Front, Policy, Upstream, percentile, start_policy

SLOTS = 32
SLOT_CONTEXT = 512
TARGETS = (
    Policy("direct", "direct"),
    Policy("Rower", "rower", 1000),
    Policy("nginx", "nginx-rr"),
    Policy("Rower, each token as it comes", "rower", 1000, flags=("--stream-flush-interval", "0")),
)


def wrk_get(url: str, seconds: int) -> tuple[float | None, int]:
    """Requests/s and non-2xx/socket errors of wrk GETting `url` at 64 connections."""
    binary = shutil.which("wrk")
    if binary is None:
        return None, 0
    done = subprocess.run(
        [binary, "-t1", "-c64", f"-d{seconds}s", url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    found = re.search(r"Requests/sec:\s*([\d.]+)", done.stdout)
    errors = sum(
        int(n)
        for n in re.findall(
            r"(?:Non-2xx or 3xx responses|connect|read|write|timeout) (\d+)", done.stdout
        )
    )
    return (float(found.group(1)) if found else None), errors


def kernel_seconds(pid: int) -> float:
    """System CPU time of a process: on loopback, a write's cost includes delivering it."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[12]) / procs.CLOCK_TICKS


def measure(
    runner: procs.Procs,
    front: Front,
    work: Path,
    *,
    n1: int,
    streams: int,
    events: int,
    wrk_seconds: int,
) -> dict[str, Any]:
    """One round on one front."""
    url = front.url + "/completion"
    one = {"prompt": "hi", "n_predict": 1, "stream": True, "cache_prompt": False}
    closed(runner, url, 4, 16, one, work)  # warm
    records = closed(runner, url, 1, n1, one, work)
    ttfb = [r["ttft"] for r in records if r["ttft"] is not None and not r["error"]]
    whole = [r["e2e"] for r in records if r["e2e"] is not None and not r["error"]]
    row: dict[str, Any] = {
        "ttfb_c1_p50": percentile(ttfb, 0.5),
        "ttfb_c1_p99": percentile(ttfb, 0.99),
        "e2e_c1_p50": percentile(whole, 0.5),
        "errors": sum(1 for r in records if r["error"]),
    }
    body = {"prompt": "Once upon a time", "n_predict": events, "stream": True, "ignore_eos": True}
    cpu0 = sum(procs.cpu_seconds(p) for p in front.pids)
    kernel0 = sum(kernel_seconds(p) for p in front.pids)
    started = time.monotonic()
    records = closed(runner, url, streams, streams, body, work)
    wall = time.monotonic() - started
    cpu = sum(procs.cpu_seconds(p) for p in front.pids) - cpu0
    row["front_kernel_share"] = (
        (sum(kernel_seconds(p) for p in front.pids) - kernel0) / cpu if cpu > 0 else None
    )
    relayed = sum(r["tokens"] for r in records)
    row["errors"] += sum(1 for r in records if r["error"])
    row["sse_events"] = relayed
    row["tokens_per_s"] = relayed / wall
    reads = sum(r.get("reads", 0) for r in records)
    row["events_per_client_read"] = relayed / reads if reads else None
    gaps = [r["longest_gap"] for r in records if r.get("reads", 0) > 1]
    row["longest_gap_p50_ms"] = 1000 * statistics.median(gaps) if gaps else None
    ends = [r["e2e"] for r in records if r["e2e"] is not None and not r["error"]]
    row["stream_e2e_p50"] = percentile(ends, 0.5)
    row["front_cpu_ms_per_1000_events"] = 1000 * cpu / relayed * 1000 if relayed else None
    cpu0 = sum(procs.cpu_seconds(p) for p in front.pids)
    started = time.monotonic()
    rps, errors = wrk_get(front.url + "/health", wrk_seconds)
    wall = time.monotonic() - started
    row["health_rps"] = rps
    row["health_errors"] = errors
    cpu = sum(procs.cpu_seconds(p) for p in front.pids) - cpu0
    row["health_front_cpu"] = cpu / wall
    # The stable figure: requests/s move with what saturates first on 2 cores (the front, wrk
    # or llama-server), the front's CPU per request with the front's own code.
    row["health_front_cpu_us_per_request"] = 1e6 * cpu / (rps * wall) if rps else None
    return row


def profile(
    runner: procs.Procs, front: Front, work: Path, out: Path, *, seconds: int, streams: int
) -> None:
    """Flame graphs of the balancer relaying streams, and answering /health under wrk: an SVG
    and py-spy's collapsed stacks (`hot_list` reads them) for each."""
    spy = Path(sys.executable).with_name("py-spy")
    url = front.url + "/completion"
    body = {"prompt": "Once upon a time", "n_predict": 100000, "stream": True, "ignore_eos": True}
    for name in ("relay", "health"):
        recorders = [
            subprocess.Popen(
                [
                    str(spy),
                    "record",
                    "-p",
                    str(front.pids[0]),
                    "-d",
                    str(seconds),
                    "-r",
                    "200",
                    "-f",
                    fmt,
                    "-o",
                    str(out / f"profile-{name}.{suffix}"),
                    "--nonblocking",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            for fmt, suffix in (("flamegraph", "svg"), ("raw", "txt"))
        ]
        if name == "relay":
            # Streams longer than the recording, cut by their deadline.
            load = runner.python(
                "loadgen",
                "bench.loadgen",
                "closed",
                url,
                str(streams),
                str(streams),
                str(work / "profile.json"),
                "--body",
                json.dumps(body),
                "--deadline",
                str(seconds + 2),
            )
            for recorder in recorders:
                recorder.wait(seconds + 30)
            runner.stop(load)
        else:
            wrk_get(front.url + "/health", seconds + 1)
            for recorder in recorders:
                recorder.wait(seconds + 30)


def hot_list(collapsed: Path, top: int = 15) -> list[tuple[str, float, float]]:
    """(function, % of samples on top of the stack, % anywhere in it) from py-spy's raw output."""
    own: dict[str, int] = {}
    anywhere: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue  # py-spy's own messages, if any, among the stacks
        n = int(count)
        total += n
        frames = [re.sub(r" \((.*/)?([^/]*?):\d+\)$", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            anywhere[frame] = anywhere.get(frame, 0) + n
    ranked = sorted(own, key=own.__getitem__, reverse=True)[:top]
    return [(f, 100 * own[f] / total, 100 * anywhere[f] / total) for f in ranked]


def summarize(rounds: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Medians over rounds, per target, and ratios to direct and nginx within each round."""
    summary: dict[str, dict[str, Any]] = {}
    for target in rounds[0]:
        keys = rounds[0][target].keys()
        summary[target] = {}
        for key in keys:
            values = [r[target][key] for r in rounds if r[target].get(key) is not None]
            summary[target][key] = statistics.median(values) if values else None
        summary[target]["errors"] = sum(r[target]["errors"] for r in rounds)
        summary[target]["health_errors"] = sum(r[target]["health_errors"] for r in rounds)

    def ratio(target: str, key: str, against: str, minus: bool = False) -> float | None:
        values = []
        for r in rounds:
            a, b = r.get(target, {}).get(key), r.get(against, {}).get(key)
            if a is not None and b:
                values.append(a - b if minus else a / b)
        return statistics.median(values) if values else None

    for target in summary:
        summary[target]["added_ttfb_c1_p50"] = ratio(target, "ttfb_c1_p50", "direct", minus=True)
        summary[target]["tokens_per_s_vs_direct"] = ratio(target, "tokens_per_s", "direct")
        summary[target]["health_rps_vs_nginx"] = ratio(target, "health_rps", "nginx")
    return summary


def run(
    out: Path,
    *,
    quick: bool = False,
    smoke: bool = False,
    rounds: int = 3,
    profile_seconds: int = 0,
    flush_intervals: tuple[int, ...] = (),
) -> dict[str, Any]:
    work = out / "work" / "proxy-real"
    work.mkdir(parents=True, exist_ok=True)
    found = llama_servers.tools(build=False)
    if found is None:
        raise SystemExit("no llama-server: run scripts/build_llama_server.py first")
    server, model = found
    n1, events, wrk_seconds = (20, 30, 1) if smoke else (100, 200, 2) if quick else (300, 400, 4)
    rounds = 1 if smoke else rounds
    streams = SLOTS
    measured: list[dict[str, dict[str, Any]]] = []
    with procs.Procs(work / "logs") as runner:
        servers = llama_servers.start(
            runner, server, model, count=1, slots=SLOTS, slot_context=SLOT_CONTEXT
        )
        upstreams = [Upstream(s.address, s.slots) for s in servers]
        fronts: dict[str, Front] = {}
        more = tuple(
            Policy(
                f"Rower, flush {ms} ms", "rower", 1000, flags=("--stream-flush-interval", str(ms))
            )
            for ms in flush_intervals
        )
        for target in TARGETS + more:
            if target.kind == "direct":
                fronts[target.name] = Front(servers[0].url, [servers[0].pid])
            elif not target.kind.startswith("nginx") or shutil.which("nginx") is not None:
                fronts[target.name] = start_policy(runner, target, upstreams, work)
        for number in range(rounds):
            one: dict[str, dict[str, Any]] = {}
            for name, front in fronts.items():
                one[name] = measure(
                    runner,
                    front,
                    work,
                    n1=n1,
                    streams=streams,
                    events=events,
                    wrk_seconds=wrk_seconds,
                )
                print(f"  round {number + 1} {name}: {one[name]}", flush=True)
            measured.append(one)
        if profile_seconds and "Rower" in fronts:
            profile(runner, fronts["Rower"], work, out, seconds=profile_seconds, streams=streams)
    results = {
        "scenario": "proxy-real",
        "slots": SLOTS,
        "streams": streams,
        "events_per_stream": events,
        "rounds": measured,
        "summary": summarize(measured),
    }
    (out / "proxy-real.json").write_text(json.dumps(results, indent=1))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS")
    parser.add_argument(
        "--flush",
        type=int,
        action="append",
        default=[],
        metavar="MS",
        help="also a Rower with --stream-flush-interval MS (repeatable)",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(
        args.out,
        quick=args.quick,
        rounds=args.rounds,
        profile_seconds=args.profile,
        flush_intervals=tuple(args.flush),
    )
    for target, row in results["summary"].items():
        print(target, json.dumps(row))


if __name__ == "__main__":
    main()
