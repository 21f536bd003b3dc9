"""The access log: one line per proxied request, on the logger `rower.access`.

It is an outcome listener of the reverse proxy, beside the metrics. `--access-log` says where
the lines go: `stderr` (the default, with the other logs), `off`, or a file (reopened when
logrotate moves it). `--log-format` says how they look: in text, `key=value` pairs after the
method, path and status (values with spaces, quotes or non-ASCII characters quoted and escaped,
so a client cannot forge a line); in JSON, the same keys in the log object. Lines are written at
INFO whatever `--log-level` says: turning the access log off is `--access-log off`.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import re
from typing import Any

from rower.balancer.outcome import ProxyOutcome
from rower.logs import formatter

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
        logger: where the lines go (the `rower.access` logger).
    """

    def __init__(self, log_format: str, logger: logging.Logger) -> None:
        self.json_lines = log_format == "json"
        self.logger = logger

    def observe(self, outcome: ProxyOutcome) -> None:
        """Write one line for `outcome`."""
        fields = access_fields(outcome)
        if self.json_lines:
            summary = f"{outcome.method} {_value(outcome.path)} {outcome.status}"
            self.logger.info(summary, extra={"fields": fields})
        else:
            self.logger.info(text_line(fields))


def open_access_log(destination: str, log_format: str) -> AccessLog | None:
    """The access log `--access-log destination` asks for, or None for `off`.

    Raises:
        OSError: the file cannot be opened for appending; the message says what to do.
    """
    if destination == OFF:
        return None
    logger = logging.getLogger(LOGGER)
    logger.setLevel(logging.INFO)
    for previous in logger.handlers:
        previous.close()
    if destination == STDERR:
        logger.handlers[:] = []
        logger.propagate = True
    else:
        try:
            handler = logging.handlers.WatchedFileHandler(destination, encoding="utf-8")
        except OSError as error:
            raise OSError(
                f"cannot open the access log {destination!r} ({error.strerror}); "
                "give a writable file, --access-log stderr, or --access-log off"
            ) from error
        handler.setFormatter(formatter(log_format))
        logger.handlers[:] = [handler]
        logger.propagate = False
    return AccessLog(log_format, logger)
