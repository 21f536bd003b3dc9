"""Scenario 3: what the proxy itself costs, against a fast upstream that never waits.

Targets: direct to the upstream (the floor), Rower, nginx and HAProxy, each alone on the same
upstream (`bench.fast_upstream`, 256 slots). Measured: time to first byte at concurrency 1 and
64 (closed loop; added latency = proxy minus direct), SSE token events relayed per second and
per CPU-second of the proxy process, and requests per second for small JSON answers (wrk when
installed, else the Python load generator).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from bench import procs
from bench.baselines import haproxy, nginx
from bench.scheduling import Front, Policy, Upstream, percentile, start_policy

SLOTS = 256
TARGETS = (
    Policy("direct", "direct"),
    Policy("Rower", "rower", 1000),
    Policy("nginx", "nginx-rr"),
    Policy("HAProxy", "haproxy"),
)


def closed(
    runner: procs.Procs, url: str, concurrency: int, count: int, body: dict[str, Any], work: Path
) -> list[dict[str, Any]]:
    out = work / f"closed-{time.monotonic_ns()}.json"
    proc = runner.python(
        "loadgen",
        "bench.loadgen",
        "closed",
        url,
        str(concurrency),
        str(count),
        str(out),
        "--body",
        json.dumps(body),
    )
    try:
        proc.wait(180)
    finally:
        runner.stop(proc)
    return list(json.loads(out.read_text())["records"]) if out.exists() else []


def wrk_rps(url: str, work: Path, seconds: int) -> float | None:
    binary = shutil.which("wrk")
    if binary is None:
        return None
    script = work / "post.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        'wrk.body = \'{"prompt": "hi", "n_predict": 1, "stream": false}\'\n'
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    done = subprocess.run(
        [binary, "-t1", "-c64", f"-d{seconds}s", "-s", str(script), url],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    found = re.search(r"Requests/sec:\s*([\d.]+)", done.stdout)
    return float(found.group(1)) if found else None


def run(out: Path, *, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Measure every target; `smoke` = only direct and Rower, tiny counts."""
    work = out / "work" / "proxy"
    work.mkdir(parents=True, exist_ok=True)
    n1, n64 = (50, 128) if smoke else (300, 1500) if quick else (2000, 6000)
    streams, events = (4, 100) if smoke else (32, 1000) if quick else (64, 4000)
    wrk_seconds = 1 if smoke else 2 if quick else 6
    targets = TARGETS[:2] if smoke else TARGETS
    rows: list[dict[str, Any]] = []
    with procs.Procs(work / "logs") as runner:
        port = procs.free_port()
        upstream = runner.python(
            "fast-upstream", "bench.fast_upstream", str(port), str(SLOTS), port=port
        )
        upstreams = [Upstream(f"127.0.0.1:{port}", SLOTS)]
        for target in targets:
            if target.kind.startswith("nginx") and nginx.binary() is None:
                continue
            if target.kind == "haproxy" and haproxy.binary() is None:
                continue
            with procs.Procs(work / "logs") as front_runner:
                if target.kind == "direct":
                    front = Front(f"http://127.0.0.1:{port}", [upstream.pid])
                else:
                    front = start_policy(front_runner, target, upstreams, work)
                url = front.url + "/completion"
                first = {"prompt": "hi", "n_predict": 1, "stream": True}
                row: dict[str, Any] = {"target": target.name}
                closed(front_runner, url, 4, 50, first, work)  # warm connections
                for concurrency, count in ((1, n1), (64, n64)):
                    records = closed(front_runner, url, concurrency, count, first, work)
                    ttfb = [r["ttft"] for r in records if r["ttft"] is not None and not r["error"]]
                    row[f"ttfb_c{concurrency}_p50"] = percentile(ttfb, 0.5)
                    row[f"ttfb_c{concurrency}_p99"] = percentile(ttfb, 0.99)
                    row[f"errors_c{concurrency}"] = sum(1 for r in records if r["error"])
                cpu0 = sum(procs.cpu_seconds(p) for p in front.pids)
                started = time.monotonic()
                body = {"prompt": "hi", "n_predict": events, "stream": True}
                records = closed(front_runner, url, streams, streams, body, work)
                wall = time.monotonic() - started
                cpu = sum(procs.cpu_seconds(p) for p in front.pids) - cpu0
                relayed = sum(r["tokens"] for r in records)
                row["sse_events"] = relayed
                row["sse_events_per_s"] = relayed / wall
                row["sse_proxy_cpu"] = cpu / wall
                row["sse_events_per_cpu_s"] = relayed / cpu if cpu > 0 else None
                cpu0 = sum(procs.cpu_seconds(p) for p in front.pids)
                started = time.monotonic()
                row["json_rps"] = wrk_rps(url, work, wrk_seconds)
                wall = time.monotonic() - started
                row["json_proxy_cpu"] = (
                    sum(procs.cpu_seconds(p) for p in front.pids) - cpu0
                ) / wall
                rows.append(row)
                print(f"  {row}", flush=True)
    direct = rows[0]
    for row in rows:
        for c in (1, 64):
            for q in ("p50", "p99"):
                key = f"ttfb_c{c}_{q}"
                if row[key] is not None and direct[key] is not None:
                    row[f"added_c{c}_{q}"] = row[key] - direct[key]
    results = {"scenario": "proxy", "rows": rows, "streams": streams, "events_per_stream": events}
    (out / "proxy.json").write_text(json.dumps(results, indent=1))
    return results
