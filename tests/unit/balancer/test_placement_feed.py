"""The feed of this balancer's placements: told only while followed, and never waiting."""

from __future__ import annotations

from rower.balancer.placement_feed import MAX_QUEUED, PlacementFeed
from rower.balancer.placement_wire import decode
from rower.balancer.prefix_memory import Placement

PLACED = Placement("127.0.0.1:8000", (1, 2, 3))


async def test_followers_get_each_placement_from_when_they_follow() -> None:
    feed = PlacementFeed()
    feed.publish(PLACED)
    assert feed.published == 0
    async with feed.follow() as first, feed.follow() as second:
        feed.publish(PLACED)
        feed.publish(None)
        for follower in (first, second):
            assert follower.lines.qsize() == 1
            assert decode(follower.lines.get_nowait().rstrip(b"\n")) == PLACED
        assert feed.followers == 2
    assert feed.followers == 0
    assert feed.published == 1


async def test_a_follower_that_falls_behind_is_let_go_and_the_others_are_not() -> None:
    feed = PlacementFeed()
    async with feed.follow() as slow, feed.follow() as quick:
        for _ in range(MAX_QUEUED + 5):
            feed.publish(PLACED)
            while not quick.lines.empty():
                quick.lines.get_nowait()
        assert slow.fell_behind
        assert not quick.fell_behind
        assert slow.lines.qsize() == MAX_QUEUED
        assert feed.dropped_followers == 1
