"""What happened to one proxied request, as the reverse proxy reports it to its listeners.

The proxy reports one `ProxyOutcome` per request, on every path (answered, refused by the
balancer, failed upstream, client gone), and knows nothing of what is done with it: metrics
count it, the access log writes it.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from rower.balancer.fleet import Dispatch
    from rower.balancer.request_needs import RequestNeeds


class Failure(enum.StrEnum):
    """Why a request did not get llama-server's whole answer: short, stable, for logs and counts."""

    SLOTS_FORBIDDEN = "slots_forbidden"
    """403: `/slots` is not exposed (`--slots-endpoint-enable`)."""
    BODY_TOO_LARGE = "body_too_large"
    """413: over `--max-request-body-bytes`."""
    BODY_TIMEOUT = "body_timeout"
    """408: the body did not arrive within `--request-body-timeout`."""
    BAD_REQUEST = "bad_request"
    """400: an inference request whose body is not a JSON object."""
    SHUTTING_DOWN = "shutting_down"
    """503: the balancer is stopping."""
    BUFFER_FULL = "buffer_full"
    """429: every slot busy and the buffer full, or buffering off."""
    BUFFER_TIMEOUT = "buffer_timeout"
    """504: no slot became free within `--buffered-request-timeout`."""
    MODEL_MISSING = "model_missing"
    """400: the fleet serves several models and the request named none."""
    MODEL_UNKNOWN = "model_unknown"
    """404: the request named a model the fleet does not serve."""
    NO_UPSTREAM = "no_upstream"
    """503: no llama-server is registered and usable."""
    UPSTREAMS_REFUSED = "upstreams_refused"
    """502: every upstream tried refused the connection."""
    UPSTREAM_FAILED = "upstream_failed"
    """502: the upstream failed before its answer's headers (reset, unreachable, bad answer)."""
    UPSTREAM_CUT = "upstream_cut"
    """The upstream failed after its headers were relayed: the client's answer was cut."""
    CLIENT_DISCONNECTED = "client_disconnected"
    """The client left before its answer was complete: nobody's fault upstream."""


CLIENT_CLOSED_REQUEST = 499
"""The status logged for a client that left before any answer was sent (nginx's convention)."""


class ProxyOutcome(msgspec.Struct, frozen=True):
    """One proxied request, from its arrival to the end of its answer.

    Attributes:
        request_id: the id sent upstream and back to the client (`X-Request-Id`).
        client: the client's address (its IP), or None when the transport has none.
        method: the HTTP method.
        path: the path as received, without the query string.
        status: the status sent to the client (499: the client left before any answer).
        upstream: the llama-server the request went to last, or None.
        seconds_waiting: time in the buffer before a slot was granted.
        seconds_to_first_byte: time from arrival to the upstream's response headers, or None.
        seconds_total: time from arrival to the end of the answer (or of the attempt).
        bytes_received: request body bytes read from the client.
        bytes_sent: response body bytes written to the client.
        connection_reused: whether the upstream answered on a kept-alive connection.
        retried: whether a kept-alive connection failed before the answer and the request was
            sent again on a new one (to the same server, on the same slot).
        failure: why the request did not get a whole answer, or None.
        error: the message that goes with `failure`.
        needs: what the request needs, once its body was read.
        dispatch: where the fleet core sent it, for requests that took a slot.
    """

    request_id: str
    client: str | None
    method: str
    path: str
    status: int
    upstream: str | None = None
    seconds_waiting: float = 0.0
    seconds_to_first_byte: float | None = None
    seconds_total: float = 0.0
    bytes_received: int = 0
    bytes_sent: int = 0
    connection_reused: bool = False
    retried: bool = False
    failure: Failure | None = None
    error: str | None = None
    needs: RequestNeeds | None = None
    dispatch: Dispatch | None = None

    @property
    def model(self) -> str | None:
        """The model the request's body named, if any."""
        return None if self.needs is None else self.needs.model


OutcomeListener = Callable[[ProxyOutcome], None]


def all_of(listeners: Sequence[OutcomeListener]) -> OutcomeListener | None:
    """One listener that tells each of `listeners`, in order; None when there are none."""
    if not listeners:
        return None
    if len(listeners) == 1:
        return listeners[0]
    chosen = tuple(listeners)

    def tell_each(outcome: ProxyOutcome) -> None:
        for listener in chosen:
            listener(outcome)

    return tell_each
