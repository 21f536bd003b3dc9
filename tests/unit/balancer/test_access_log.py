"""The access log's lines, text and JSON, written through real logging handlers to a file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from msgspec.structs import replace

from rower.balancer.access_log import AccessLog, access_fields, open_access_log, text_line
from rower.balancer.cache_routing import Affinity
from rower.balancer.fleet import Dispatch
from rower.balancer.outcome import Failure, ProxyOutcome, all_of
from rower.balancer.request_needs import RequestNeeds
from rower.logs import formatter

SERVED = ProxyOutcome(
    request_id="abc123",
    client="127.0.0.1",
    method="POST",
    path="/v1/chat/completions",
    status=200,
    upstream="127.0.0.1:8081",
    seconds_waiting=0.0012,
    seconds_to_first_byte=0.0345678,
    seconds_total=1.5,
    bytes_received=412,
    bytes_sent=9843,
    needs=RequestNeeds("/v1/chat/completions", takes_slot=True, model="llama"),
)

REFUSED = ProxyOutcome(
    request_id="r-1",
    client="::1",
    method="POST",
    path="/completion",
    status=429,
    upstream=None,
    seconds_waiting=0.0,
    seconds_to_first_byte=None,
    seconds_total=0.0001,
    failure=Failure.BUFFER_FULL,
    error="All llama.cpp slots are busy and the request buffer is full; retry later",
)


def test_a_served_request_is_one_line_with_every_field() -> None:
    line = text_line(access_fields(SERVED))
    assert line == (
        "POST /v1/chat/completions 200 client=127.0.0.1 model=llama upstream=127.0.0.1:8081 "
        "wait_ms=1.2 ttfb_ms=34.568 duration_ms=1500.0 bytes_in=412 bytes_out=9843 "
        "request_id=abc123"
    )


def test_a_cache_aware_pick_says_what_it_did_and_what_it_matched() -> None:
    dispatch = Dispatch(7, "agent-1", "127.0.0.1:8081", Affinity.RETURN, matched_blocks=0)
    line = text_line(access_fields(replace(SERVED, dispatch=dispatch)))
    assert line.endswith("request_id=abc123 affinity=return matched_blocks=0")
    hit = replace(dispatch, affinity=Affinity.HIT, matched_blocks=12)
    assert text_line(access_fields(replace(SERVED, dispatch=hit))).endswith(
        "affinity=hit matched_blocks=12"
    )
    least_busy = replace(dispatch, affinity=None)
    assert "affinity" not in text_line(access_fields(replace(SERVED, dispatch=least_busy)))


def test_a_failed_request_says_why_and_missing_values_are_dashes() -> None:
    line = text_line(access_fields(REFUSED))
    assert line.startswith("POST /completion 429 client=::1 model=- upstream=- wait_ms=0.0 ")
    assert "ttfb_ms=- " in line
    assert line.endswith(
        'failure=buffer_full error="All llama.cpp slots are busy and the request buffer is '
        'full; retry later"'
    )


@pytest.mark.parametrize(
    "path",
    ["/a b", '/a"b', "/a=b", "/naïve", "/x\nPOST /forged 200", "/x\x1b[31m", ""],
)
def test_a_value_that_could_break_the_line_is_quoted_and_escaped(path: str) -> None:
    line = text_line(access_fields(replace(SERVED, path=path)))
    assert "\n" not in line
    assert "\x1b" not in line
    quoted = line.split(" 200 ")[0].removeprefix("POST ")
    assert json.loads(quoted) == path


@pytest.mark.parametrize("log_format", ["text", "json"])
@pytest.mark.parametrize("now", [1764682644.385, 1764682644.0, 1764682699.9996])
def test_a_line_is_what_the_logger_would_have_written(log_format: str, now: float) -> None:
    lines: list[str] = []
    AccessLog(log_format, lines.append, clock=lambda: now).observe(SERVED)
    fields = access_fields(SERVED)
    message = "POST /v1/chat/completions 200" if log_format == "json" else text_line(fields)
    record = logging.LogRecord("rower.access", logging.INFO, __file__, 0, message, None, None)
    record.created, record.msecs = now, int((now - int(now)) * 1000) + 0.0
    if log_format == "json":
        record.fields = fields
    expected = formatter(log_format).format(record) + "\n"
    if log_format == "json":
        assert json.loads(lines[0]) == json.loads(expected)
    else:
        assert lines == [expected]


def test_lines_go_to_stderr_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    access_log = open_access_log("stderr", "text")
    assert access_log is not None
    access_log.observe(SERVED)
    assert " INFO    rower.access: POST /v1/chat/completions 200 " in capsys.readouterr().err


def test_a_moved_file_is_reopened(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = open_access_log(str(path), "text")
    assert access_log is not None
    access_log.observe(SERVED)
    path.rename(tmp_path / "access.log.1")  # what logrotate does
    access_log.observe(REFUSED)
    assert "failure=buffer_full" in path.read_text()
    assert "failure" not in (tmp_path / "access.log.1").read_text()


def test_text_lines_go_to_the_file_in_the_text_format(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = open_access_log(str(path), "text")
    assert access_log is not None
    access_log.observe(SERVED)
    access_log.observe(REFUSED)
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert " INFO    rower.access: POST /v1/chat/completions 200 client=127.0.0.1 " in lines[0]
    assert "failure=buffer_full" in lines[1]


def test_json_lines_carry_the_fields_as_keys(tmp_path: Path) -> None:
    path = tmp_path / "access.log"
    access_log = open_access_log(str(path), "json")
    assert access_log is not None
    access_log.observe(SERVED)
    access_log.observe(REFUSED)
    served, refused = (json.loads(line) for line in path.read_text().splitlines())
    assert served["logger"] == "rower.access"
    assert served["level"] == "info"
    assert served["message"] == "POST /v1/chat/completions 200"
    assert {k: served[k] for k in ("status", "model", "ttfb_ms", "bytes_out", "request_id")} == {
        "status": 200,
        "model": "llama",
        "ttfb_ms": 34.568,
        "bytes_out": 9843,
        "request_id": "abc123",
    }
    assert served["failure"] is None
    assert refused["failure"] == "buffer_full"
    assert refused["ttfb_ms"] is None
    assert refused["upstream"] is None


def test_lines_are_written_whatever_the_log_level(tmp_path: Path) -> None:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        path = tmp_path / "access.log"
        access_log = open_access_log(str(path), "text")
        assert access_log is not None
        access_log.observe(SERVED)
    finally:
        root.setLevel(level)
    assert len(path.read_text().splitlines()) == 1


def test_off_is_no_access_log() -> None:
    assert open_access_log("off", "text") is None


def test_a_file_that_cannot_be_opened_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(OSError, match="--access-log off"):
        open_access_log(str(tmp_path / "missing-dir" / "access.log"), "text")


def test_all_of_tells_every_listener_in_order() -> None:
    heard: list[tuple[str, int]] = []
    listener = all_of(
        [lambda o: heard.append(("metrics", o.status)), lambda o: heard.append(("log", o.status))]
    )
    assert listener is not None
    listener(SERVED)
    assert heard == [("metrics", 200), ("log", 200)]
    assert all_of([]) is None
