"""Logging to stderr as text for people or as one JSON object a line for collectors."""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from collections.abc import Callable

TEXT_TIME = "%Y-%m-%d %H:%M:%S"
"""The text format's time before its milliseconds (`logging.Formatter`'s `asctime`, whose
default layout this is; the access log writes the same, `access_log`)."""

JSON_TIME = "%Y-%m-%dT%H:%M:%S"
"""The JSON format's `time` before its milliseconds (UTC)."""


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, any exception, and the
    record's structured `fields` (a dict passed as `extra={"fields": ...}`) as keys of their own.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime(JSON_TIME, time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        fields = getattr(record, "fields", None)
        if fields:
            entry.update(fields)
        return json.dumps(entry)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `log_format` (text or json), for stderr and for log files alike."""
    if log_format == "json":
        return JsonFormatter()
    return logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")


def configure_logging(level: str, log_format: str) -> None:
    """Send `rower` logs at `level` and above to stderr in `log_format` (text or json)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter(log_format))
    # What no Rower format writes, and what each record would otherwise look up (the logging
    # HOWTO's "Optimization"): the caller's frame, the thread and the process. An access log
    # line cost 29 µs, about 3 of them these (bench/proxy_python_cost.py, 3 interleaved pairs).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp logs every request at info; that is the proxy's hot path.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


class Throttle:
    """Lets one log line of each kind through per `period` seconds and counts the others.

    Whoever reaches a listener can make the balancer log (a malformed request, a wrong token, a
    refused status line): without a bound, a client could fill the disk. Kinds are a fixed set
    named in the code, never taken from the input, so the table stays small.

    Args:
        period: least time between two lines of one kind, in seconds.
        clock: monotonic clock, in seconds.
    """

    def __init__(self, period: float = 10.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.period = period
        self._clock = clock
        self._quiet_until: dict[str, float] = {}
        self._held_back: dict[str, int] = {}

    def admit(self, kind: str) -> int | None:
        """None if a line of `kind` must not be logged now, else how many were held back since."""
        now = self._clock()
        if now < self._quiet_until.get(kind, -math.inf):
            self._held_back[kind] = self._held_back.get(kind, 0) + 1
            return None
        self._quiet_until[kind] = now + self.period
        return self._held_back.pop(kind, 0)


THROTTLE = Throttle()
"""The process's throttle for log lines that outside input can cause."""


def log_throttled(
    logger: logging.Logger,
    level: int,
    kind: str,
    message: str,
    *args: object,
    throttle: Throttle = THROTTLE,
    exc_info: bool = False,
) -> None:
    """`logger.log(level, message, *args)` unless a line of `kind` was logged a moment ago.

    The next line that gets through says how many of its kind were left out. `exc_info` adds
    the exception being handled, as `logger.exception` does.
    """
    held_back = throttle.admit(f"{logger.name}:{kind}")
    if held_back is None:
        return
    if held_back:
        message += " (and %d more like it in the last %g s, not logged)"
        args = (*args, held_back, throttle.period)
    logger.log(level, message, *args, exc_info=exc_info)
