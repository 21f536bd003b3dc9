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

from bench import report_proxy_real, report_unequal

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
    sim: dict[str, Any] | None,
    proxy: dict[str, Any] | None,
    scale: dict[str, Any] | None,
    affinity: dict[str, Any] | None = None,
    models: dict[str, Any] | None = None,
) -> list[str]:
    rows = ["| target | measured | met? |", "|---|---|---|"]

    def row(target: str, measured: str, met: bool | None) -> None:
        verdict = "n/a" if met is None else ("yes" if met else "**no**")
        rows.append(f"| {target} | {measured} | {verdict} |")

    if models and "medians" in models:
        for target, measured, met in models_targets(models):
            row(target, measured, met)

    if affinity and "medians" in affinity:
        for target, measured, met in affinity_targets(affinity):
            row(target, measured, met)

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


def percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def times(value: float | None) -> str:
    return "-" if value is None else f"×{value:.2f}"


CACHE_AWARE = "Rower cache-aware"
TWO_BALANCERS = "Rower cache-aware, 2 balancers alternating"


def affinity_targets(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets, as medians over repeats of ratios to the anchor of the same run."""
    found: list[tuple[str, str, bool | None]] = []
    by_cell: dict[str, dict[str, dict[str, Any]]] = {}
    for m in data["medians"]:
        by_cell.setdefault(m["cell"], {})[m["front"]] = m
    for cell, fronts in by_cell.items():
        mine = fronts.get(CACHE_AWARE)
        anchor = next((m for m in fronts.values() if m["kind"] == "haproxy-hash"), None)
        if mine and anchor:
            ratios = (mine["vs_anchor_reuse"], mine["vs_anchor_prefill_s"])
            p99 = mine["vs_anchor_e2e_p99"]
            found.append(
                (
                    f"cache-aware: reuse ≥, prefill ≤, e2e p99 ≤ the anchor's ({cell})",
                    f"reuse {percent(mine['reuse'])} vs {percent(anchor['reuse'])} "
                    f"({times(ratios[0])}), prefill {mine['prefill_s']:.1f} vs "
                    f"{anchor['prefill_s']:.1f} s ({times(ratios[1])}), e2e p99 "
                    f"{ms(mine['e2e_p99'])} vs {ms(anchor['e2e_p99'])} ms ({times(p99)})",
                    None
                    if None in (*ratios, p99)
                    else ratios[0] >= 1.0 and ratios[1] <= 1.0 and p99 <= 1.0,
                )
            )
        two = fronts.get(TWO_BALANCERS)
        if mine and two:
            ratio = two["vs_one_balancer_reuse"]
            found.append(
                (
                    f"two balancers, turns alternating: reuse ≥ 90% of one balancer's ({cell})",
                    f"{percent(two['reuse'])} vs {percent(mine['reuse'])} ({times(ratio)})",
                    None if ratio is None else ratio >= 0.9,
                )
            )
    return found


def affinity_section(data: dict[str, Any], out: Path) -> list[str]:
    """Section 5: one table per comparison (regime, API, variant) and one plot of all."""
    lines = ["## 5. Prompt-cache affinity on real llama-servers", ""]
    if "skipped" in data and "runs" not in data:
        return [*lines, f"Skipped: {data['skipped']}.", ""]
    lines += [
        f"{data['servers']} llama-servers x {data['slots']} slots, tiny model, `--cache-ram "
        f"{data['cache_ram_mib']}` MiB (each server keeps 4 conversations of ~3,000 "
        "tokens: 2 in its slots, 2 in host RAM; fewer under load, docs/routing.md). "
        "Multi-turn conversations, each a closed loop with think time, a new connection per "
        "request; reuse = Σ `cache_n` / Σ prompt tokens and prefill = Σ `prompt_ms`, from "
        "llama-server's own answers. *Bound*: the reuse if every turn found its "
        "conversation's previous turn cached. Ratios are to the anchor "
        "(HAProxy hashing the `X-Session-Id` header the client sends; no other front gets "
        "it) of the same repeat. Medians of "
        f"{data['repeats']} interleaved repeats (front order rotated); {data['seconds'] / 60:.1f}"
        " min. CPU: seconds per run (servers, the front's balancers, Rower's agents, the load "
        "generator). *Spread*: turns of the busiest server / the mean.",
        "",
    ]
    for name, why in data.get("skipped", {}).items():
        lines += [f"- Not run: {name}: {why}."]
    if data.get("skipped"):
        lines.append("")
    cells = {c["name"]: c for c in data["cells"]}
    for cell, spec in cells.items():
        work = spec["workload"]
        shared = f" after a shared {work['shared_tokens']}-token system prompt" * bool(
            work["shared_tokens"]
        )
        lines += [
            f"### {cell}",
            "",
            f"{work['conversations']} conversations: {work['private_tokens']}-token private "
            f"prefix{shared}, {work['user_tokens']}-token user messages, {work['n_predict']}-"
            f"token answers; each user thinks {work['think_s'][0]}-{work['think_s'][1]} s "
            f"(log-uniform, ±30% a turn) and makes {work['turns'][0]}-{work['turns'][1]} turns, "
            f"about {work['active_s']:.0f} s of them.",
            "",
            "| front | reuse | bound | prefill s | reuse / prefill / p99 vs anchor "
            "| E2E p50 ms | E2E p99 ms | TTFT p50 ms | TTFT p99 ms | spread | errors "
            "| CPU s: servers / front / agents / loadgen |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for m in (m for m in data["medians"] if m["cell"] == cell):
            cpu = " / ".join(
                "-" if m[f"cpu_{g}_s"] is None else f"{m[f'cpu_{g}_s']:.1f}"
                for g in ("servers", "front", "agents", "loadgen")
            )
            versus = " / ".join(
                times(m[f"vs_anchor_{k}"]) for k in ("reuse", "prefill_s", "e2e_p99")
            )
            spread = "-" if m["spread"] is None else f"{m['spread']:.2f}"
            lines.append(
                f"| {m['front']} | {percent(m['reuse'])} | {percent(m['reuse_bound'])} "
                f"| {m['prefill_s']:.1f} | {versus} | {ms(m['e2e_p50'])} | {ms(m['e2e_p99'])} "
                f"| {ms(m['ttft_p50'])} | {ms(m['ttft_p99'])} | {spread} | {m['errors']:.0f} "
                f"| {cpu} |"
            )
        lines.append("")
    lines += [*affinity_plot(data, out), ""]
    return lines


def affinity_plot(data: dict[str, Any], out: Path) -> list[str]:
    cells = [c["name"] for c in data["cells"]]
    fronts = list(dict.fromkeys(m["front"] for m in data["medians"]))
    measures = (
        ("reuse", "prompt-cache reuse (%; dashed: bound)", 100.0),
        ("prefill_s", "prefill work (s)", 1.0),
        ("e2e_p99", "E2E p99 (ms)", 1000.0),
    )
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    width = 0.8 / max(1, len(fronts))
    by_key = {(m["cell"], m["front"]): m for m in data["medians"]}
    for axis, (key, title, scale) in zip(axes, measures, strict=True):
        for index, front in enumerate(fronts):
            xs = [c + index * width for c in range(len(cells))]
            values = [(by_key.get((cell, front), {}).get(key) or 0) * scale for cell in cells]
            axis.bar(xs, values, width, label=front)
        if key == "reuse":
            for c, cell in enumerate(cells):
                bounds = [m["reuse_bound"] for m in data["medians"] if m["cell"] == cell]
                bound = max((b for b in bounds if b is not None), default=None)
                if bound is not None:
                    axis.hlines(bound * 100, c - width / 2, c + 0.8 - width / 2, "k", "dashed")
            axis.set_ylim(0, 100)
        axis.set_title(title)
        axis.set_xticks([c + 0.4 - width / 2 for c in range(len(cells))])
        axis.set_xticklabels([c.replace(", ", "\n", 1) for c in cells], fontsize=7)
        axis.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "affinity.png", dpi=90)
    plt.close(fig)
    return ["![affinity](affinity.png)"]


def id_slot_section(data: dict[str, Any]) -> list[str]:
    """Section 6: the experiment of bench/experiment_id_slot.py, one row per mode."""
    lines = [
        "## 6. Pinning `id_slot` against llama-server's own choice of slot",
        "",
        "One llama-server, 2 slots, `--cache-ram 6`; conversations as in section 5, sent "
        "straight to it. `server`: no `id_slot`; `pin-last`: each "
        "turn pinned to the slot that answered the conversation's previous turn; `pin-held`: "
        "pinned only while no other conversation has been answered from that slot since. "
        f"Medians of {data['repeats']} interleaved repeats (each repeat's value in brackets). "
        "Errors: turns that got no answer within the client's 120 s deadline.",
        "",
        "| workload | client | reuse | prefill s | E2E p50 ms | E2E p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in data["summary"]:
        each = ", ".join(percent(v) for v in row["reuse_all"])
        errors = sum(row["errors_all"])
        lines.append(
            f"| {row['workload']} | {row['mode']} | {percent(row['reuse'])} ({each}) "
            f"| {row['prefill_s']:.1f} | {ms(row['e2e_p50'])} | {ms(row['e2e_p99'])} "
            f"| {errors} in {len(row['errors_all'])} runs |"
        )
    return [*lines, ""]


MODELS_TARGET_RATIO = 1.2
"""B's TTFT p95 over A's burst may grow by 20% at most (the sims' and load generator's jitter
on a shared 2-core machine); the control shows what head-of-line blocking does."""


def _model_rows(data: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(m["fleet"], m["phase"]): m for m in data["medians"]}


def models_targets(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """A burst for model A does not move model B's TTFT (issue 10)."""
    a, b = data["models"]
    rows = _model_rows(data)
    alone, burst = rows.get(("per model", "alone")), rows.get(("per model", "burst"))
    if alone is None or burst is None:
        return []
    ratio = burst["ratio_window_ttft_p95"]
    control = rows.get(("one pool (control)", "burst"))
    versus = (
        ""
        if control is None or control["ratio_window_ttft_p95"] is None
        else f"; one pool (control): {times(control['ratio_window_ttft_p95'])}"
    )
    return [
        (
            f"a burst for model {a} does not move model {b}'s TTFT (p95 over the burst "
            f"≤ {MODELS_TARGET_RATIO:.1f}× alone)",
            f"{b} p95 {ms(alone[f'{b}_window_ttft_p95'])} ms alone, "
            f"{ms(burst[f'{b}_window_ttft_p95'])} ms during {a}'s burst ({times(ratio)}){versus}",
            None if ratio is None else ratio <= MODELS_TARGET_RATIO,
        )
    ]


def models_section(data: dict[str, Any], out: Path) -> list[str]:
    """Section 7: B's TTFT alone and during A's burst, per model and in one pool."""
    a, b = data["models"]
    shape = data["shape"]
    lines = [
        f"## 7. Several models: a burst for {a} and the TTFT of {b}",
        "",
        f"Two models, {data['servers_per_model']} `rower sim` servers x {data['slots']} slots "
        f"each ({data['decode']:.0f} tokens/s per slot, prefill {data['prefill']:.0f} tokens/s; "
        f"each model's servers in their own process), one balancer. {b}: streamed "
        f"`/completion` requests, Poisson at {data['b_load']:.0%} of its servers' capacity "
        f"({data['capacity_rps']:.1f} req/s), {shape['duration']:.0f} s per phase. *burst*: the "
        f"same arrivals of {b}, and {shape['burst']} requests for {a} at once at "
        f"{data['burst_at'] * shape['duration']:.1f} s ({shape['burst'] // data['slots'] // 2}x "
        f"its slots). *window*: {b}'s requests that arrived between {a}'s burst and the first "
        f"token of {a}'s last request (the same arrivals in both phases). *paired*: each of "
        f"{b}'s requests in the window during the burst against its twin alone (same arrival, "
        "same prompt), the p50 and p95 of TTFT burst / alone. Both phases run one after the "
        f"other on the same servers and balancer; medians of {shape['repeats']} repeats, "
        "ratios burst / alone of the same repeat.",
        "",
        *(f"- *{name}*: {why}." for name, why in data["fleets"].items()),
        "",
        f"| fleet | phase | {b} req | {b} TTFT p50 ms | p95 | p99 | window req | window p50 "
        f"| window p95 | window p50, p95 burst / alone | paired p50, p95 | {a} req "
        f"| {a} TTFT p50 ms | p95 | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in data["medians"]:
        errors = (m[f"{a}_errors"] or 0) + (m[f"{b}_errors"] or 0)
        lines.append(
            f"| {m['fleet']} | {m['phase']} | {m[f'{b}_requests']:.0f} "
            f"| {ms(m[f'{b}_ttft_p50'])} | {ms(m[f'{b}_ttft_p95'])} | {ms(m[f'{b}_ttft_p99'])} "
            f"| {m[f'{b}_window_requests'] or 0:.0f} | {ms(m[f'{b}_window_ttft_p50'])} "
            f"| {ms(m[f'{b}_window_ttft_p95'])} | {times(m.get('ratio_window_ttft_p50'))}, "
            f"{times(m.get('ratio_window_ttft_p95'))} | {times(m.get(f'{b}_paired_p50'))}, "
            f"{times(m.get(f'{b}_paired_p95'))} "
            f"| {m[f'{a}_requests'] or 0:.0f} | {ms(m[f'{a}_ttft_p50'])} "
            f"| {ms(m[f'{a}_ttft_p95'])} | {errors:.0f} |"
        )
    return [*lines, "", *models_plot(data, out), ""]


def models_plot(data: dict[str, Any], out: Path) -> list[str]:
    """B's TTFT per request against its arrival, alone and during A's burst (first repeat)."""
    a, b = data["models"]
    fleets = list(data["fleets"])
    fig, axes = plt.subplots(1, len(fleets), figsize=(7 * len(fleets), 4.5), squeeze=False)
    for axis, fleet in zip(axes[0], fleets, strict=True):
        runs = [r for r in data["runs"] if r["fleet"] == fleet and r["repeat"] == 0]
        for run in runs:
            points = run[b]["points"]
            style = {"alone": ("tab:gray", "o"), "burst": ("tab:red", "x")}[run["phase"]]
            axis.scatter(
                [due for due, _ in points],
                [ttft * 1000 for _, ttft in points],
                c=style[0],
                marker=style[1],
                s=18,
                label=f"{b}, {run['phase']}" + (f" (+{a}'s burst)" * (run["phase"] == "burst")),
            )
            if run["phase"] == "burst":
                start, end = run["window"]
                axis.axvspan(start, end, color="tab:red", alpha=0.08, label=f"{a}'s burst")
        axis.set_yscale("log")
        axis.set_title(f"{fleet}: {b}'s TTFT per request")
        axis.set_xlabel("arrival (s into the phase)")
        axis.set_ylabel("TTFT (ms, log)")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "models.png", dpi=90)
    plt.close(fig)
    return ["![models](models.png)"]


def key_section(key: dict[str, Any]) -> list[str]:
    """What the affinity key and the prefix memory cost (bench/scenario_key.py)."""
    rows = [f"| {name} | {us:.1f} |" for name, us in key["microseconds_median"].items()]
    return [
        "## Affinity key and prefix memory",
        "",
        f"A chat request of {key['conversation_bytes']:,} bytes ({key['head_bytes']:,} bytes of "
        f"conversation head, {key['blocks']} blocks of 512); medians of interleaved repeats in "
        "one process.",
        "",
        "| work | µs |",
        "|---|---|",
        *rows,
        "",
        f"Prefix memory: {key['prefix_memory_bytes_per_conversation']:.0f} bytes per remembered "
        f"conversation, {key['prefix_memory_record_microseconds']:.1f} µs per record.",
        "",
    ]


def write(out: Path, notes: str = "") -> Path:
    """Write REPORT.md (and the plots) from the JSON results in `out`."""
    sim, real = load(out, "sim"), load(out, "real")
    proxy, scale = load(out, "proxy"), load(out, "scale")
    affinity = load(out, "affinity")
    models = load(out, "models")
    key = load(out, "key")
    unequal = load(out, "unequal")
    proxy_real = load(out, "proxy-real")
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
        *targets(sim, proxy, scale, affinity, models),
        *(
            f"| {t} | {m} | {'n/a' if ok is None else ('yes' if ok else '**no**')} |"
            for t, m, ok in (
                (report_proxy_real.targets(proxy_real) if proxy_real else [])
                + (report_unequal.targets(unequal) if unequal and "skipped" not in unequal else [])
            )
        ),
        "",
    ]
    if notes:
        lines += [notes, ""]
    if key:
        lines += key_section(key)
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
    if proxy_real:
        lines += report_proxy_real.section(proxy_real, out)
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
    if affinity:
        lines += affinity_section(affinity, out)
    id_slot = load(out, "id_slot")
    if id_slot:
        lines += id_slot_section(id_slot)
    if models:
        lines += models_section(models, out)
    if unequal:
        lines += report_unequal.section(unequal, out)
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


if __name__ == "__main__":
    print(write(Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")))
