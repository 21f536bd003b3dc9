"""Which paths take a slot."""

from __future__ import annotations

import pytest

from rower.balancer.paths import INFERENCE_PATHS, is_slots_endpoint, path_class, takes_slot


@pytest.mark.parametrize("path", sorted(INFERENCE_PATHS))
def test_every_inference_path_takes_a_slot(path: str) -> None:
    assert takes_slot(path)
    assert takes_slot(path + "/")
    assert path_class(path) == path


@pytest.mark.parametrize("path", ["/v1/models", "/props", "/health", "/", "/metrics", "/tokenize"])
def test_other_paths_do_not(path: str) -> None:
    assert not takes_slot(path)
    assert path_class(path) == "other"


@pytest.mark.parametrize("path", ["/slots", "/slots/", "/slots/0", "//slots"])
def test_slots_endpoint(path: str) -> None:
    assert is_slots_endpoint(path)
    assert path_class(path) == "slots"


def test_lookalikes_are_not_slots() -> None:
    assert not is_slots_endpoint("/slotsx")
    assert not is_slots_endpoint("/v1/slots")
