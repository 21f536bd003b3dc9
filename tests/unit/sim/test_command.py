"""`rower sim`'s model name flags and what the sim then calls its model."""

from __future__ import annotations

import pytest

from rower.cli import build_parser
from rower.sim.responses import Identity, models


def test_model_and_aliases() -> None:
    args = build_parser({}, command="sim").parse_args(
        ["sim", "--model", "chat", "--alias", "chat-fast", "--alias", "c"]
    )
    assert (args.model, args.alias) == ("chat", ["chat-fast", "c"])
    assert build_parser({}, command="sim").parse_args(["sim"]).alias == []


def test_aliases_from_one_variable() -> None:
    args = build_parser({"ROWER_ALIAS": "a,b"}, command="sim").parse_args(["sim"])
    assert args.alias == ["a", "b"]


@pytest.mark.parametrize("flags", [["--alias", ""], ["--alias", " "], ["--model", "x" * 257]])
def test_a_name_must_be_one_a_balancer_accepts(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        build_parser({}, command="sim").parse_args(["sim", *flags])
    assert "is not a model name (1 to 256 characters)" in capsys.readouterr().err


def test_v1_models_lists_the_id_among_its_aliases_once() -> None:
    identity = Identity(model="chat", n_ctx=64, total_slots=1, aliases=("c", "chat", "c"))
    (listed,) = models(identity)["data"]
    assert (listed["id"], listed["aliases"]) == ("chat", ["chat", "c"])
