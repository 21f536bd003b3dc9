"""`max_agents`: who the core lets register, and whom a report replaced."""

from __future__ import annotations

from rower.balancer.fleet import Fleet
from rower.status import StatusUpdate


def status(port: int) -> StatusUpdate:
    return StatusUpdate(external_llamacpp_addr=f"127.0.0.1:{port}", slots_idle=1, slots_total=1)


def test_a_full_fleet_admits_known_agents_and_newcomers_for_known_servers_only() -> None:
    fleet = Fleet(max_buffered=0, max_agents=2)
    fleet.report("a", status(1), 0.0, 0.0)
    fleet.report("b", status(2), 0.0, 0.0)
    assert fleet.admits("a", "127.0.0.1:1")
    assert not fleet.admits("c", "127.0.0.1:3")
    assert fleet.admits("c", "127.0.0.1:2")
    assert Fleet(max_buffered=0).admits("z", "127.0.0.1:9")


def test_report_names_the_agents_it_replaced() -> None:
    fleet = Fleet(max_buffered=0)
    fleet.report("old", status(1), 0.0, 0.0)
    assert fleet.superseded_by_last_report == []
    fleet.report("new", status(1), 1.0, 1.0)
    assert fleet.superseded_by_last_report == ["old"]
    fleet.report("new", status(1), 2.0, 2.0)
    assert fleet.superseded_by_last_report == []
    assert list(fleet.upstreams) == ["new"]
