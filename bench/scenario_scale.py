"""Scenario 4: scale. 1,000 agents reporting every second plus 10,000 buffered requests.

Through a real balancer: its RSS and CPU while 1,000 fake agents report and 10,000 requests wait
for a slot; then one real (fast) upstream with one slot registers, and the buffer drains through
it. The upstream records the gap between the end of each response and the arrival of the next
request: the time from a slot freeing to the next buffered request being dispatched (two
loopback hops included). In process: time for `Fleet.pick` with 10 to 10,000 upstreams.
"""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench import procs
from bench.scheduling import get_json, percentile
from rower.balancer.fleet import Fleet
from rower.status import StatusUpdate


def requests_buffered(management: int) -> int:
    """The balancer's buffer length, from the first event of its agents SSE stream."""
    url = f"http://127.0.0.1:{management}/api/v1/agents/stream"
    with urllib.request.urlopen(url, timeout=10) as stream:
        for raw in stream:
            line = raw.decode().strip()
            if line.startswith("data:"):
                return int(json.loads(line[5:])["requests_buffered"])
    return -1


def pick_micro(sizes: tuple[int, ...] = (10, 100, 1000, 10000)) -> list[dict[str, float]]:
    """Mean time of `Fleet.pick`, and of a request_slot + release cycle, by fleet size.

    Every upstream but the last has its slots taken, the worst case for a scan.
    """
    rows = []
    for size in sizes:
        fleet = Fleet(max_buffered=10)
        for index in range(size):
            busy = 4 if index < size - 1 else 0
            status = StatusUpdate(
                external_llamacpp_addr=f"127.0.0.2:{10000 + index}",
                slots_idle=4 - busy,
                slots_processing=busy,
                slots_total=4,
            )
            fleet.report(f"agent-{index}", status, 0.0, 0.0)
        rounds = max(200, 200000 // size)
        started = time.perf_counter()
        for _ in range(rounds):
            fleet.pick(1.0)
        pick = (time.perf_counter() - started) / rounds
        started = time.perf_counter()
        for request_id in range(rounds):
            fleet.request_slot(request_id, 1.0)
            fleet.release(request_id, 1.0)
        cycle = (time.perf_counter() - started) / rounds
        rows.append({"upstreams": size, "pick_us": pick * 1e6, "cycle_us": cycle * 1e6})
    return rows


def run(out: Path, *, quick: bool = False, smoke: bool = False) -> dict[str, Any]:
    """Measure the balancer at scale; `quick` and `smoke` shrink the counts."""
    agents = 50 if smoke else 200 if quick else 1000
    buffered = 200 if smoke else 2000 if quick else 10000
    hold_seconds = 1 if smoke else 3 if quick else 10
    drain_seconds = 1 if smoke else 3 if quick else 8
    work = out / "work" / "scale"
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {"scenario": "scale", "agents": agents, "buffered": buffered}
    with procs.Procs(work / "logs") as runner:
        upstream_port = procs.free_port()
        upstream = runner.python(
            "fast-upstream", "bench.fast_upstream", str(upstream_port), "1", "2", port=upstream_port
        )
        management, proxy = procs.free_port(), procs.free_port()
        balancer = runner.start(
            "balancer-scale",
            procs.rower(
                "balancer",
                "--management-addr",
                f"127.0.0.1:{management}",
                "--reverseproxy-addr",
                f"127.0.0.1:{proxy}",
                "--max-buffered-requests",
                str(buffered * 2),
                "--buffered-request-timeout",
                "600000",
                # Every waiting request is an open client connection.
                "--max-client-connections",
                str(buffered * 2 + 1000),
                "--log-level",
                "warning",
                "--access-log",
                "off",  # as nginx's `access_log off` in the baselines
            ),
            port=proxy,
        )
        results["rss_idle_mb"] = procs.rss_mb(balancer.pid)
        span = hold_seconds + drain_seconds + 60
        runner.python(
            "fake-agents", "bench.fake_agents", str(management), str(agents), "1000", str(span)
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if len(get_json(f"http://127.0.0.1:{management}/api/v1/agents")["agents"]) >= agents:
                break
            time.sleep(0.5)
        results["rss_agents_mb"] = procs.rss_mb(balancer.pid)
        ramp = 5.0 * buffered / 10000
        schedule = {
            "url": f"http://127.0.0.1:{proxy}/completion",
            "deadline": span,
            "requests": [
                {
                    "at": ramp * i / buffered,
                    "body": {"prompt": "hi", "n_predict": 1, "stream": False},
                }
                for i in range(buffered)
            ],
        }
        (work / "schedule.json").write_text(json.dumps(schedule))
        runner.python(
            "loadgen", "bench.loadgen", "open", str(work / "schedule.json"), str(work / "out.json")
        )
        deadline = time.monotonic() + ramp + 30
        waiting = 0
        while time.monotonic() < deadline:
            waiting = requests_buffered(management)
            if waiting >= buffered:
                break
            time.sleep(0.5)
        results["buffered_reached"] = waiting
        cpu0 = procs.cpu_seconds(balancer.pid)
        rss = []
        started = time.monotonic()
        while time.monotonic() - started < hold_seconds:
            rss.append(procs.rss_mb(balancer.pid))
            time.sleep(0.5)
        results["hold_cpu"] = (procs.cpu_seconds(balancer.pid) - cpu0) / (
            time.monotonic() - started
        )
        results["rss_peak_mb"] = max(rss)
        spec = work / "agent.json"
        spec.write_text(
            json.dumps(
                {
                    "agents": [
                        {
                            "target": f"127.0.0.1:{upstream_port}",
                            "management": f"127.0.0.1:{management}",
                            "interval_ms": 1000,
                        }
                    ]
                }
            )
        )
        runner.python("real-agent", "bench.fleethost", str(spec))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if get_json(f"http://127.0.0.1:{upstream_port}/bench/gaps"):
                break
            time.sleep(0.05)
        cpu0 = procs.cpu_seconds(balancer.pid)
        started = time.monotonic()
        time.sleep(drain_seconds)
        results["drain_cpu"] = (procs.cpu_seconds(balancer.pid) - cpu0) / (
            time.monotonic() - started
        )
        results["rss_drain_mb"] = procs.rss_mb(balancer.pid)
        gaps = get_json(f"http://127.0.0.1:{upstream_port}/bench/gaps")[5:]
        results["dispatched"] = len(gaps)
        results["gap_p50_ms"] = (percentile(gaps, 0.5) or 0) * 1000
        results["gap_p99_ms"] = (percentile(gaps, 0.99) or 0) * 1000
        results["gap_max_ms"] = max(gaps, default=0) * 1000
        del upstream
    results["pick"] = pick_micro((10, 100) if smoke else (10, 100, 1000, 10000))
    (out / "scale.json").write_text(json.dumps(results, indent=1))
    print(f"  {results}", flush=True)
    return results
