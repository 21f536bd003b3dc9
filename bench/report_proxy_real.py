"""The report's section on the proxy in front of a real llama-server (`scenario_proxy_real`):
table, plot, and issue 12's targets measured there.

Every figure is a median over the scenario's interleaved rounds; ratios (to direct, to nginx)
are taken within a round first, so the machine's drift between rounds cancels out.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

TITLE = "## 3b. In front of a real llama-server"


def _ms(seconds: float | None, digits: int = 2) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.{digits}f}"


def _num(value: float | None, digits: int = 0, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def targets(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """(target, measured, met) for Rower with its defaults."""
    rower = data["summary"].get("Rower")
    if rower is None:
        return []
    nginx = data["summary"].get("nginx", {})
    added = rower.get("added_ttfb_c1_p50")
    tokens = rower.get("tokens_per_s_vs_direct")
    small = rower.get("health_rps_vs_nginx")
    relay = rower.get("front_cpu_ms_per_1000_events")
    errors = rower.get("errors", 0) + rower.get("health_errors", 0)
    per_request = rower.get("health_front_cpu_us_per_request")
    nginx_per_request = nginx.get("health_front_cpu_us_per_request")
    return [
        (
            "added TTFB p50 ≤ 0.5 ms at concurrency 1, llama-server",
            f"{_ms(added)} ms (llama-server's own first byte moves by about 1 ms between rounds)",
            None if added is None else added <= 0.0005,
        ),
        (
            "tokens/s of 32 streams ≥ 0.95x direct",
            f"{_num(tokens, 2, 'x')}",
            None if tokens is None else tokens >= 0.95,
        ),
        (
            "`GET /health` req/s ≥ 1/4 of nginx's",
            f"{_num(small, 2, 'x')} ({_num(per_request, 0)} µs of Rower's CPU a request, "
            f"nginx {_num(nginx_per_request, 0)})",
            None if small is None else small >= 0.25,
        ),
        (
            "relay ≤ 15 ms of balancer CPU per 1,000 SSE events",
            f"{_num(relay, 1)} ms (nginx {_num(nginx.get('front_cpu_ms_per_1000_events'), 1)})",
            None if relay is None else relay <= 15,
        ),
        ("zero errors through Rower", f"{errors}", errors == 0),
    ]


def section(data: dict[str, Any], out: Path) -> list[str]:
    """The section's lines; writes `proxy-real.png` into `out`."""
    summary = data["summary"]
    lines = [
        TITLE,
        "",
        f"One llama-server (tiny model, {data['slots']} slots); the fronts "
        f"({'; '.join(summary)}) in {len(data['rounds'])} interleaved rounds. Streams: "
        f"{data['streams']} concurrent, {data['events_per_stream']} tokens each. Small requests: "
        "`GET /health`, wrk at 64 connections. The front's CPU per request is the figure that "
        "follows the front's code; requests/s follow what saturates first on the machine. For "
        "direct the front is llama-server itself; its errors are the load generator reusing "
        "connections llama-server closed after a stream (what Rower's upstream pool avoids).",
        "",
        "| target | TTFB c1 p50 ms (added) | tokens/s (vs direct) | front CPU per 1,000 events "
        "(kernel) | `/health` req/s (vs nginx) | front CPU per `/health` request | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, row in summary.items():
        kernel = row.get("front_kernel_share")
        lines.append(
            f"| {name} | {_ms(row.get('ttfb_c1_p50'))} ({_ms(row.get('added_ttfb_c1_p50'))}) "
            f"| {_num(row.get('tokens_per_s'))} ({_num(row.get('tokens_per_s_vs_direct'), 2)}x) "
            f"| {_num(row.get('front_cpu_ms_per_1000_events'), 1)} ms "
            f"({_num(None if kernel is None else 100 * kernel, 0)}%) "
            f"| {_num(row.get('health_rps'))} ({_num(row.get('health_rps_vs_nginx'), 2)}x) "
            f"| {_num(row.get('health_front_cpu_us_per_request'), 0)} µs "
            f"| {row.get('errors', 0) + row.get('health_errors', 0)} |"
        )
    lines += ["", *_plot(summary, out), ""]
    return lines


def _plot(summary: dict[str, dict[str, Any]], out: Path) -> list[str]:
    fronts = [name for name in summary if name != "direct"]
    fig, (relay, small) = plt.subplots(1, 2, figsize=(10, 4))
    relay.bar(fronts, [summary[f].get("front_cpu_ms_per_1000_events") or 0 for f in fronts])
    relay.axhline(15, color="grey", linestyle="--", label="target")
    relay.set_ylabel("front CPU ms per 1,000 SSE events")
    relay.legend()
    small.bar(fronts, [summary[f].get("health_front_cpu_us_per_request") or 0 for f in fronts])
    small.set_ylabel("front CPU µs per GET /health")
    for axis in (relay, small):
        axis.tick_params(axis="x", labelrotation=20)
        axis.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(out / "proxy-real.png", dpi=90)
    plt.close(fig)
    return ["![proxy-real](proxy-real.png)"]
