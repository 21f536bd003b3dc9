"""The buffer's line: first come first served, but a server's own waiters go first."""

from __future__ import annotations

from rower.balancer.waiting_line import Waiter, WaitingLine


def line_of(*waiters: tuple[int, float, str | None]) -> WaitingLine:
    line = WaitingLine()
    for request_id, since, home in waiters:
        line.add(request_id, Waiter(None, since, home))
    return line


def test_without_homes_the_oldest_goes_first() -> None:
    line = line_of((1, 0.0, None), (2, 0.1, None))
    assert line.next_for("a", 0.2, 2.0) == 1
    line.remove(1)
    assert line.next_for("a", 0.2, 2.0) == 2


def test_a_server_takes_its_own_oldest_waiter_before_older_ones_elsewhere() -> None:
    line = line_of((1, 0.0, "b"), (2, 0.1, "a"), (3, 0.2, "a"))
    assert line.next_for("a", 0.5, 2.0) == 2
    assert line.next_for("b", 0.5, 2.0) == 1
    # A server nobody calls home takes no one, for a while: each waiter has a server.
    assert line.next_for("c", 0.5, 2.0) is None
    assert line.next_for("c", 2.0, 2.0) == 1


def test_a_server_nobody_calls_home_takes_the_oldest_without_a_home() -> None:
    line = line_of((1, 0.0, "b"), (2, 0.1, None), (3, 0.2, None))
    assert line.next_for("c", 0.5, 2.0) == 2
    assert line.next_for("b", 0.5, 2.0) == 1
    line.remove(2)
    assert line.next_for("c", 0.5, 2.0) == 3
    line.clear()
    assert line.next_for("c", 0.5, 2.0) is None


def test_the_oldest_waits_no_longer_than_its_patience() -> None:
    line = line_of((1, 0.0, "b"), (2, 0.1, "a"))
    assert line.next_for("a", 1.9, 2.0) == 2
    assert line.next_for("a", 2.0, 2.0) == 1


def test_first_puts_a_request_before_everyone_in_both_lines() -> None:
    line = line_of((1, 0.0, "a"))
    line.add(2, Waiter(None, 0.5, "a"), first=True)
    assert [request_id for request_id, _ in line.items()] == [2, 1]
    assert line.next_for("a", 0.6, 2.0) == 2


def test_removal_leaves_no_trace() -> None:
    line = line_of((1, 0.0, "a"), (2, 0.1, None))
    assert line.remove(1) is not None
    assert line.remove(1) is None
    assert 1 not in line
    assert len(line) == 1
    assert line.next_for("a", 0.2, 2.0) == 2
    line.clear()
    assert not line
    assert line.next_for("a", 0.3, 2.0) is None


def test_a_crowded_server_lets_a_new_conversation_go_but_not_others() -> None:
    line = WaitingLine()
    line.add(1, Waiter(None, 0.0, None, emptier_until=1.0))
    assert line.has_newcomers
    assert line.next_for("a", 0.5, 2.0, lambda: True) is None
    assert line.next_for("a", 0.5, 2.0, lambda: False) == 1
    assert line.next_for("a", 0.5, 2.0) == 1
    # For as long as it said, within its patience.
    assert line.next_for("a", 1.0, 2.0, lambda: True) == 1
    line.add(2, Waiter(None, 0.1, None))
    assert line.next_for("a", 0.5, 2.0, lambda: True) == 2
    # The oldest of the two lines without a home goes first where it may.
    assert line.next_for("a", 0.5, 2.0, lambda: False) == 1
    line.add(3, Waiter(None, 0.2, "a"))
    assert line.next_for("a", 0.5, 2.0, lambda: True) == 3
    line.remove(1)
    assert not line.has_newcomers
    assert line.next_for("b", 0.5, 2.0, lambda: True) == 2
