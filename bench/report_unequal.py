"""The report's section on unequal llama-servers (`scenario_unequal`): table, plot, targets.

`python -m bench.report_unequal [DIR]` rewrites that section (and its rows of the targets
table) in DIR/REPORT.md from DIR/unequal.json, leaving the rest of the report as it is.
`python -m bench.report_unequal --merge OUT.json A.json B.json ...` joins several runs of the
scenario into one (their repeats one after the other; each run's capacity kept), so the
medians are over all of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from bench.scenario_unequal import medians

TITLE = "## 8. Unequal llama-servers: 1, 2 and 3 slots, one thread each"
HAPROXY = "HAProxy leastconn+maxconn"
TARGET = "TTFT p95 within 10% of HAProxy's, unequal llama-servers"


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.0f}"


def num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def paired_ratios(data: dict[str, Any], policy: str, load: float, key: str) -> list[float]:
    """`key` of `policy` over HAProxy's in the same repeat (same schedule, run minutes apart),
    one ratio per repeat: the machine's drift from repeat to repeat cancels out."""
    ratios = []
    for repeat in sorted({r["repeat"] for r in data["runs"]}):
        at = {r["policy"]: r for r in data["runs"] if r["repeat"] == repeat and r["load"] == load}
        ours, base = at.get(policy), at.get(HAPROXY)
        if ours and base and ours.get(key) and base.get(key):
            ratios.append(ours[key] / base[key])
    return ratios


def median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def targets(data: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    """TTFT p95 of the newest Rower against HAProxy's at each load: the median over repeats of
    the ratio within a repeat (the verdict), and the ratio of the medians beside it."""
    rows = []
    rower = data["policies"][-1] if data["policies"][-1] != HAPROXY else None
    table = medians(data)
    for load in sorted({r["load"] for r in table}):
        at = {r["policy"]: r for r in table if r["load"] == load}
        base, ours = at.get(HAPROXY), at.get(rower or "")
        ratios = paired_ratios(data, rower or "", load, "ttft_p95")
        paired = median(ratios)
        if not base or not ours or paired is None or not base["ttft_p95"]:
            continue
        each = ", ".join(f"x{r:.2f}" for r in ratios)
        rows.append(
            (
                f"{TARGET}, @{load:.0%}",
                f"{rower}: x{paired:.2f} of HAProxy's in the same repeat (median of {each}); "
                f"medians {ms(ours['ttft_p95'])} vs {ms(base['ttft_p95'])} ms "
                f"(x{ours['ttft_p95'] / base['ttft_p95']:.2f})",
                paired <= 1.10,
            )
        )
    return rows


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Several results of the scenario as one: repeats renumbered one run after the other, the
    fronts matched by position (HAProxy, Rower before, Rower: the last may differ in commit
    from run to run, and is named with all of them)."""
    first = runs[0]
    names = [list(r["policies"]) for r in runs]
    if any(len(n) != len(names[0]) for n in names):
        raise ValueError("the runs to merge have different fronts")
    merged_names = [
        " / ".join(dict.fromkeys(n[i] for n in names)) if i == len(names[0]) - 1 else names[0][i]
        for i in range(len(names[0]))
    ]
    merged = {**first, "policies": merged_names, "runs": [], "sessions": []}
    offset = 0
    for result, policies in zip(runs, names, strict=True):
        rename = dict(zip(policies, merged_names, strict=True))
        for run in result["runs"]:
            merged["runs"].append(
                {**run, "policy": rename[run["policy"]], "repeat": run["repeat"] + offset}
            )
        offset += result["repeats"]
        merged["sessions"].append(
            {"capacity_rps": result["capacity_rps"], "calibrations": result["calibrations"]}
        )
    merged["repeats"] = offset
    return merged


def capacity_text(data: dict[str, Any]) -> str:
    sessions = data.get("sessions") or [
        {"capacity_rps": data["capacity_rps"], "calibrations": data["calibrations"]}
    ]

    def one(session: dict[str, Any]) -> str:
        each = ", ".join(f"{c:.1f}" for c in session["calibrations"])
        return f"{session['capacity_rps']:.1f} req/s (median of {each})"

    return "; ".join(one(s) for s in sessions)


def section(data: dict[str, Any], out: Path) -> list[str]:
    """The section's markdown (and unequal.png)."""
    lines = [TITLE, ""]
    if "skipped" in data:
        return [*lines, f"Skipped: {data['skipped']}.", ""]
    sessions = len(data.get("sessions") or [data])
    lines += [
        f"llama-servers of {', '.join(map(str, data['slots']))} slots, one thread each, tiny "
        f"model on CPU; streamed `/completion`, Poisson arrivals for {data['duration_s']:.0f} s "
        f"per run at 80% and 95% of a capacity measured at the start of "
        f"{'the session' if sessions == 1 else f'each of {sessions} sessions'}: "
        f"{capacity_text(data)}; every slot kept busy with the runs' own kind of "
        f"requests, straight to the servers. {data['repeats']} repeats in all, each running "
        "every front at every load in an order rotated from repeat to repeat; medians over "
        "repeats. Agents report every "
        f"{data['interval_ms']} ms. Clients open a connection per request. CPU in cores "
        "(CPU seconds over the run's wall time).",
        "",
        "| front | load | TTFT p50 ms | p95 | p99 | E2E p50 ms | E2E p99 | goodput req/s "
        "| peak deferred | errors | Rower buffer wait ms | CPU servers | balancer | agents "
        "| load gen | machine | tokens share (1/2/3 slots) | busy slots (1/2/3) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    table = medians(data)
    for r in table:
        shares = "/".join(f"{s:.0%}" for s in r["tokens_share"])
        busy = "/".join(f"{b:.2f}" for b in r["busy_mean"])
        lines.append(
            f"| {r['policy']} | {r['load']:.0%} | {ms(r['ttft_p50'])} | {ms(r['ttft_p95'])} "
            f"| {ms(r['ttft_p99'])} | {ms(r['e2e_p50'])} | {ms(r['e2e_p99'])} "
            f"| {num(r['goodput_rps'])} | {num(r['peak_deferred'], 0)} | {num(r['errors'], 0)} "
            f"| {ms(r['buffer_wait_mean'])} | {num(r['cpu_servers'])} | {num(r['cpu_proxy'])} "
            f"| {num(r['cpu_agents'])} | {num(r['cpu_loadgen'])} | {num(r['cpu_machine'])} "
            f"| {shares} | {busy} |"
        )
    lines += ["", *ratio_lines(data), "", *cpu_lines(data, table), "", *belief_lines(data), ""]
    lines += [*plot(data, out), ""]
    return lines


def ratio_lines(data: dict[str, Any]) -> list[str]:
    """Each Rower's TTFT and E2E over HAProxy's within a repeat, per repeat and the median."""
    lines = [
        "Over HAProxy's in the same repeat (the same schedule, minutes apart; per repeat, then "
        "the median):",
        "",
        "| front | load | TTFT p50 | TTFT p95 | TTFT p99 | E2E p50 |",
        "|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in data["runs"]}):
        for policy in data["policies"]:
            if policy == HAPROXY:
                continue
            cells = []
            for key in ("ttft_p50", "ttft_p95", "ttft_p99", "e2e_p50"):
                ratios = paired_ratios(data, policy, load, key)
                paired = median(ratios)
                each = " ".join(f"{r:.2f}" for r in ratios)
                cells.append("-" if paired is None else f"x{paired:.2f} ({each})")
            lines.append(f"| {policy} | {load:.0%} | {' | '.join(cells)} |")
    return lines


def cpu_lines(data: dict[str, Any], table: list[dict[str, Any]]) -> list[str]:
    """What the servers lost to the balancer: CPU seconds per request, against HAProxy's."""
    lines = [
        "CPU seconds per request served (median over repeats), and what the balancer's "
        "extra CPU over HAProxy's is as a share of what the servers had:",
        "",
        "| front | load | servers | balancer | balancer - HAProxy's, % of servers' |",
        "|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in data["runs"]}):
        per: dict[str, tuple[float, float]] = {}
        for policy in data["policies"]:
            runs = [r for r in data["runs"] if r["policy"] == policy and r["load"] == load]
            if not runs:
                continue
            servers = sorted(r["cpu"]["servers"] * r["cpu_wall"] / max(1, r["ok"]) for r in runs)
            proxy = sorted(r["cpu"]["proxy"] * r["cpu_wall"] / max(1, r["ok"]) for r in runs)
            per[policy] = (median(servers) or 0.0, median(proxy) or 0.0)
        base = per.get(HAPROXY)
        for policy, (servers, proxy) in per.items():
            extra = "-" if base is None else f"{(proxy - base[1]) / servers:+.1%}"
            lines.append(
                f"| {policy} | {load:.0%} | {servers * 1000:.1f} ms | {proxy * 1000:.2f} ms "
                f"| {extra} |"
            )
    return lines


def belief_lines(data: dict[str, Any]) -> list[str]:
    """Rower's view against the servers' (sampled at 2 Hz against 10 Hz): medians."""
    lines = [
        "Rower's view, sampled during the runs (medians over repeats): the share of its "
        "requests that waited in its buffer at all (over 10 ms), the share of samples with "
        "requests buffered while the servers' own `/metrics` showed a slot free, and how many "
        "more slots it believed busy than the servers showed (of which `others`: work it "
        "does not know, from the agents' reports). And the time a request held its slot: by "
        "the servers' counters (`prompt_seconds_total` + `tokens_predicted_seconds_total`, per "
        "request) and in Rower's count (its duration less its buffer wait, from its "
        "histograms); the difference is how far Rower's belief lags the server.",
        "",
        "| front | load | waited | buffered while a slot was free | believed - shown busy "
        "| others | slot time, server ms | slot time, Rower ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for load in sorted({r["load"] for r in data["runs"]}):
        for policy in data["policies"]:
            runs = [
                r
                for r in data["runs"]
                if r["policy"] == policy
                and r["load"] == load
                and r.get("believed_excess") is not None
            ]
            if not runs:
                continue

            def med(key: str, runs: list[dict[str, Any]] = runs) -> float | None:
                values = sorted(r[key] for r in runs if r.get(key) is not None)
                return median(values)

            lines.append(
                f"| {policy} | {load:.0%} | {num(med('waited_share'))} "
                f"| {num(med('buffered_while_free'))} | {num(med('believed_excess'))} "
                f"| {num(med('others_mean'))} | {ms(med('slot_time_server'))} "
                f"| {ms(med('slot_time_rower'))} |"
            )
    return lines


def plot(data: dict[str, Any], out: Path) -> list[str]:
    """TTFT p95 of every run (dots) and the median (bar), per front and load."""
    loads = sorted({r["load"] for r in data["runs"]})
    policies = data["policies"]
    fig, axes = plt.subplots(1, len(loads), figsize=(6 * len(loads), 4.2), squeeze=False)
    for axis, load in zip(axes[0], loads, strict=True):
        for index, policy in enumerate(policies):
            values = [
                r["ttft_p95"] * 1000
                for r in data["runs"]
                if r["policy"] == policy and r["load"] == load and r["ttft_p95"] is not None
            ]
            if not values:
                continue
            axis.bar(index, median(values) or 0.0, alpha=0.5)
            axis.plot([index] * len(values), values, "k.")
        axis.set_xticks(range(len(policies)))
        axis.set_xticklabels([p.replace(" (", "\n(") for p in policies], fontsize=8)
        axis.set_title(f"{load:.0%} of capacity")
        axis.set_ylabel("TTFT p95 (ms): runs and median")
        axis.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "unequal.png", dpi=90)
    plt.close(fig)
    return ["![unequal](unequal.png)"]


def rewrite(report: Path, data: dict[str, Any]) -> None:
    """Replace this section and its target rows in an existing REPORT.md (or append them)."""
    text = report.read_text() if report.exists() else "# Rower benchmark report\n"
    lines = [line for line in text.splitlines() if not line.startswith(f"| {TARGET}")]
    rows = [
        f"| {t} | {m} | {'n/a' if ok is None else ('yes' if ok else '**no**')} |"
        for t, m, ok in targets(data)
    ]
    if "## Targets" in lines:
        start = lines.index("## Targets")
        end = next(
            (i for i in range(start + 3, len(lines)) if not lines[i].startswith("|")), len(lines)
        )
        lines[end:end] = rows
    if TITLE in lines:
        start = lines.index(TITLE)
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        del lines[start:end]
        lines[start:start] = section(data, report.parent)
    else:
        lines += ["", *section(data, report.parent)]
    report.write_text("\n".join(lines).rstrip() + "\n")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:
        parts = [json.loads(Path(name).read_text()) for name in sys.argv[3:]]
        Path(sys.argv[2]).write_text(json.dumps(merge(parts), indent=1))
        sys.exit(0)
    directory = Path(sys.argv[1] if len(sys.argv) > 1 else "bench/results")
    rewrite(directory / "REPORT.md", json.loads((directory / "unequal.json").read_text()))
    print(directory / "REPORT.md")
