"""Scenario 5: prompt-cache affinity on real llama-servers (multi-turn chat, long prefixes).

3 llama-servers x 2 slots with `--cache-ram 6` (MiB): with the tiny model a ~3,000-token
prompt's state is ~1.6 MiB, so each server keeps 4 conversations (2 in its slots, 2 more in
host RAM: a prompt is saved before the one it makes room for is restored), as a real model's KV
cache keeps a handful; measured (`bench.experiment_cache_capacity`): 4 in a round all found, 5
none. Under load fewer: llama-server copies an idle slot into host RAM when a task starts
(`--cache-idle-slots`, its default), and the copy takes a place. Conversations: a private
~3,000-token prefix (random words), then turns that append llama-server's own answer and a
short user message; a new connection per request, think time between turns, N conversations at
once, each a closed loop. Two regimes: the working set fits the fleet's caches (12
conversations, 4 a server: just, with no room for a fifth on any server)
or exceeds them (18). Two APIs: `/completion` (a prompt string, not streamed) and
`/v1/chat/completions` (messages, streamed: TTFT). Variants: a ~1,500-token system prompt
shared by every conversation before its private part; two Rower balancers fed by the same
agents and following each other's placements (`--peer-balancer-addr`), each conversation's
turns alternating between them.

Reuse = sum of `timings.cache_n` / sum of prompt tokens (`cache_n + prompt_n`), prefill work
= sum of `timings.prompt_ms`, both read from llama-server's own answers. The anchor is
HAProxy hashing an `X-Session-Id` header the client sends; only that front gets the header.
Every run has its own random text (nothing cached by an earlier run can help), and the same
conversation shapes and think times as the other fronts of its repeat; repeats are
interleaved with the order of the fronts rotated, and the report shows medians.

Each run also says where its prefill went (`breakdown`: first turns, later turns that found
their prefix cached, and those that did not) and each server's prompt batches as the server
counts them (`servers_prefill`: every batch once, where a turn's `prompt_ms` also covers what
its batch-mates computed). To measure one change, a subset of the cells and fronts:

    python -m bench.scenario_affinity --cell fits,completion --cell exceeds,completion \
        --front "HAProxy hash of X-Session-Id (anchor)" --front "Rower cache-aware" \
        --repeats 5 --trace --out /tmp/affinity-subset

`--trace` gives Rower's balancers an access log, so a later turn that did not find its prefix
is split into `moved` (to another server than its previous turn) and `evicted` (same server).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import random
import re
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.llama_servers import LlamaServer
from bench.scheduling import (
    SESSION_HEADER,
    Front,
    Policy,
    Upstream,
    available,
    percentile,
    prompt_text,
    start_policy,
    start_rowers,
    wait_idle,
)

SERVERS = 3
SLOTS = 2
CACHE_RAM_MIB = 6
SLOT_CONTEXT = 8192
TOKENS_PER_WORD = 2.08
"""prompt_text's words of three random letters, in the tiny model's SPM vocabulary (measured)."""

ANCHOR = "haproxy-hash"
FRONTS = (
    Policy("nginx least_conn", "nginx-lc"),
    Policy("HAProxy leastconn+maxconn", "haproxy"),
    Policy("HAProxy hash of X-Session-Id (anchor)", ANCHOR),
    Policy("Rower least-busy", "rower", routing="least-busy"),
    Policy("Rower cache-aware", "rower", routing="cache-aware"),
)
TWO_BALANCERS = Policy("Rower cache-aware, 2 balancers alternating", "rower", routing="cache-aware")
ALL_FRONTS = (*FRONTS, TWO_BALANCERS)
APIS = {"completion": ("/completion", False), "chat": ("/v1/chat/completions", True)}
"""API -> (path, streamed)."""


@dataclass(frozen=True)
class Workload:
    """The conversations of one run. Lengths are in tokens, times in seconds.

    Users differ: each conversation has its own think time, log-uniform in `think_s` (±30% a
    turn), and as many turns as fit in about `active_s` (within `turns`), so a quick talker
    makes many turns and a slow one few, and every conversation ends at about the same time.
    """

    conversations: int
    active_s: float = 5.0
    think_s: tuple[float, float] = (0.3, 3.0)
    turns: tuple[int, int] = (2, 12)
    private_tokens: int = 3000
    shared_tokens: int = 0
    user_tokens: int = 12
    n_predict: int = 32

    def shape(self, rng: random.Random) -> tuple[float, int]:
        """One conversation's think time and number of turns."""
        low, high = self.think_s
        think = math.exp(rng.uniform(math.log(low), math.log(high)))
        # 0.25 s: about what a turn takes to answer when nothing waits.
        turns = round(self.active_s / (think + 0.25))
        return think, max(self.turns[0], min(self.turns[1], turns))


@dataclass(frozen=True)
class Cell:
    """One comparison: every front in `fronts` runs the same kind of workload on one API."""

    regime: str
    api: str
    workload: Workload
    fronts: tuple[str, ...]
    variant: str = ""

    @property
    def name(self) -> str:
        path = APIS[self.api][0]
        return f"{self.regime}, {path}" + (f", {self.variant}" if self.variant else "")


EXCEEDS = 18
"""Conversations of the regime that exceeds the fleet's caches: 18 where 12 fit (4 a server).
With every user thinking equally long, every front (the anchor too) measured 0% reuse at 18
and at 24: conversations taking turns in a round on too few places, least-recently-used
eviction drops each one just before it returns. Users that differ (some quick, some slow) keep
the quick ones cached on a server that keeps them."""


def cells(quick: bool) -> list[Cell]:
    """The comparisons of a full (or quick) run."""
    main = tuple(p.name for p in FRONTS)
    with_two = (*main, TWO_BALANCERS.name)
    active = 4.0 if quick else 5.0
    fits, exceeds = Workload(12, active), Workload(EXCEEDS, active)
    found = [
        Cell("fits", "completion", fits, with_two),
        Cell("exceeds", "completion", exceeds, with_two),
    ]
    if not quick:
        # The chat API and the shared prompt test Rower's reading of messages; the generic
        # fronts do there what they do on /completion: leaving them out keeps the run short.
        chat = ("HAProxy hash of X-Session-Id (anchor)", "Rower least-busy", "Rower cache-aware")
        found += [
            Cell("fits", "chat", fits, chat),
            Cell("exceeds", "chat", exceeds, chat),
            Cell(
                "fits",
                "chat",
                replace(fits, private_tokens=2000, shared_tokens=1500),
                chat,
                "shared system prompt",
            ),
        ]
    return found


def routing_available() -> bool:
    """Whether this Rower has `--routing` (before it, Rower ran least-busy only)."""
    shown = subprocess.run(
        procs.rower("balancer", "--help"), capture_output=True, text=True, check=False
    )
    return "--routing" in shown.stdout


def words(rng: random.Random, tokens: int) -> str:
    return prompt_text(rng, max(1, round(tokens / TOKENS_PER_WORD)))


def conversation_spec(
    cell: Cell, *, shape_seed: int, text_seed: int, urls: Sequence[str], session_header: bool
) -> dict[str, Any]:
    """The load generator's spec of one run: times from `shape_seed`, text from `text_seed`."""
    work = cell.workload
    shape, text = random.Random(shape_seed), random.Random(text_seed)
    shared = words(text, work.shared_tokens) if work.shared_tokens else ""
    chats = []
    for index in range(work.conversations):
        private = words(text, work.private_tokens)
        think, turns = work.shape(shape)
        chats.append(
            {
                "id": f"{text_seed}-{index}",
                "system": shared,
                "users": [private, *(words(text, work.user_tokens) for _ in range(turns))],
                "start": shape.uniform(0, 2.0),
                "think": [shape.uniform(0.7, 1.3) * think for _ in range(turns)],
            }
        )
    path, stream = APIS[cell.api]
    return {
        "urls": list(urls),
        "path": path,
        "api": cell.api,
        "stream": stream,
        "n_predict": work.n_predict,
        "deadline": 120.0,
        "session_header": SESSION_HEADER if session_header else None,
        "conversations": chats,
    }


def summarize(records: list[dict[str, Any]]) -> dict[str, Any]:
    """What one run's turns say: reuse, prefill work, latency, errors."""
    ok = [r for r in records if r["error"] is None]
    prompt = sum(r["cache_n"] + r["prompt_n"] for r in ok)
    cached = sum(r["cache_n"] for r in ok)
    bound = 0
    by_conversation: dict[int, list[dict[str, Any]]] = {}
    for r in ok:
        by_conversation.setdefault(r["conversation"], []).append(r)
    for turns in by_conversation.values():
        turns.sort(key=lambda r: r["turn"])
        for before, after in itertools.pairwise(turns):
            reusable = before["cache_n"] + before["prompt_n"] + before["predicted_n"]
            bound += min(after["cache_n"] + after["prompt_n"], reusable)
    errors: dict[str, int] = {}
    for r in records:
        if r["error"] is not None:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    e2e = [r["e2e"] for r in ok]
    ttft = [r["ttft"] for r in ok if r["ttft"] is not None]
    return {
        "requests": len(records),
        "ok": len(ok),
        "errors": len(records) - len(ok),
        "error_kinds": errors,
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "reuse": cached / prompt if prompt else None,
        "reuse_bound": bound / prompt if prompt else None,
        "prefill_s": sum(r["prompt_ms"] for r in ok) / 1000,
        "e2e_p50": percentile(e2e, 0.5),
        "e2e_p99": percentile(e2e, 0.99),
        "ttft_p50": percentile(ttft, 0.5),
        "ttft_p99": percentile(ttft, 0.99),
    }


@dataclass
class Rig:
    """The servers and the fronts, started once for every run: a front is one or more
    balancers (the clients' turns alternate between them)."""

    servers: list[LlamaServer]
    fronts: dict[str, list[Front]]
    skipped: dict[str, str] = field(default_factory=dict)
    access_log: Path | None = None
    """Rower's access log (`trace`): which server each turn went to."""


def start_fronts(
    runner: procs.Procs,
    servers: list[LlamaServer],
    wanted: set[str],
    work: Path,
    *,
    trace: bool = False,
) -> Rig:
    """Start every front of `wanted`; say why any is left out. With `trace`, Rower's
    balancers write an access log (which server each turn went to)."""
    upstreams = [Upstream(s.address, s.slots) for s in servers]
    rig = Rig(servers, {}, access_log=work / "access.log" if trace else None)
    routing = routing_available()
    rowers = []
    for policy in ALL_FRONTS:
        if policy.name not in wanted:
            continue
        if policy.kind == "rower":
            if policy.routing == "cache-aware" and not routing:
                rig.skipped[policy.name] = "this Rower has no --routing flag yet"
            else:
                rowers.append(policy)
        elif not available(policy):
            rig.skipped[policy.name] = f"{policy.kind} is not installed (bench/setup.sh)"
        else:
            rig.fronts[policy.name] = [start_policy(runner, policy, upstreams, work)]
    # One balancer per Rower front (two for the alternating one), all fed by the same agents.
    balancers = [replace(p, routing=p.routing if routing else None) for p in rowers]
    peered: tuple[int, ...] = ()
    if TWO_BALANCERS in rowers:
        balancers.append(balancers[rowers.index(TWO_BALANCERS)])
        peered = (rowers.index(TWO_BALANCERS), len(balancers) - 1)
    if balancers:
        started = start_rowers(
            runner,
            balancers,
            upstreams,
            work,
            extra=(
                "--metrics-endpoint-enable",
                *(("--access-log", str(rig.access_log)) if rig.access_log else ()),
            ),
            peered=peered,
        )
        for policy, front in zip(rowers, started, strict=False):
            rig.fronts[policy.name] = [front]
        if TWO_BALANCERS in rowers:
            rig.fronts[TWO_BALANCERS.name].append(started[-1])
    return rig


def rower_counters(fronts: Sequence[Front]) -> dict[str, float]:
    """Rower's own routing and prompt-token counters (`/metrics`), summed over its balancers
    and agents (their labels dropped)."""
    total: dict[str, float] = {}
    for front in fronts:
        if front.management is None:
            continue
        with urllib.request.urlopen(f"http://{front.management}/metrics", timeout=3) as answer:
            samples = llama_servers.prometheus_samples(answer.read().decode())
        for sample, value in samples.items():
            name = AGENT_LABELS.sub("", sample).replace("{}", "")
            if ("affinity" in name or "prompt_tokens" in name) and "_created" not in name:
                total[name] = total.get(name, 0.0) + value
    return total


AGENT_LABELS = re.compile(r'(?:agent_id|agent_name|model)="[^"]*",?')


def run_one(
    runner: procs.Procs, rig: Rig, policy: Policy, cell: Cell, spec: dict[str, Any], work: Path
) -> dict[str, Any]:
    """One front through one workload: the load generator runs it to its end."""
    fronts = rig.fronts[policy.name]
    spec_path = work / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    out = spec_path.with_suffix(".out.json")
    served_before = [llama_servers.metrics(s.port) for s in rig.servers]
    server_logs = [runner.log_dir / f"llama-server-{s.port}.log" for s in rig.servers]
    logs_before = [path.stat().st_size if path.exists() else 0 for path in server_logs]
    log_offset = rig.access_log.stat().st_size if rig.access_log and rig.access_log.exists() else 0
    rower_before = rower_counters(fronts)
    groups = {
        "servers": [s.pid for s in rig.servers],
        "front": [pid for front in fronts for pid in front.pids],
        "agents": sorted({front.agents for front in fronts if front.agents is not None}),
    }
    settled = wait_settled(fronts)
    meter = procs.CpuMeter(groups)
    loadgen = runner.python("loadgen", "bench.loadgen", "conversations", str(spec_path), str(out))
    finished = meter.wait("loadgen", loadgen, RUN_LIMIT_S)
    runner.stop(loadgen)
    cpu = meter.read()
    wait_idle(lambda: llama_servers.activity(rig.servers))
    records = json.loads(out.read_text())["records"] if out.exists() else []
    result = summarize(records)
    if not finished:
        result["error_kinds"][f"load generator stopped after {RUN_LIMIT_S:.0f} s"] = 1
    served_after = [llama_servers.metrics(s.port) for s in rig.servers]
    predicted = "llamacpp:tokens_predicted_total"
    turns = [
        round((after[predicted] - before[predicted]) / cell.workload.n_predict)
        for before, after in zip(served_before, served_after, strict=True)
    ]
    result["turns_per_server"] = turns
    result["server_cache_drops"] = [
        cache_drops(path, offset) for path, offset in zip(server_logs, logs_before, strict=True)
    ]
    result["servers_prefill"] = [
        {
            "prompt_tokens": after[PROMPT_TOKENS] - before[PROMPT_TOKENS],
            "prompt_s": after[PROMPT_SECONDS] - before[PROMPT_SECONDS],
        }
        for before, after in zip(served_before, served_after, strict=True)
    ]
    traced = access_log_turns(rig.access_log, log_offset) if rig.access_log is not None else {}
    if policy.kind == ANCHOR:
        traced = {}
    served_by = {request_id: turn.upstream for request_id, turn in traced.items()}
    result["breakdown"] = breakdown(records, served_by)
    if traced:
        result["outcomes"] = outcomes(records, traced)
        result["conversations_per_server"] = conversations_per_server(records, traced)
    result["spread"] = max(turns) / statistics.fmean(turns) if sum(turns) else None
    rower_after = rower_counters(fronts)
    result["rower_counters"] = {
        name: value - rower_before.get(name, 0.0)
        for name, value in rower_after.items()
        if value != rower_before.get(name, 0.0)
    }
    result["cpu_s"] = cpu
    if not settled:
        result["error_kinds"][f"the balancer still saw busy slots after {SETTLE_S:.0f} s"] = 1
    result.update(front=policy.name, kind=policy.kind, cell=cell.name, regime=cell.regime)
    result.update(api=cell.api, variant=cell.variant)
    return result


SETTLE_S = 5.0
"""Longest a run waits for a Rower front to see every slot free (`wait_settled`)."""


def wait_settled(fronts: Sequence[Front]) -> bool:
    """Wait until every Rower balancer of `fronts` sees every slot free (False if one still did
    not after `SETTLE_S`). The servers are idle before a run, but a balancer knows it only from
    its agents' next reports (each second): a run that starts sooner finds servers that look
    busy with the previous front's work, and its first conversations all go to the others."""
    deadline = time.monotonic() + SETTLE_S
    for front in fronts:
        if front.management is None:
            continue
        url = f"http://{front.management}/api/v1/agents"
        while True:
            with urllib.request.urlopen(url, timeout=3) as answer:
                view = json.loads(answer.read())
            agents = view.get("agents", []) if isinstance(view, dict) else view
            if agents and all(a["slots_free"] == a["status"]["slots_total"] for a in agents):
                break
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
    return True


PROMPT_TOKENS = "llamacpp:prompt_tokens_total"
PROMPT_SECONDS = "llamacpp:prompt_seconds_total"
"""A server's prompt batches: tokens and wall time, each batch counted once (a request's
`prompt_ms` also covers what its slot's batch-mates computed meanwhile)."""

ACCESS_LINE = re.compile(
    r"upstream=(\S+).*request_id=(\S+)(?: affinity=(\S+) matched_blocks=(\d+))?"
)


@dataclass(frozen=True)
class TracedTurn:
    """What a Rower front's access log says of one request."""

    upstream: str
    affinity: str | None = None
    """The cache-aware pick's outcome (`affinity=`; None for least-busy routing)."""
    matched_blocks: int = 0


CACHE_DROP = b"removing oldest entry"
"""What llama-server logs when its `--cache-ram` prompt cache drops a prompt's state for room."""


def cache_drops(path: Path, offset: int) -> int:
    """Prompt states a llama-server's prompt cache dropped for room (its log past `offset`)."""
    if not path.exists():
        return 0
    with path.open("rb") as log:
        log.seek(offset)
        return log.read().count(CACHE_DROP)


def access_log_turns(path: Path, offset: int) -> dict[str, TracedTurn]:
    """request id -> where a Rower front sent it and why, from its access log past `offset`."""
    if not path.exists():
        return {}
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    found = {}
    for line in text.splitlines():
        match = ACCESS_LINE.search(line)
        if match:
            upstream, request_id, affinity, blocks = match.groups()
            found[request_id] = TracedTurn(upstream, affinity, int(blocks or 0))
    return found


def outcomes(records: list[dict[str, Any]], traced: dict[str, TracedTurn]) -> dict[str, Any]:
    """Later turns by the cache-aware pick's outcome, each split into those that found at least
    half their prompt cached (`reused`) and those that did not (`recomputed`): a `hit` computed
    again is a prefix the server dropped while the memory believed it held; a `return` that
    reused is one the memory forgot while the server still held it."""
    found: dict[str, dict[str, int]] = {}
    for r in records:
        turn = traced.get(r.get("request_id", ""))
        if r["error"] is not None or r["turn"] == 0 or turn is None or turn.affinity is None:
            continue
        reused = r["cache_n"] >= (r["cache_n"] + r["prompt_n"]) / 2
        counts = found.setdefault(turn.affinity, {"reused": 0, "recomputed": 0})
        counts["reused" if reused else "recomputed"] += 1
    return found


def conversations_per_server(
    records: list[dict[str, Any]], traced: dict[str, TracedTurn]
) -> list[int]:
    """How many conversations had a turn on each server in the run, most first."""
    seen: dict[str, set[int]] = {}
    for r in records:
        turn = traced.get(r.get("request_id", ""))
        if turn is not None:
            seen.setdefault(turn.upstream, set()).add(r["conversation"])
    return sorted((len(c) for c in seen.values()), reverse=True)


def breakdown(records: list[dict[str, Any]], served_by: dict[str, str]) -> dict[str, Any]:
    """Where a run's prefill went: turns by kind, each with its count, tokens computed
    (`prompt_n`) and `prompt_ms`. Kinds: `first` (a conversation's first turn), `reused` (a
    later turn that found at least half its prompt cached), `recomputed` (a later turn that
    did not); with `served_by` (request id -> server), `recomputed` splits into `moved` (sent
    to another server than its previous turn) and `evicted` (same server, cache gone)."""
    kinds: dict[str, dict[str, float]] = {}
    last_server: dict[int, str] = {}
    ok = sorted(
        (r for r in records if r["error"] is None), key=lambda r: (r["conversation"], r["turn"])
    )
    for r in ok:
        server = served_by.get(r.get("request_id", ""))
        previous = last_server.get(r["conversation"])
        if r["turn"] == 0:
            kind = "first"
        elif r["cache_n"] >= (r["cache_n"] + r["prompt_n"]) / 2:
            kind = "reused"
        elif server is not None and previous is not None:
            kind = "evicted" if server == previous else "moved"
        else:
            kind = "recomputed"
        if server is not None:
            last_server[r["conversation"]] = server
        totals = kinds.setdefault(kind, {"turns": 0, "prompt_n": 0, "prompt_s": 0.0})
        totals["turns"] += 1
        totals["prompt_n"] += r["prompt_n"]
        totals["prompt_s"] += r["prompt_ms"] / 1000
    return kinds


RUN_LIMIT_S = 300.0
"""Longest one run may take before its load generator is stopped (a run takes ~5-20 s)."""


MEDIAN_KEYS = (
    "reuse",
    "reuse_bound",
    "prefill_s",
    "e2e_p50",
    "e2e_p99",
    "ttft_p50",
    "ttft_p99",
    "spread",
    "errors",
    "requests",
)


def medians(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (cell, front): the median over repeats of every measure, and of the ratios to the
    anchor (and, for two balancers, to one) of the same repeat."""
    found = []
    cell_order = list(dict.fromkeys(r["cell"] for r in runs))
    front_order = [p.name for p in ALL_FRONTS]
    keys = sorted(
        {(r["cell"], r["front"]) for r in runs},
        key=lambda k: (cell_order.index(k[0]), front_order.index(k[1])),
    )
    for cell, front in keys:
        mine = [r for r in runs if r["cell"] == cell and r["front"] == front]
        row: dict[str, Any] = {"cell": cell, "front": front, "repeats": len(mine)}
        for key in (*MEDIAN_KEYS, *(f"vs_anchor_{k}" for k in ("reuse", "prefill_s", "e2e_p99"))):
            values = [r[key] for r in mine if r.get(key) is not None]
            row[key] = statistics.median(values) if values else None
        for group in ("servers", "front", "agents", "loadgen", "wall"):
            values = [r["cpu_s"][group] for r in mine if group in r["cpu_s"]]
            row[f"cpu_{group}_s"] = statistics.median(values) if values else None
        ratios = [r["vs_one_balancer_reuse"] for r in mine if r.get("vs_one_balancer_reuse")]
        row["vs_one_balancer_reuse"] = statistics.median(ratios) if ratios else None
        row.update({k: mine[0][k] for k in ("kind", "regime", "api", "variant")})
        found.append(row)
    return found


def add_ratios(runs: list[dict[str, Any]], repeat: int, cell: Cell) -> None:
    """Ratios of this repeat's runs of `cell` to its anchor (and two balancers to one)."""
    mine = {r["front"]: r for r in runs if r["repeat"] == repeat and r["cell"] == cell.name}
    anchor = next((r for r in mine.values() if r["kind"] == ANCHOR), None)
    for run in mine.values():
        if anchor is None:
            continue
        for key in ("reuse", "prefill_s", "e2e_p99"):
            if run.get(key) is not None and anchor.get(key):
                run[f"vs_anchor_{key}"] = run[key] / anchor[key]
    one = mine.get("Rower cache-aware")
    two = mine.get(TWO_BALANCERS.name)
    if one and two and one.get("reuse") and two.get("reuse") is not None:
        two["vs_one_balancer_reuse"] = two["reuse"] / one["reuse"]


def run(
    out: Path,
    *,
    quick: bool = False,
    repeats: int | None = None,
    only: Sequence[Cell] | None = None,
    front_names: set[str] | None = None,
    build: bool = True,
    trace: bool = False,
    name: str = "affinity",
) -> dict[str, Any]:
    """Run every cell with every front, `repeats` times interleaved; write `name`.json.
    `trace`: Rower's balancers log each request, so each run's `breakdown` splits the turns
    that recomputed their prompt into moved and evicted."""
    found = llama_servers.tools(build=build)
    if found is None:
        results: dict[str, Any] = {
            "scenario": "affinity",
            "skipped": "llama-server or model missing",
        }
        (out / f"{name}.json").write_text(json.dumps(results))
        return results
    server, model = found
    chosen = list(only or cells(quick))
    repeats = repeats or (1 if quick else 3)
    wanted = set().union(*(c.fronts for c in chosen))
    if front_names is not None:
        wanted &= front_names
    work = out / "work" / "affinity"
    work.mkdir(parents=True, exist_ok=True)
    runs: list[dict[str, Any]] = []
    started = time.monotonic()
    with procs.Procs(work / "logs") as runner:
        cache = ("--cache-ram", str(CACHE_RAM_MIB))
        servers = llama_servers.start(
            runner,
            server,
            model,
            count=SERVERS,
            slots=SLOTS,
            slot_context=SLOT_CONTEXT,
            extra=cache,
        )
        rig = start_fronts(runner, servers, wanted, work, trace=trace)
        for repeat in range(repeats):
            for cell_index, cell in enumerate(chosen):
                fronts = [p for p in ALL_FRONTS if p.name in cell.fronts and p.name in rig.fronts]
                shift = repeat % len(fronts) if fronts else 0
                for policy in fronts[shift:] + fronts[:shift]:
                    # Text of its own for every run: what an earlier run left in the
                    # servers' caches is no help; shapes and think times shared in a repeat.
                    unique = random.Random(f"{repeat} {cell.name} {policy.name}")
                    spec = conversation_spec(
                        cell,
                        shape_seed=1000 * repeat + cell_index,
                        text_seed=unique.getrandbits(48),
                        urls=[front.url for front in rig.fronts[policy.name]],
                        session_header=policy.kind == ANCHOR,
                    )
                    result = run_one(runner, rig, policy, cell, spec, work)
                    result["repeat"] = repeat
                    runs.append(result)
                    print(_line(result), flush=True)
                add_ratios(runs, repeat, cell)
    results = {
        "scenario": "affinity",
        "servers": SERVERS,
        "slots": SLOTS,
        "cache_ram_mib": CACHE_RAM_MIB,
        "slot_context": SLOT_CONTEXT,
        "repeats": repeats,
        "seconds": time.monotonic() - started,
        "cells": [{**asdict(c), "name": c.name} for c in chosen],
        "skipped": rig.skipped,
        "runs": runs,
        "medians": medians(runs),
    }
    (out / f"{name}.json").write_text(json.dumps(results, indent=1))
    return results


def _line(result: dict[str, Any]) -> str:
    def ms(value: float | None) -> str:
        return "-" if value is None else f"{value * 1000:.0f}"

    reuse = result["reuse"]
    return (
        f"  #{result['repeat']} {result['cell']:<40} {result['front']:<44} reuse "
        f"{'-' if reuse is None else f'{reuse:.0%}'}, prefill {result['prefill_s']:.1f} s, "
        f"e2e p50 {ms(result['e2e_p50'])} p99 {ms(result['e2e_p99'])} ms, "
        f"turns/server {result['turns_per_server']}, errors {result['errors']}"
        f", cache drops {result.get('server_cache_drops')}"
        + (
            f", conversations/server {result['conversations_per_server']}"
            f", outcomes {result['outcomes']}"
            if "outcomes" in result
            else ""
        )
    )


def main() -> None:
    """`python -m bench.scenario_affinity`: a subset of the scenario, for measuring one
    change (the whole scenario runs from `python -m bench.run --scenario affinity`)."""
    parser = argparse.ArgumentParser(prog="python -m bench.scenario_affinity", description=__doc__)
    parser.add_argument(
        "--cell",
        action="append",
        metavar="REGIME,API",
        help="e.g. fits,completion or exceeds,chat (repeatable; default: the quick run's cells)",
    )
    parser.add_argument(
        "--front",
        action="append",
        metavar="NAME",
        help=f"a front's name (repeatable; default: all): {', '.join(p.name for p in ALL_FRONTS)}",
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trace", action="store_true", help="split recomputed turns (access log)")
    parser.add_argument(
        "--conversations", type=int, help="conversations of every chosen cell (default: its own)"
    )
    parser.add_argument("--out", type=Path, default=Path("/tmp/affinity-subset"))
    parser.add_argument("--name", default="affinity", help="the result file's name (.json)")
    args = parser.parse_args()
    chosen = cells(quick=False)
    if args.cell:
        wanted = [tuple(c.split(",")) for c in args.cell]
        chosen = [c for c in chosen if (c.regime, c.api) in wanted and not c.variant]
    if args.conversations:
        chosen = [
            replace(c, workload=replace(c.workload, conversations=args.conversations))
            for c in chosen
        ]
    args.out.mkdir(parents=True, exist_ok=True)
    results = run(
        args.out,
        repeats=args.repeats,
        only=chosen,
        front_names=set(args.front) if args.front else None,
        trace=args.trace,
        name=args.name,
    )
    for row in results.get("medians", []):
        print(
            f"{row['cell']:<28} {row['front']:<44} reuse {row['reuse']:.2f} prefill "
            f"{row['prefill_s']:.1f} s, vs anchor: reuse {row['vs_anchor_reuse'] or 0:.2f} "
            f"prefill {row['vs_anchor_prefill_s'] or 0:.2f} p99 {row['vs_anchor_e2e_p99'] or 0:.2f}"
        )


if __name__ == "__main__":
    main()
