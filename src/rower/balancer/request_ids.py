"""Request ids: the one a client sent in `X-Request-Id` when it is fit to log, else a new one.

The id travels with the request to llama-server, comes back to the client in the response
headers (also on the errors the balancer answers itself) and is the key of the access log line,
so one request can be followed through a client's logs, the balancer's and the server's.
"""

from __future__ import annotations

import itertools
import os

HEADER = "X-Request-Id"

MAX_LENGTH = 128
"""Longer client ids are replaced: an id is a key, and a log line should stay a line."""


def request_id(sent: str | None) -> str:
    """The id of a request whose client sent `sent` (None: no header).

    A client's id is kept when it is 1 to `MAX_LENGTH` printable ASCII characters; anything
    else (control characters, other scripts, too long) could forge or break log lines, and is
    replaced by a new id (`new_id`).
    """
    if sent and len(sent) <= MAX_LENGTH and sent.isascii() and sent.isprintable():
        return sent
    return new_id()


_PROCESS = os.urandom(8).hex()
_COUNT = itertools.count(1)


def new_id() -> str:
    """32 hex digits: 16 random ones drawn when the balancer starts, then a counter.

    Unique within a balancer's life and, but for a 1 in 2**64 chance, across balancers; not
    secret (it is logged and returned). A UUID4 cost 1.8 µs and a system call (`getrandom`)
    per request; this costs 0.2 µs and none.
    """
    return f"{_PROCESS}{next(_COUNT):016x}"
