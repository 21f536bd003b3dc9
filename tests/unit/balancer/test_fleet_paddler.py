"""Paddler's slot accounting, kept as a benchmark baseline: a finished request frees nothing."""

from __future__ import annotations

from rower.balancer.fleet import Buffered, Dispatch, Fleet
from rower.balancer.upstream import SlotAccounting
from rower.status import StatusUpdate


def status(idle: int, processing: int) -> StatusUpdate:
    return StatusUpdate(
        external_llamacpp_addr="127.0.0.1:8000",
        slots_idle=idle,
        slots_processing=processing,
        slots_total=idle + processing,
    )


def test_a_finished_request_frees_its_slot_only_at_the_next_report() -> None:
    fleet = Fleet(max_buffered=5, slot_accounting=SlotAccounting.PADDLER)
    fleet.report("a", status(1, 0), now=0.0, wall=0.0)
    assert isinstance(fleet.request_slot(1, 0.0), Dispatch)
    assert isinstance(fleet.request_slot(2, 0.0), Buffered)
    assert fleet.release(1, 0.1) == []
    dispatches = fleet.report("a", status(1, 0), now=0.2, wall=0.2)
    assert [d.request_id for d in dispatches] == [2]


def test_rower_accounting_frees_the_slot_at_once() -> None:
    fleet = Fleet(max_buffered=5)
    fleet.report("a", status(1, 0), now=0.0, wall=0.0)
    assert isinstance(fleet.request_slot(1, 0.0), Dispatch)
    assert isinstance(fleet.request_slot(2, 0.0), Buffered)
    assert [d.request_id for d in fleet.release(1, 0.1)] == [2]
