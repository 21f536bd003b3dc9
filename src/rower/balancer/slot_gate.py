"""The asyncio face of the fleet core: a request awaits its slot here.

The core decides; this module only turns its decisions into resolved futures and raised errors,
and makes sure a slot that was granted to a request nobody awaits any more is given back.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Callable, Mapping

from rower.balancer.answer_timings import AnswerTimings
from rower.balancer.fleet import Buffered, Dispatch, Fleet, Rejected, RejectReason
from rower.balancer.models import UNKNOWN
from rower.balancer.placement_feed import PlacementFeed
from rower.balancer.prefix_memory import Placement
from rower.balancer.request_needs import RequestNeeds
from rower.balancer.upstream import Upstream
from rower.status import StatusUpdate


class SlotUnavailable(Exception):
    """No slot for this request: buffer full or disabled (429), the wait timed out (504), no
    model named in a fleet of several (400), or a model the fleet does not serve (404).

    `openai_code` is set for errors clients read in OpenAI's shape (`model_not_found`).
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        retry_after: int | None = None,
        openai_code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after
        self.openai_code = openai_code


class SlotGate:
    """Grants slots to requests, buffering them in FIFO order while none is free.

    Args:
        fleet: the state core.
        buffer_timeout: longest wait for a slot, in seconds.
        model_timeouts: longest wait for a slot of some models, in seconds (else
            `buffer_timeout`).
        clock: monotonic clock (seconds).
        wall_clock: wall clock (seconds since the epoch).
    """

    def __init__(
        self,
        fleet: Fleet,
        *,
        buffer_timeout: float,
        model_timeouts: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.fleet = fleet
        self.buffer_timeout = buffer_timeout
        self.model_timeouts = dict(model_timeouts or {})
        self.clock = clock
        self.wall_clock = wall_clock
        self._ids = itertools.count(1)
        self._waiters: dict[int, asyncio.Future[Dispatch]] = {}
        self.changed = asyncio.Event()
        """Set whenever the fleet changed; observers clear it after reading."""
        self.closing = False
        """The balancer is shutting down: no request gets a slot any more."""
        self.placements = PlacementFeed()
        """Where the balancers following this one hear what it sent where (`peers`)."""

    def new_request_id(self) -> int:
        """A fresh id for a request that will ask for a slot."""
        return next(self._ids)

    async def acquire(
        self, request_id: int, *, needs: RequestNeeds | None = None, retry: bool = False
    ) -> Dispatch:
        """Wait for a slot for `request_id`; raises `SlotUnavailable` when there is none.

        `needs` is what the request needs (read by the proxy); it steers the pick.

        If the caller is cancelled (its client left) or times out, the request leaves the
        buffer, or gives its slot back if one was granted at that very moment.
        """
        if self.closing:
            raise _shutting_down()
        decision = self.fleet.request_slot(request_id, self.clock(), needs=needs, retry=retry)
        self._touch()
        if isinstance(decision, Dispatch):
            self.placements.publish(decision.placement)
            return decision
        if isinstance(decision, Rejected):
            raise _rejection(decision, self.buffer_timeout)
        assert isinstance(decision, Buffered)
        if decision.until is not None:
            self._expire_at(decision.until)
        waiter: asyncio.Future[Dispatch] = asyncio.get_running_loop().create_future()
        self._waiters[request_id] = waiter
        granted = False
        try:
            # Not asyncio.wait_for: on 3.11 it swallows a cancellation that races with the
            # result, and the handler of a client that left would go on to hold a slot.
            timeout = self.model_timeouts.get(decision.model, self.buffer_timeout)
            async with asyncio.timeout(timeout):
                dispatch = await waiter
            granted = True
            self.placements.publish(dispatch.placement)
            return dispatch
        except TimeoutError:
            raise SlotUnavailable(
                504,
                f"No llama.cpp slot became free within {timeout:g} s; "
                "add servers or slots, or raise --buffered-request-timeout",
            ) from None
        finally:
            self._waiters.pop(request_id, None)
            if not granted:
                self.release(request_id)

    def close(self) -> None:
        """Shutting down: every waiting request and every later one gets a 503."""
        self.closing = True
        for waiter in list(self._waiters.values()):
            if not waiter.done():
                waiter.set_exception(_shutting_down())

    def drain(self, agent_id: str) -> bool:
        """An operator drains an agent; returns whether it is registered."""
        known = self.fleet.drain(agent_id)
        self._touch()
        return known

    def any_upstream(self, model: str | None = None) -> Upstream | None:
        """An upstream (of `model`, if it names one the fleet serves) for a request that takes
        no slot; such requests never wait."""
        return self.fleet.pick_any(self.clock(), model)

    def release(self, request_id: int, *, abandoned: bool = False) -> None:
        """The request finished or failed (or, `abandoned`, its client left mid-generation)."""
        self._deliver(self.fleet.release(request_id, self.clock(), abandoned=abandoned))
        self._touch()

    def refused(self, request_id: int) -> None:
        """The request's upstream refused the connection: quarantine it and free the slot."""
        self._deliver(self.fleet.refused(request_id, self.clock(), self.wall_clock()))
        self._touch()

    def answered(
        self,
        agent_id: str,
        timings: AnswerTimings,
        model: str = UNKNOWN,
        *,
        head_bytes: int = 0,
        matched_blocks: int = 0,
        newer_blocks: int = 0,
    ) -> None:
        """An answer said what its prompt and its generation took on its llama-server."""
        self.fleet.answered(
            agent_id,
            timings,
            model,
            head_bytes=head_bytes,
            matched_blocks=matched_blocks,
            newer_blocks=newer_blocks,
        )

    def placed_by_peer(self, placement: Placement) -> bool:
        """A peer balancer sent `placement.prefix` to `placement.server`; returns whether this
        balancer knows that server (and so remembered it)."""
        return self.fleet.placed_by_peer(placement)

    def quarantine(self, agent_id: str) -> None:
        """An upstream refused a connection outside of any slot (a request that needs none)."""
        self.fleet.quarantine(agent_id, self.wall_clock())
        self._touch()

    def report(self, agent_id: str, status: StatusUpdate) -> None:
        """An agent reported its llama-server's status."""
        self._deliver(self.fleet.report(agent_id, status, self.clock(), self.wall_clock()))
        self._touch()

    def remove_agent(self, agent_id: str) -> None:
        """An agent's stream ended."""
        self.fleet.remove_agent(agent_id)
        self._touch()

    def time_passed(self) -> None:
        """Let the fleet notice agents that went stale."""
        if self.fleet.time_passed(self.clock()):
            self._touch()

    def _expire_at(self, until: float) -> None:
        # A millisecond late: the loop may run a timer a hair before its time.
        delay = max(0.0, until - self.clock()) + 0.001
        asyncio.get_running_loop().call_later(delay, self._expire_waits)

    def _expire_waits(self) -> None:
        """A request's wait for its home server may be over: let the fleet place it."""
        self._deliver(self.fleet.expire_waits(self.clock()))
        self._touch()

    def _deliver(self, dispatches: list[Dispatch]) -> None:
        pending = list(dispatches)
        while pending:
            dispatch = pending.pop()
            waiter = self._waiters.pop(dispatch.request_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(dispatch)
            else:
                # Its client is gone: hand the slot to the next in line.
                pending.extend(self.fleet.release(dispatch.request_id, self.clock()))

    def _touch(self) -> None:
        self.changed.set()


def _shutting_down() -> SlotUnavailable:
    return SlotUnavailable(
        503,
        "The balancer is shutting down; retry on another balancer or in a moment",
        retry_after=1,
    )


def _rejection(rejected: Rejected, timeout: float) -> SlotUnavailable:
    reason, served = rejected.reason, ", ".join(rejected.served) or "none yet"
    if reason is RejectReason.MODEL_UNNAMED:
        return SlotUnavailable(
            400,
            f"This balancer serves several models ({served}); name one in the request's "
            '"model" field, or start the balancer with --default-model',
        )
    if reason is RejectReason.MODEL_UNKNOWN:
        return SlotUnavailable(
            404,
            f"The model '{rejected.model}' is not served here; this fleet serves: {served} "
            "(the balancer's --model-alias maps other names onto them)",
            openai_code="model_not_found",
        )
    if reason is RejectReason.BUFFER_DISABLED:
        message = (
            "All llama.cpp slots are busy and buffering is off (--max-buffered-requests 0); "
            "retry later"
        )
    else:
        message = "All llama.cpp slots are busy and the request buffer is full; retry later"
    return SlotUnavailable(429, message, retry_after=max(1, round(timeout)))
