"""`rower agent`'s flags and their ROWER_* variables."""

from __future__ import annotations

from rower.addresses import Address
from rower.cli import build_parser


def test_flags_and_defaults() -> None:
    args = build_parser({}, command="agent").parse_args(
        [
            "agent",
            "--management-addr",
            "a:1",
            "--management-addr",
            "b:2",
            "--local-llamacpp-addr",
            "127.0.0.1:8080",
            "--local-llamacpp-api-key",
            "k",
        ]
    )
    assert args.management_addr == [Address("a", 1), Address("b", 2)]
    assert args.local_llamacpp_addr == Address("127.0.0.1", 8080)
    assert args.external_llamacpp_addr is None
    assert args.llamacpp_api_key == "k"
    assert args.monitoring_interval == 1000
    assert (args.name, args.management_token) == (None, None)


def test_several_balancers_from_one_variable() -> None:
    environ = {
        "ROWER_MANAGEMENT_ADDR": "10.0.0.1:8085,10.0.0.2:8085",
        "ROWER_LOCAL_LLAMACPP_ADDR": "127.0.0.1:8080",
        "ROWER_EXTERNAL_LLAMACPP_ADDR": "aws:metadata:local-ipv4:8080",
        "ROWER_LOCAL_LLAMACPP_API_KEY": "key",
        "ROWER_MONITORING_INTERVAL": "250",
    }
    # A balancer reads ROWER_MANAGEMENT_ADDR as one address; that must not fail the agent.
    args = build_parser(environ, command="agent").parse_args(["agent"])
    assert args.management_addr == [Address("10.0.0.1", 8085), Address("10.0.0.2", 8085)]
    assert args.external_llamacpp_addr.is_aws_metadata
    assert args.llamacpp_api_key == "key"
    assert args.monitoring_interval == 250
