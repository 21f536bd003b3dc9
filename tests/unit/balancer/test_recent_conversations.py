"""How many conversations each server served lately."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from rower.balancer.recent_conversations import RecentConversations


def test_a_conversation_counts_once_however_many_turns() -> None:
    recent = RecentConversations(window=10.0)
    for now in (0.0, 1.0, 2.0):
        recent.saw("a", 1, now)
    recent.saw("a", 2, 2.0)
    recent.saw("b", 3, 2.0)
    assert (recent.count("a", 2.0), recent.count("b", 2.0), recent.count("c", 2.0)) == (2, 1, 0)


def test_a_conversation_without_a_turn_for_the_window_no_longer_counts() -> None:
    recent = RecentConversations(window=10.0)
    recent.saw("a", 1, 0.0)
    recent.saw("a", 2, 5.0)
    assert recent.count("a", 10.0) == 2
    assert recent.count("a", 10.1) == 1
    # A new turn makes it count again, from then.
    recent.saw("a", 1, 12.0)
    assert recent.count("a", 15.1) == 1
    assert recent.count("a", 22.1) == 0


def test_a_server_counts_at_most_its_bound() -> None:
    recent = RecentConversations(window=10.0, max_per_server=3)
    for conversation in range(5):
        recent.saw("a", conversation, 0.0)
    assert recent.count("a", 0.0) == 3


def test_a_server_without_a_turn_for_the_window_is_forgotten() -> None:
    recent = RecentConversations(window=10.0)
    recent.saw("gone", 1, 0.0)
    recent.saw("here", 2, 5.0)
    recent.saw("here", 2, 10.5)  # the first sweep: "gone" had its last turn 10.5 s ago
    assert len(recent) == 1
    assert recent.count("gone", 10.5) == 0
    recent.saw("gone", 3, 12.0)  # it came back: counted again
    assert (len(recent), recent.count("gone", 12.0)) == (2, 1)


def test_a_server_whose_conversations_all_expired_on_a_count_is_forgotten_too() -> None:
    recent = RecentConversations(window=10.0)
    recent.saw("a", 1, 0.0)
    assert recent.count("a", 10.5) == 0  # expires its one conversation: nothing kept for "a"
    recent.saw("b", 2, 11.0)  # the sweep meets "a" with nothing kept
    assert (len(recent), recent.count("b", 11.0)) == (1, 1)


_STEPS = st.lists(
    st.tuples(st.booleans(), st.sampled_from("abc"), st.integers(0, 5), st.floats(0, 6)),
    max_size=60,
)


@given(_STEPS)
def test_counts_match_a_model_whatever_the_order_of_turns_and_counts(
    steps: list[tuple[bool, str, int, float]],
) -> None:
    recent = RecentConversations(window=10.0, max_per_server=4)
    model: dict[str, dict[int, float]] = {}
    now = 0.0
    for is_turn, server, conversation, elapsed in steps:
        now += elapsed
        if is_turn:
            recent.saw(server, conversation, now)
            seen = model.setdefault(server, {})
            seen.pop(conversation, None)
            seen[conversation] = now
            while len(seen) > 4:
                del seen[next(iter(seen))]
        else:
            living = [c for c, last in model.get(server, {}).items() if last >= now - 10.0]
            assert recent.count(server, now) == len(living)
