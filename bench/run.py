"""`python -m bench.run [--quick] [--scenario NAME] [--out DIR]`: run the benchmark suite.

Scenarios: sim (scheduling on simulated servers), real (on llama-servers), proxy (what the
proxy costs, on a fast upstream), proxy-real (what it costs in front of a real llama-server),
scale (1,000 agents, 10,000 buffered requests), affinity (multi-turn chat on llama-servers:
prompt-cache reuse), models (a burst for one model and another model's TTFT on simulated
servers), unequal (llama-servers of 1, 2 and 3 slots: Rower before and after its pick changed,
against HAProxy). Results, plots and REPORT.md go to bench/results/ (or --out). The
full run takes about 45 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from bench import (
    report,
    scenario_affinity,
    scenario_key,
    scenario_models,
    scenario_proxy,
    scenario_proxy_real,
    scenario_real,
    scenario_scale,
    scenario_sim,
    scenario_unequal,
)

SCENARIOS = {
    "sim": scenario_sim.run,
    "real": scenario_real.run,
    "proxy": scenario_proxy.run,
    "proxy-real": scenario_proxy_real.run,
    "scale": scenario_scale.run,
    "affinity": scenario_affinity.run,
    "models": scenario_models.run,
    "key": scenario_key.run,
    "unequal": scenario_unequal.run,
}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="small counts, a few minutes")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="run only these (repeatable)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--keep-work", action="store_true", help="keep logs and schedules")
    args = parser.parse_args()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for name in args.scenario or list(SCENARIOS):
        print(f"== {name}", flush=True)
        SCENARIOS[name](out, quick=args.quick)
    meta = {
        "mode": "quick" if args.quick else "full",
        "cpus": os.cpu_count(),
        "seconds": time.monotonic() - started,
    }
    (out / "meta.json").write_text(json.dumps(meta))
    if not args.keep_work:
        shutil.rmtree(out / "work", ignore_errors=True)
    print(f"report: {report.write(out)}")


if __name__ == "__main__":
    main()
