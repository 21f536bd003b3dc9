"""The `rower` command line: flags, `ROWER_*` variables, and their errors."""

from __future__ import annotations

import pytest

from rower.addresses import Address
from rower.cli import build_parser, env_var_name, main


def parse(argv: list[str], environ: dict[str, str] | None = None) -> dict[str, object]:
    return vars(build_parser(environ or {}, command=argv[0]).parse_args(argv))


def test_env_var_names() -> None:
    assert env_var_name("--management-addr") == "ROWER_MANAGEMENT_ADDR"
    assert env_var_name("--max-buffered-requests") == "ROWER_MAX_BUFFERED_REQUESTS"


def test_balancer_defaults_match_the_spec() -> None:
    args = parse(
        ["balancer", "--management-addr", "127.0.0.1:1", "--reverseproxy-addr", "127.0.0.1:2"]
    )
    assert args["management_addr"] == Address("127.0.0.1", 1)
    assert args["buffered_request_timeout"] == 10000
    assert args["max_buffered_requests"] == 30
    assert args["statsd_prefix"] == "rower"
    assert args["statsd_reporting_interval"] == 10000
    assert args["slots_endpoint_enable"] is False
    assert args["log_level"] == "info"


def test_paddler_alias_for_the_buffer_timeout() -> None:
    args = parse(
        [
            "balancer",
            "--management-addr=127.0.0.1:1",
            "--reverseproxy-addr=127.0.0.1:2",
            "--buffered-requests-timeout=500",
        ]
    )
    assert args["buffered_request_timeout"] == 500


def test_environment_fills_required_flags_and_the_command_line_wins() -> None:
    environ = {
        "ROWER_MANAGEMENT_ADDR": "127.0.0.1:5",
        "ROWER_REVERSEPROXY_ADDR": "127.0.0.1:6",
        "ROWER_MAX_BUFFERED_REQUESTS": "7",
        "ROWER_SLOTS_ENDPOINT_ENABLE": "true",
        "ROWER_MANAGEMENT_CORS_ALLOWED_HOST": "http://a.example,http://b.example",
    }
    args = parse(["balancer", "--max-buffered-requests", "9"], environ)
    assert args["management_addr"] == Address("127.0.0.1", 5)
    assert args["max_buffered_requests"] == 9
    assert args["slots_endpoint_enable"] is True
    assert args["management_cors_allowed_host"] == ["http://a.example", "http://b.example"]


def test_agent_repeatable_management_addr_from_environment() -> None:
    environ = {"ROWER_MANAGEMENT_ADDR": "127.0.0.1:1,127.0.0.1:2"}
    args = parse(["agent", "--local-llamacpp-addr", "127.0.0.1:8080"], environ)
    assert args["management_addr"] == [Address("127.0.0.1", 1), Address("127.0.0.1", 2)]


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"ROWER_MAX_BUFFERED_REQUESTS": "many"}, "ROWER_MAX_BUFFERED_REQUESTS='many'"),
        ({"ROWER_SLOTS_ENDPOINT_ENABLE": "maybe"}, "use 1 or 0"),
        ({"ROWER_LOG_LEVEL": "loud"}, "choose from"),
        ({"ROWER_MANAGEMENT_ADDR": "http://x:1"}, "without a scheme"),
    ],
)
def test_bad_environment_values_say_what_is_wrong(
    environ: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse(
            ["balancer", "--management-addr", "127.0.0.1:1", "--reverseproxy-addr", "127.0.0.1:2"],
            environ,
        )
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["balancer", "--reverseproxy-addr", "127.0.0.1:2"], "--management-addr"),
        (
            ["balancer", "--management-addr", "1.2.3.4", "--reverseproxy-addr", "127.0.0.1:2"],
            "HOST:PORT",
        ),
        (
            [
                "balancer",
                "--management-addr",
                "127.0.0.1:1",
                "--reverseproxy-addr",
                "127.0.0.1:2",
                "--buffered-request-timeout",
                "-5",
            ],
            "milliseconds",
        ),
        (["agent", "--management-addr", "127.0.0.1:1"], "--local-llamacpp-addr"),
    ],
)
def test_bad_flags_say_what_is_wrong(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        parse(argv)
    assert message in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.startswith("rower ")
