"""The pick index chooses what a scan of every upstream would, under random fleet events."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from rower.balancer.fleet import Dispatch, Fleet
from rower.balancer.upstream import SlotAccounting, Upstream
from rower.status import StatusUpdate

AGENTS = [f"a{i}" for i in range(6)]


def scan_pick(fleet: Fleet, now: float) -> Upstream | None:
    """The policy as a plain scan: fewest busy, most free, least recently dispatched, first."""
    best: Upstream | None = None
    best_key = (0, 0, 0)
    for upstream in fleet.upstreams.values():
        free = upstream.slots_free(now)
        if free <= 0:
            continue
        key = (-upstream.slots_processing, free, -upstream.last_dispatch)
        if best is None or key > best_key:
            best, best_key = upstream, key
    return best


def status(agent: int, address: int, total: int, processing: int, flag: str) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr=f"127.0.0.1:{8000 + address}",
        agent_name=f"agent-{agent}",
        error="unreachable" if flag == "issue" else None,
        is_draining=flag == "draining",
        slots_idle=0 if flag == "issue" else total - min(processing, total),
        slots_processing=0 if flag == "issue" else min(processing, total),
        slots_total=0 if flag == "issue" else total,
        monitoring_interval_ms=1000,
    )


reports = st.tuples(
    st.just("report"),
    st.integers(0, len(AGENTS) - 1),
    st.integers(0, len(AGENTS) + 1),  # address: sometimes shared (superseding)
    st.integers(1, 4),
    st.integers(0, 4),
    st.sampled_from(["ok", "ok", "ok", "issue", "draining"]),
)
others = st.tuples(
    st.sampled_from(["request", "release", "abandon", "refused", "drain", "leave", "wait"]),
    st.integers(0, 40),
)


@settings(max_examples=300, deadline=None)
@given(
    accounting=st.sampled_from(SlotAccounting),
    events=st.lists(st.one_of(reports, others), max_size=80),
)
def test_index_picks_what_a_scan_picks(
    accounting: SlotAccounting, events: list[tuple[object, ...]]
) -> None:
    fleet = Fleet(max_buffered=8, slot_accounting=accounting)
    now, next_id, known = 0.0, 0, []
    for event in events:
        match event:
            case ("report", int(agent), int(address), int(total), int(busy), str(flag)):
                fleet.report(AGENTS[agent], status(agent, address, total, busy, flag), now, now)
            case ("request", _):
                next_id += 1
                known.append(next_id)
                fleet.request_slot(next_id, now)
            case ("release" | "abandon" | "refused" as kind, int(which)) if known:
                request_id = known[which % len(known)]
                if kind == "refused":
                    fleet.refused(request_id, now, now)
                else:
                    fleet.release(request_id, now, abandoned=kind == "abandon")
            case ("drain" | "leave" as kind, int(which)):
                agent_id = AGENTS[which % len(AGENTS)]
                if kind == "drain":
                    fleet.drain(agent_id)
                else:
                    fleet.remove_agent(agent_id)
            case ("wait", int(tenths)):
                now += tenths / 10
                fleet.time_passed(now)
        assert fleet.pick(now) is scan_pick(fleet, now)


def test_the_index_stays_small_however_many_changes() -> None:
    fleet = Fleet(max_buffered=0)
    for index in range(10):
        fleet.report(f"a{index}", status(index, index, 4, 0, "ok"), 0.0, 0.0)
    for request_id in range(10_000):
        fleet.request_slot(request_id, 1.0)
        fleet.release(request_id, 1.0)
    (pool,) = fleet.pools.values()
    assert len(pool.index) <= 4 * len(fleet.upstreams) + 64
    assert fleet.pick(1.0) is scan_pick(fleet, 1.0)


def test_streams_spread_by_busy_slots_not_by_free_ones() -> None:
    """Servers of 1, 2 and 3 slots whose slots share one compute unit each: the fourth stream
    goes where one runs, not to the biggest server's second slot (docs/decisions.md, "Fewest
    busy first"); among servers equally busy, the one with more free slots."""
    fleet = Fleet(max_buffered=0)
    for index, slots in enumerate((1, 2, 3)):
        fleet.report(f"a{index}", status(index, index, slots, 0, "ok"), 0.0, 0.0)
    picked = []
    for request_id in range(6):
        decision = fleet.request_slot(request_id, 1.0)
        assert isinstance(decision, Dispatch)
        picked.append(decision.agent_id)
    assert picked == ["a2", "a1", "a0", "a2", "a1", "a2"]


def test_a_released_slot_makes_its_server_the_least_busy_again() -> None:
    fleet = Fleet(max_buffered=0)
    fleet.report("small", status(0, 0, 1, 0, "ok"), 0.0, 0.0)
    fleet.report("big", status(1, 1, 4, 0, "ok"), 0.0, 0.0)
    for request_id in range(3):
        fleet.request_slot(request_id, 1.0)  # big, small, big
    fleet.release(1, 1.0)  # small is idle again: it has fewer busy than big's 2
    decision = fleet.request_slot(3, 1.0)
    assert isinstance(decision, Dispatch)
    assert decision.agent_id == "small"
