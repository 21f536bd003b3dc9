"""Does pinning `id_slot` beat llama-server's own choice of slot? (issue 9, item 4)

One llama-server, 2 slots, `--cache-ram 6` (MiB), 4 and 6 conversations shaped as in the
affinity scenario (~3,000-token private prefixes, short turns, users thinking 0.3-3 s), and 2
conversations that share a 1,500-token system prompt before a 2,000-token private part, sent
straight to it by a client in one of three modes:

- `server`: no `id_slot`; llama-server takes the idle slot with the longest common prefix
  (above `--slot-prompt-similarity`), else the least recently used one, and restores a prompt
  it pushed out of a slot from its host-RAM cache.
- `pin-last`: every turn pinned to the slot that answered the conversation's previous turn
  (a client that knows where each conversation's cache is); llama-server then waits for that
  slot even while the other one is idle.
- `pin-held`: pinned only while no other conversation's answer has come from that slot since.

Prints and writes (`id_slot.json`) reuse (Σ `cache_n` / Σ prompt tokens), prefill work
(Σ `prompt_ms`) and E2E latency per mode, for 3 interleaved repeats (mode order rotated).

    python -m bench.experiment_id_slot [--repeats 3] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.scenario_affinity import CACHE_RAM_MIB, SLOT_CONTEXT, Cell, Workload, conversation_spec
from bench.scenario_affinity import summarize as summarize_turns
from bench.scheduling import wait_idle

MODES = {"server": None, "pin-last": "last", "pin-held": "held"}
SLOTS = 2


WORKLOADS = {
    "4 conversations": Workload(4),
    "6 conversations": Workload(6),
    "2 sharing a system prompt": Workload(2, private_tokens=2000, shared_tokens=1500),
}


def run(out: Path, *, repeats: int = 3) -> dict[str, Any]:
    """Every mode at every conversation count, `repeats` times interleaved."""
    found = llama_servers.tools(build=False)
    if found is None:
        raise SystemExit("no cached llama-server or tiny model: run scripts/setup.sh")
    server, model = found
    work = out / "work" / "id_slot"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    with procs.Procs(work / "logs") as runner:
        (one,) = llama_servers.start(
            runner,
            server,
            model,
            count=1,
            slots=SLOTS,
            slot_context=SLOT_CONTEXT,
            extra=("--cache-ram", str(CACHE_RAM_MIB)),
        )
        for repeat in range(repeats):
            for index, (name, workload) in enumerate(WORKLOADS.items()):
                cell = Cell("one server", "completion", workload, ())
                modes = list(MODES)
                modes = modes[repeat % len(modes) :] + modes[: repeat % len(modes)]
                for mode in modes:
                    unique = random.Random(f"id_slot {repeat} {name} {mode}")
                    spec = conversation_spec(
                        cell,
                        shape_seed=1000 * repeat + index,
                        text_seed=unique.getrandbits(48),
                        urls=[one.url],
                        session_header=False,
                    )
                    spec["pin_slot"] = MODES[mode]
                    spec_path = work / f"spec-{time.monotonic_ns()}.json"
                    spec_path.write_text(json.dumps(spec))
                    result_path = spec_path.with_suffix(".out.json")
                    loadgen = runner.python(
                        "loadgen",
                        "bench.loadgen",
                        "conversations",
                        str(spec_path),
                        str(result_path),
                    )
                    loadgen.wait(300)
                    wait_idle(lambda: llama_servers.activity([one]))
                    records = json.loads(result_path.read_text())["records"]
                    result = summarize_turns(records)
                    result.update(mode=mode, workload=name, repeat=repeat)
                    runs.append(result)
                    print(
                        f"  #{repeat} {name}, {mode:<8}: reuse "
                        f"{result['reuse']:.1%}, prefill {result['prefill_s']:.2f} s, e2e p50 "
                        f"{result['e2e_p50'] * 1000:.0f} p99 {result['e2e_p99'] * 1000:.0f} ms, "
                        f"errors {result['errors']}",
                        flush=True,
                    )
    summary = []
    for name in WORKLOADS:
        for mode in MODES:
            mine = [r for r in runs if r["mode"] == mode and r["workload"] == name]
            row: dict[str, Any] = {"workload": name, "mode": mode}
            for key in ("reuse", "prefill_s", "e2e_p50", "e2e_p99", "errors"):
                row[key] = statistics.median(r[key] for r in mine)
                row[f"{key}_all"] = [r[key] for r in mine]
            summary.append(row)
    results: dict[str, Any] = {"experiment": "id_slot", "repeats": repeats}
    results["workloads"] = {name: asdict(w) for name, w in WORKLOADS.items()}
    results.update(runs=runs, summary=summary)
    (out / "id_slot.json").write_text(json.dumps(results, indent=1))
    print("\n| workload | mode | reuse (median; each repeat) | prefill s | E2E p99 ms |")
    print("|---|---|---|---|---|")
    for row in summary:
        each = ", ".join(f"{v:.1%}" for v in row["reuse_all"])
        print(
            f"| {row['workload']} | {row['mode']} | {row['reuse']:.1%} ({each}) "
            f"| {row['prefill_s']:.2f} | {row['e2e_p99'] * 1000:.0f} |"
        )
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.experiment_id_slot", description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    run(args.out, repeats=args.repeats)


if __name__ == "__main__":
    main()
