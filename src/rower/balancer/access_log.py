"""The access log: one line per proxied request, on the logger `rower.access`.

It is an outcome listener of the reverse proxy, beside the metrics. `--access-log` says where
the lines go: `stderr` (the default, with the other logs), `off`, or a file (reopened when
logrotate moves it). `--log-format` says how they look: in text, `key=value` pairs after the
method, path and status (values with spaces, quotes or non-ASCII characters quoted and escaped,
so a client cannot forge a line); in JSON, the same keys in the log object. Lines are written at
INFO whatever `--log-level` says: turning the access log off is `--access-log off`.

The lines look as the logger `rower.access` would write them through `rower.logs`' formats,
but they do not go through `logging`: a record, its formatting and its handler cost 25 µs a line
(bench/proxy_python_cost.py), as much as the rest of a small request's Python. `AccessLog`
writes the same line itself, the time formatted once a second; each line is written (and
flushed) as it is made, as `logging` did.
"""

from __future__ import annotations

import functools
import json
import logging
import logging.handlers
import re
import sys
import time
from collections.abc import Callable
from typing import Any

from rower.balancer.outcome import ProxyOutcome
from rower.logs import JSON_TIME, TEXT_TIME

LOGGER = "rower.access"

OFF = "off"
STDERR = "stderr"

HEAD = ("method", "path", "status")
"""Written first in a text line, without their keys, as in every web server's access log."""

ONLY_ON_FAILURE = ("failure", "error")

ONLY_WHEN_SET = ("affinity", "matched_blocks", *ONLY_ON_FAILURE)
"""Written in a text line only with a value: the cache-aware pick's fields, and why a request
failed (so a grep for `failure=` finds every failed request)."""


def access_fields(outcome: ProxyOutcome) -> dict[str, Any]:
    """The line's fields, in the order they are written; times in milliseconds.

    `affinity` and `matched_blocks`: what the cache-aware pick did with the request
    (`cache_routing.Affinity`) and how many blocks of its prefix the balancer had sent that
    server before; absent for least-busy routing and requests without a prefix.
    """
    dispatch = outcome.dispatch
    affinity = None if dispatch is None else dispatch.affinity
    matched = None if dispatch is None or affinity is None else dispatch.matched_blocks
    return {
        "client": outcome.client,
        "method": outcome.method,
        "path": outcome.path,
        "status": outcome.status,
        "model": outcome.model,
        "upstream": outcome.upstream,
        "wait_ms": _ms(outcome.seconds_waiting),
        "ttfb_ms": _ms(outcome.seconds_to_first_byte),
        "duration_ms": _ms(outcome.seconds_total),
        "bytes_in": outcome.bytes_received,
        "bytes_out": outcome.bytes_sent,
        "request_id": outcome.request_id,
        "affinity": None if affinity is None else affinity.value,
        "matched_blocks": matched,
        "failure": None if outcome.failure is None else str(outcome.failure),
        "error": outcome.error,
    }


def text_line(fields: dict[str, Any]) -> str:
    """`POST /v1/completions 200 client=... model=... ...`; a missing value is `-`.

    `failure` and `error` are written only when the request failed, so a grep for
    `failure=` finds every failed request; `affinity` and `matched_blocks` only when the
    cache-aware pick decided.
    """
    words = [_value(fields[key]) for key in HEAD]
    words.extend(
        f"{key}={_value(value)}"
        for key, value in fields.items()
        if key not in HEAD and (value is not None or key not in ONLY_WHEN_SET)
    )
    return " ".join(words)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _value(value: object) -> str:
    if value is None:
        return "-"
    if type(value) is int or type(value) is float:
        return str(value)
    text = str(value)
    if text and _BARE.fullmatch(text):
        return text
    return json.dumps(text)


_BARE = re.compile(r"[!#-<>-~]+")
"""A value written as it is: printable ASCII without a space, a quote or `=` (anything else is
quoted and escaped, so that a client cannot forge a line)."""


class AccessLog:
    """Writes each outcome as an access log line; `observe` is the outcome listener.

    Args:
        log_format: `text` or `json`, as `--log-format`.
        write: writes one whole line (with its newline) where the lines go.
        clock: the wall clock, in seconds (`time.time`).
    """

    def __init__(
        self,
        log_format: str,
        write: Callable[[str], None],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.json_lines = log_format == "json"
        self._write = write
        self._clock = clock
        self._second = -1
        self._stamp = ""

    def observe(self, outcome: ProxyOutcome) -> None:
        """Write one line for `outcome`."""
        fields = access_fields(outcome)
        now = self._clock()
        if self.json_lines:
            entry: dict[str, Any] = {
                "time": f"{self._time(now, time.gmtime, JSON_TIME)}.{_millis(now):03d}Z",
                "level": "info",
                "logger": LOGGER,
                "message": f"{outcome.method} {_value(outcome.path)} {outcome.status}",
            }
            entry.update(fields)
            self._write(json.dumps(entry) + "\n")
        else:
            stamp = self._time(now, time.localtime, TEXT_TIME)
            self._write(f"{stamp},{_millis(now):03d} INFO    {LOGGER}: {text_line(fields)}\n")

    def _time(self, now: float, convert: Callable[[float], time.struct_time], layout: str) -> str:
        second = int(now)
        if second != self._second:
            self._second, self._stamp = second, time.strftime(layout, convert(second))
        return self._stamp


def _millis(now: float) -> int:
    return int((now - int(now)) * 1000)


def open_access_log(destination: str, log_format: str) -> AccessLog | None:
    """The access log `--access-log destination` asks for, or None for `off`.

    Raises:
        OSError: the file cannot be opened for appending; the message says what to do.
    """
    if destination == OFF:
        return None
    if destination == STDERR:
        return AccessLog(log_format, _to_stderr)
    try:
        handler = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
    except OSError as error:
        raise OSError(
            f"cannot open the access log {destination!r} ({error.strerror}); "
            "give a writable file, --access-log stderr, or --access-log off"
        ) from error
    return AccessLog(log_format, functools.partial(_to_file, handler))


def _to_stderr(line: str) -> None:
    # Looked up each time: the stream the other logs go to (tests and embedders replace it).
    stream = sys.stderr
    stream.write(line)
    stream.flush()


def _to_file(handler: logging.handlers.WatchedFileHandler, line: str) -> None:
    # The handler only for what it does with the file: reopened when logrotate moved it.
    handler.reopenIfNeeded()
    stream = handler.stream
    assert stream is not None, "the access log's file is never closed while the balancer runs"
    stream.write(line)
    stream.flush()
