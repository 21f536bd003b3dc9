"""The report: markdown tables, matplotlib plots and a verdict on every target.

Reads the JSON files the scenarios wrote into the results directory and writes `REPORT.md` and
`*.png` next to them, so a report can be regenerated without running anything:
`python -m bench.report bench/results`.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

ROWER_KINDS = ("rower",)


def ms(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value * 1000:.{digits}f}"


def load(out: Path, name: str) -> dict[str, Any] | None:
    path = out / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def scheduling_table(data: dict[str, Any]) -> list[str]:
    lines = [
        "| policy | load | req | TTFT p50 ms | TTFT p99 ms | E2E p50 ms | E2E p99 ms "
        "| goodput req/s | tokens/s | over-dispatch | errors | proxy CPU | machine CPU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for run in sorted(data["runs"], key=lambda r: (r["load"], r["policy"])):
        over = run["over_dispatch"]
        if over is None:
            over = run.get("peak_deferred")
            over = "-" if over is None else f"peak {over:.0f}"
            if run.get("deferred_samples_missed"):
                over += f" ({run['deferred_samples_missed']} samples missed)"
        else:
            over = f"{over:.0f}"
        lines.append(
            f"| {run['policy']} | {run['load']:.0%} | {run['requests']} | {ms(run['ttft_p50'])} "
            f"| {ms(run['ttft_p99'])} | {ms(run['e2e_p50'])} | {ms(run['e2e_p99'])} "
            f"| {run['goodput_rps']:.2f} | {run['goodput_tps']:.0f} | {over} | {run['errors']} "
            f"| {run['cpu'].get('proxy', 0):.0%} | {run['cpu'].get('machine', 0):.0%} |"
        )
    return lines


def scheduling_plot(data: dict[str, Any], out: Path, name: str) -> list[str]:
    policies = sorted({r["policy"] for r in data["runs"]})
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for policy in policies:
        runs = sorted((r for r in data["runs"] if r["policy"] == policy), key=lambda r: r["load"])
        loads = [r["load"] * 100 for r in runs]
        style = "-o" if "Rower" in policy or policy == "ideal" else "--."
        axes[0].plot(loads, [(r["ttft_p99"] or 0) * 1000 for r in runs], style, label=policy)
        axes[1].plot(loads, [(r["e2e_p99"] or 0) * 1000 for r in runs], style, label=policy)
        axes[2].plot(loads, [r["goodput_tps"] for r in runs], style, label=policy)
    axes[0].set_title("TTFT p99 (ms, log)")
    axes[0].set_yscale("log")
    axes[1].set_title("E2E p99 (ms, log)")
    axes[1].set_yscale("log")
    axes[2].set_title("goodput (tokens/s)")
    for axis in axes:
        axis.set_xlabel("offered load (% of capacity)")
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=90)
    plt.close(fig)
    return [f"![{name}]({name}.png)"]


def targets(
    sim: dict[str, Any] | None, proxy: dict[str, Any] | None, scale: dict[str, Any] | None
) -> list[str]:
    rows = ["| target | measured | met? |", "|---|---|---|"]

    def row(target: str, measured: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        rows.append(f"| {target} | {measured} | {verdict} |")

    if sim:
        rower = [r for r in sim["runs"] if r["kind"] == "rower"]
        over = {f"{r['policy']} @{r['load']:.0%}": r["over_dispatch"] for r in rower}
        row(
            "zero over-dispatch (Rower sole client), every load",
            ", ".join(f"{k}: {v:.0f}" for k, v in over.items()),
            all(v == 0 for v in over.values()) if over else None,
        )
        for load_level in (0.8, 0.95):
            at = [r for r in sim["runs"] if abs(r["load"] - load_level) < 1e-6]
            ideal = next((r for r in at if r["kind"] == "ideal"), None)
            baselines = [r for r in at if r["kind"] not in ("ideal", "rower")]
            for run in (r for r in at if r["kind"] == "rower"):
                if ideal is None or run["ttft_p99"] is None or ideal["ttft_p99"] is None:
                    continue
                ratio = run["ttft_p99"] / ideal["ttft_p99"]
                best = min(
                    (b for b in baselines if b["ttft_p99"] is not None),
                    key=lambda b: b["ttft_p99"],
                    default=None,
                )
                ahead = best is None or run["ttft_p99"] < best["ttft_p99"]
                best_text = f"{best['policy']} {ms(best['ttft_p99'])} ms" if best else "-"
                row(
                    f"TTFT p99 within 10% of ideal and ahead of every baseline, "
                    f"{run['policy']} @{load_level:.0%}",
                    f"{ms(run['ttft_p99'])} ms vs ideal {ms(ideal['ttft_p99'])} ms "
                    f"({ratio - 1:+.0%}); best baseline: {best_text}",
                    ratio <= 1.10 and ahead,
                )
    if scale:
        row(
            "buffered request dispatched within 5 ms p99 of a slot freeing",
            f"p50 {scale['gap_p50_ms']:.2f} ms, p99 {scale['gap_p99_ms']:.2f} ms "
            f"({scale['dispatched']} dispatches, {scale['agents']} agents, "
            f"{scale['buffered']} buffered)",
            scale["gap_p99_ms"] <= 5.0,
        )
    if proxy:
        rower = next((r for r in proxy["rows"] if r["target"] == "Rower"), None)
        if rower:
            added = rower.get("added_c1_p50")
            row(
                "added first-byte latency p50 under 1 ms (concurrency 1)",
                f"{ms(added, 2)} ms (p99 {ms(rower.get('added_c1_p99'), 2)} ms)",
                None if added is None else added < 0.001,
            )
            per_core = rower.get("sse_events_per_cpu_s")
            row(
                "30,000+ SSE chunks/s on one core",
                "-" if per_core is None else f"{per_core:,.0f} events per CPU-second",
                None if per_core is None else per_core >= 30000,
            )
    if scale:
        row(
            f"{scale['agents']} agents + {scale['buffered']} buffered under 150 MB RSS",
            f"peak {scale['rss_peak_mb']:.0f} MB",
            scale["rss_peak_mb"] < 150,
        )
        picks = scale["pick"]
        first, last = picks[0], picks[-1]
        growth = last["pick_us"] / first["pick_us"]
        size_growth = last["upstreams"] / first["upstreams"]
        row(
            "picking an upstream in O(log n) or better",
            f"{first['pick_us']:.2f} µs at {first['upstreams']} upstreams, "
            f"{last['pick_us']:.2f} µs at {last['upstreams']} ({growth:.1f}x for "
            f"{size_growth:.0f}x upstreams)",
            growth < size_growth**0.5,
        )
    return rows


def write(out: Path, notes: str = "") -> Path:
    """Write REPORT.md (and the plots) from the JSON results in `out`."""
    sim, real = load(out, "sim"), load(out, "real")
    proxy, scale = load(out, "proxy"), load(out, "scale")
    meta = load(out, "meta") or {}
    lines = [
        "# Rower benchmark report",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} on {platform.node() or 'this machine'}: "
        f"{meta.get('cpus', '?')} CPUs, Python {sys.version.split()[0]}, "
        f"mode {meta.get('mode', '?')}, took {meta.get('seconds', 0) / 60:.1f} min. "
        "See docs/benchmarks.md for how to read it.",
        "",
        "## Targets",
        "",
        *targets(sim, proxy, scale),
        "",
    ]
    if notes:
        lines += [notes, ""]
    if sim:
        servers = ", ".join(f"{s['slots']} slots @{s['decode']:.0f} tok/s" for s in sim["servers"])
        lines += [
            "## 1. Scheduling on a simulated fleet",
            "",
            f"Servers: {servers}; decode slowdown {sim['servers'][0]['slowdown']} per extra busy "
            f"slot. Capacity {sim['capacity_rps']:.1f} req/s; {sim['duration_s']:.0f} s of Poisson "
            f"arrivals per run. Lengths (log-normal, tokens): prompt {sim['prompt']}, "
            f"generation {sim['generation']}. Over-dispatch = requests the sims had to defer.",
            "",
            *scheduling_table(sim),
            "",
            *scheduling_plot(sim, out, "sim"),
            "",
        ]
    if real:
        lines += ["## 2. Scheduling on real llama-servers", ""]
        if "skipped" in real:
            lines += [f"Skipped: {real['skipped']}.", ""]
        else:
            lines += [
                f"{real['servers']} llama-servers x {real['slots']} slots, tiny model on CPU. "
                f"Measured fleet speed {real['fleet_tokens_per_second']:.0f} tokens/s, capacity "
                f"{real['capacity_rps']:.2f} req/s; {real['duration_s']:.0f} s per run. "
                "Over-dispatch: peak of llama-server's `requests_deferred` gauge (sampled 10 Hz).",
                "",
                *scheduling_table(real),
                "",
                *scheduling_plot(real, out, "real"),
                "",
            ]
    if proxy:
        lines += [
            "## 3. Proxy cost",
            "",
            f"Fast upstream, closed loop. SSE: {proxy['streams']} streams x "
            f"{proxy['events_per_stream']} events. Added = target minus direct.",
            "",
            "| target | TTFB c1 p50 ms | c1 p99 | added c1 p50 | added c1 p99 | TTFB c64 p50 "
            "| c64 p99 | added c64 p50 | SSE events/s | proxy CPU | events per CPU-s "
            "| JSON req/s (wrk c64) | proxy CPU |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in proxy["rows"]:
            per_cpu = r.get("sse_events_per_cpu_s")
            rps = r.get("json_rps")
            lines.append(
                f"| {r['target']} | {ms(r['ttfb_c1_p50'], 2)} | {ms(r['ttfb_c1_p99'], 2)} "
                f"| {ms(r.get('added_c1_p50'), 2)} | {ms(r.get('added_c1_p99'), 2)} "
                f"| {ms(r['ttfb_c64_p50'], 1)} | {ms(r['ttfb_c64_p99'], 1)} "
                f"| {ms(r.get('added_c64_p50'), 1)} | {r['sse_events_per_s']:,.0f} "
                f"| {r['sse_proxy_cpu']:.0%} | {'-' if per_cpu is None else f'{per_cpu:,.0f}'} "
                f"| {'-' if rps is None else f'{rps:,.0f}'} | {r['json_proxy_cpu']:.0%} |"
            )
        fig, axis = plt.subplots(figsize=(7, 4))
        names = [r["target"] for r in proxy["rows"]]
        axis.bar(names, [(r["ttfb_c1_p50"] or 0) * 1000 for r in proxy["rows"]], label="p50")
        axis.bar(
            names,
            [((r["ttfb_c1_p99"] or 0) - (r["ttfb_c1_p50"] or 0)) * 1000 for r in proxy["rows"]],
            bottom=[(r["ttfb_c1_p50"] or 0) * 1000 for r in proxy["rows"]],
            alpha=0.4,
            label="p99",
        )
        axis.set_ylabel("time to first byte, concurrency 1 (ms)")
        axis.legend()
        fig.tight_layout()
        fig.savefig(out / "proxy.png", dpi=90)
        plt.close(fig)
        lines += ["", "![proxy](proxy.png)", ""]
    if scale:
        lines += [
            "## 4. Scale",
            "",
            f"{scale['agents']} fake agents reporting every second, {scale['buffered']} requests "
            f"buffered (reached {scale['buffered_reached']}).",
            "",
            "| measure | value |",
            "|---|---|",
            "| RSS idle / with agents / peak with buffer / draining "
            f"| {scale['rss_idle_mb']:.0f} / "
            f"{scale['rss_agents_mb']:.0f} / {scale['rss_peak_mb']:.0f} / "
            f"{scale['rss_drain_mb']:.0f} MB |",
            f"| CPU holding the buffer (agents reporting) | {scale['hold_cpu']:.0%} of a core |",
            f"| CPU draining through one 1-slot upstream | {scale['drain_cpu']:.0%} of a core |",
            f"| slot freed -> next buffered request at the upstream | p50 {scale['gap_p50_ms']:.2f}"
            f" ms, p99 {scale['gap_p99_ms']:.2f} ms, max {scale['gap_max_ms']:.2f} ms "
            f"({scale['dispatched']} dispatches) |",
            "",
            "| upstreams | `Fleet.pick` µs | request_slot + release µs |",
            "|---|---|---|",
            *(
                f"| {p['upstreams']} | {p['pick_us']:.2f} | {p['cycle_us']:.2f} |"
                for p in scale["pick"]
            ),
            "",
        ]
        fig, axis = plt.subplots(figsize=(6, 4))
        sizes = [p["upstreams"] for p in scale["pick"]]
        axis.loglog(sizes, [p["pick_us"] for p in scale["pick"]], "-o", label="pick")
        axis.loglog(sizes, [p["cycle_us"] for p in scale["pick"]], "-o", label="request+release")
        axis.set_xlabel("upstreams")
        axis.set_ylabel("µs")
        axis.grid(alpha=0.3)
        axis.legend()
        fig.tight_layout()
        fig.savefig(out / "scale.png", dpi=90)
        plt.close(fig)
        lines += ["![scale](scale.png)", ""]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")))
