"""A smoke run of every benchmark scenario: seconds each, tiny counts, real processes.

Not a measurement: it proves that `make bench` can start everything, push load through and
write a report. The real numbers come from `make bench`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import uvloop
from bench.scheduling import Lengths

from bench import (
    experiment_routing_model,
    llama_servers,
    proxy_python_cost,
    report,
    report_proxy_real,
    report_unequal,
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

pytestmark = pytest.mark.timeout(60)


def test_sim_scheduling(tmp_path: Path) -> None:
    results = scenario_sim.run(
        tmp_path, servers=2, loads=(0.8,), duration=1.5, policy_kinds={"rower", "ideal"}
    )
    runs = results["runs"]
    assert {run["kind"] for run in runs} == {"rower", "ideal"}
    for run in runs:
        assert run["ok"] == run["requests"] > 0
        if run["kind"] == "rower":
            assert run["over_dispatch"] == 0


def require_llama_server() -> None:
    if llama_servers.tools(build=False) is None:
        message = "no cached llama-server or tiny model: run scripts/setup.sh"
        if os.environ.get("CI") or os.environ.get("ROWER_REQUIRE_LLAMA_SERVER") == "1":
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def test_real_scheduling(tmp_path: Path) -> None:
    require_llama_server()
    short = Lengths(median=32, sigma=0.3, low=8, high=64)
    results = scenario_real.run(
        tmp_path,
        loads=(0.5,),
        duration=1.5,
        policy_kinds={"rower"},
        build=False,
        generation=short,
    )
    assert all(run["ok"] == run["requests"] for run in results["runs"])


def test_unequal_servers(tmp_path: Path) -> None:
    require_llama_server()
    results = scenario_unequal.run(
        tmp_path,
        repeats=1,
        loads=(0.5,),
        duration=1.5,
        build=False,
        generation=Lengths(median=32, sigma=0.3, low=8, high=64),
        old_pick=None,
        after=None,
        calibration_seconds=1.0,
    )
    assert {run["policy"] for run in results["runs"]} >= {"Rower"}
    for run in results["runs"]:
        assert run["ok"] == run["requests"] > 0, run["error_kinds"]
    assert all(row["ttft_p95"] is not None for row in scenario_unequal.medians(results))
    assert report_unequal.TITLE in report.write(tmp_path).read_text()


def test_cache_affinity_and_report(tmp_path: Path) -> None:
    require_llama_server()
    fronts = ("Rower least-busy", "Rower cache-aware", scenario_affinity.TWO_BALANCERS.name)
    cells = [
        scenario_affinity.Cell(
            "fits", api, scenario_affinity.Workload(3, 0.4, (0.2, 0.2), (2, 2), 300), fronts
        )
        for api in ("completion", "chat")
    ]
    results = scenario_affinity.run(tmp_path, only=cells, repeats=1, build=False, trace=True)
    assert results["runs"]
    for run in results["runs"]:
        assert run["ok"] == run["requests"] == 6, run["error_kinds"]
        assert run["prompt_tokens"] > 0
        assert sum(run["turns_per_server"]) == 6
        # Every turn is in one kind, and the access log said where every later turn went.
        kinds = run["breakdown"]
        assert sum(kind["turns"] for kind in kinds.values()) == 6
        assert kinds["first"]["turns"] == 3
        assert "recomputed" not in kinds
        computed = sum(s["prompt_tokens"] for s in run["servers_prefill"])
        assert computed == sum(kind["prompt_n"] for kind in kinds.values())
    text = report.write(tmp_path).read_text()
    assert "## 5. Prompt-cache affinity" in text
    assert (tmp_path / "affinity.png").exists()


def test_proxy_cost(tmp_path: Path) -> None:
    results = scenario_proxy.run(tmp_path, smoke=True)
    rows = {row["target"]: row for row in results["rows"]}
    assert rows["Rower"]["ttfb_c1_p50"] is not None
    assert rows["Rower"]["sse_events"] > 0


def test_proxy_on_a_real_llama_server_and_report(tmp_path: Path) -> None:
    require_llama_server()
    results = scenario_proxy_real.run(tmp_path, smoke=True)
    rower = results["summary"]["Rower"]
    assert rower["sse_events"] > 0
    assert rower["health_rps"]
    assert rower["health_front_cpu_us_per_request"] > 0
    assert [name for name, _, _ in report_proxy_real.targets(results)]
    text = report.write(tmp_path).read_text()
    assert report_proxy_real.TITLE in text
    assert "`GET /health` req/s ≥ 1/4 of nginx's" in text
    assert (tmp_path / "proxy-real.png").exists()


def test_proxy_python_cost() -> None:
    costs = uvloop.run(proxy_python_cost.measure(300, 2))
    assert len(costs) == 2
    assert all(0 < cost < 0.01 for cost in costs)


def test_scale_and_report(tmp_path: Path) -> None:
    results = scenario_scale.run(tmp_path, smoke=True)
    assert results["buffered_reached"] == results["buffered"]
    assert results["dispatched"] > 0
    text = report.write(tmp_path).read_text()
    assert "## Targets" in text
    assert (tmp_path / "scale.png").exists()


def test_models_burst_and_report(tmp_path: Path) -> None:
    results = scenario_models.run(tmp_path, duration=2.5, burst=16, repeats=1)
    a, b = scenario_models.MODELS
    assert [(r["fleet"], r["phase"]) for r in results["runs"]] == [
        (fleet, phase) for fleet in scenario_models.FLEETS for phase in scenario_models.PHASES
    ]
    for run in results["runs"]:
        assert run["not_sent"] == 0
        assert run[b]["requests"] > 0
        assert run[b]["errors"] == run[a]["errors"] == 0
        assert run[a]["requests"] == (16 if run["phase"] == "burst" else 0)
    text = report.write(tmp_path).read_text()
    assert "## 7. Several models" in text
    assert f"a burst for model {a} does not move model {b}'s TTFT" in text
    assert (tmp_path / "models.png").exists()


def test_affinity_key_cost(tmp_path: Path) -> None:
    results = scenario_key.run(tmp_path, quick=True)
    assert results["blocks"] == results["head_bytes"] // 512 > 50
    assert all(us > 0 for us in results["microseconds_median"].values())
    assert results["prefix_memory_bytes_per_conversation"] > 0
    assert "Affinity key and prefix memory" in report.write(tmp_path).read_text()


def test_routing_model_runs_the_fleet_core_and_home_lines_keep_conversations() -> None:
    # Seeded and simulated time: the same result every run.
    home_lines = experiment_routing_model.run(18, seed=0, seconds=30).reuse
    first_come = experiment_routing_model.run(18, seed=0, seconds=30, patience=0.0).reuse
    assert 0 < first_come < home_lines < 1
    alone = experiment_routing_model.run(12, balancers=2, seed=0, seconds=30)
    following = experiment_routing_model.run(12, balancers=2, seed=0, seconds=30, shared=True)
    assert 0 < alone.reuse < following.reuse < 1
    assert following.turns > 0
    assert 0 < following.e2e_p50 <= following.e2e_p99
