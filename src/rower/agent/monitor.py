"""The polling loop: asks llama-server about its slots every interval and publishes the status.

This module only does the HTTP exchanges and turns them (or their failure) into the values of
`llamacpp_probe`, which decides what they mean. `/props` (model, number of slots) is read at
start, after a failed poll, when the number of slots changed and when the slots' task ids say
the server restarted between two polls, because it rarely changes and a restarted server may
run another model. `/health` is read only when `/slots` failed, to tell a server that is
loading its model apart from one that is broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import posixpath

import aiohttp
import msgspec

from rower.addresses import Address
from rower.agent.latest_status import LatestStatus
from rower.agent.llamacpp_probe import (
    AgentIdentity,
    Health,
    ServerFacts,
    SlotsAnswer,
    SlotsFailure,
    SlotsOutcome,
    TransportFailure,
    restarted,
    status_from_poll,
)
from rower.llamacpp import props_decoder
from rower.status import SlotStatus, StatusUpdate

logger = logging.getLogger(__name__)

REQUEST_TIMEOUT = 3.0
MAX_BODY_BYTES = 16 * 1024 * 1024
"""A `/slots` answer larger than this is not llama-server's (a few hundred bytes per slot)."""


class Monitor:
    """Polls one llama-server and publishes a `StatusUpdate` to `board` after every poll."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        local_addr: Address,
        identity: AgentIdentity,
        board: LatestStatus,
        api_key: str | None = None,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self._session = session
        self._local_addr = local_addr
        self._identity = identity
        self._board = board
        self._headers = {"Accept": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._timeout = aiohttp.ClientTimeout(total=request_timeout)
        self._request_timeout = request_timeout
        self._facts = ServerFacts()
        self._needs_props = True
        self._sequence = 0
        self._last_slots: list[SlotStatus] = []
        self.slots_url = local_addr.url("/slots")
        self.draining = False
        """The agent is stopping: every status says `is_draining`."""

    @property
    def interval(self) -> float:
        """Seconds between the starts of two polls."""
        return self._identity.monitoring_interval_ms / 1000

    async def run(self, stop: asyncio.Event) -> None:
        """Poll at a fixed rate until `stop` is set; a slow poll makes the next start at once."""
        loop = asyncio.get_running_loop()
        next_poll = loop.time()
        while not stop.is_set():
            status = await self.poll_once()
            self._board.publish(status)
            next_poll += self.interval
            now = loop.time()
            if next_poll < now:
                # Missed ticks are skipped, not made up in a burst.
                next_poll = now
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=next_poll - now)

    async def poll_once(self) -> StatusUpdate:
        """One poll: `/slots`, plus `/props` and `/health` when needed; returns the status."""
        if self._needs_props:
            await self._read_props()
        outcome = await self._get_slots()
        health = Health.UNKNOWN
        if isinstance(outcome, SlotsFailure) or outcome.status == 503:
            health = await self._read_health()
        self._sequence += 1
        status = status_from_poll(
            outcome,
            slots_url=self.slots_url,
            identity=self._identity,
            facts=self._facts,
            health=health,
            sequence=self._sequence,
            is_draining=self.draining,
        )
        if status.error is None:
            if status.slots_total != self._facts.total_slots:
                # Another number of slots: the server restarted, maybe with another model.
                await self._read_props()
                status = msgspec.structs.replace(status, model=self._facts.model)
            elif restarted(self._last_slots, status.slots):
                logger.info(
                    "llama-server at %s restarted (its task ids began again)", self._local_addr
                )
                await self._read_props()
                status = msgspec.structs.replace(status, model=self._facts.model)
            self._last_slots = status.slots
        else:
            # `/props` is read again at the next poll anyway.
            self._last_slots = []
        self._needs_props = status.error is not None
        return status

    async def _get_slots(self) -> SlotsOutcome:
        try:
            async with self._session.get(
                self.slots_url,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as answer:
                body = await answer.content.read(MAX_BODY_BYTES)
                return SlotsAnswer(answer.status, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return failure_from_error(error, timeout=self._request_timeout)

    async def _get_json(self, path: str) -> tuple[int, bytes] | None:
        try:
            async with self._session.get(
                self._local_addr.url(path),
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as answer:
                return answer.status, await answer.content.read(MAX_BODY_BYTES)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            logger.debug("GET %s failed: %s", self._local_addr.url(path), error)
            return None

    async def _read_props(self) -> None:
        answer = await self._get_json("/props")
        if answer is None or answer[0] != 200:
            self._needs_props = True
            return
        try:
            props = props_decoder.decode(answer[1])
        except msgspec.DecodeError as error:
            logger.debug("%s: unreadable /props answer: %s", self._local_addr, error)
            return
        model = props.model_alias or (
            posixpath.basename(props.model_path.replace("\\", "/")) if props.model_path else None
        )
        facts = ServerFacts(model=model or None, total_slots=props.total_slots)
        if facts != self._facts:
            logger.info(
                "llama-server at %s: model %s, %s slots",
                self._local_addr,
                facts.model or "(unknown)",
                facts.total_slots if facts.total_slots is not None else "(unknown)",
            )
        self._facts = facts
        self._needs_props = False

    async def _read_health(self) -> Health:
        answer = await self._get_json("/health")
        if answer is None:
            return Health.UNKNOWN
        if answer[0] == 200:
            return Health.OK
        if answer[0] == 503:
            return Health.LOADING
        return Health.UNKNOWN


def failure_from_error(error: BaseException, *, timeout: float = REQUEST_TIMEOUT) -> SlotsFailure:
    """Which kind of transport failure `error` is, with a short phrase for the error text."""
    if isinstance(error, aiohttp.ConnectionTimeoutError):
        return SlotsFailure(TransportFailure.CONNECT, f"connection timed out after {timeout:g} s")
    if isinstance(error, aiohttp.ClientConnectorDNSError):
        return SlotsFailure(TransportFailure.CONNECT, "host name not resolved")
    if isinstance(error, aiohttp.ClientConnectorError):
        return SlotsFailure(TransportFailure.CONNECT, _os_reason(error.os_error))
    if isinstance(error, aiohttp.ClientPayloadError | aiohttp.ClientResponseError):
        return SlotsFailure(TransportFailure.DECODE, f"unreadable answer ({_first_line(error)})")
    if isinstance(error, TimeoutError):
        return SlotsFailure(TransportFailure.REQUEST, f"timed out after {timeout:g} s")
    if isinstance(error, aiohttp.ServerDisconnectedError):
        return SlotsFailure(TransportFailure.REQUEST, "connection closed before an answer")
    if isinstance(error, OSError):
        return SlotsFailure(TransportFailure.REQUEST, _os_reason(error))
    return SlotsFailure(TransportFailure.REQUEST, _first_line(error))


def _os_reason(error: OSError) -> str:
    if error.errno == errno.ECONNREFUSED or isinstance(error, ConnectionRefusedError):
        return "connection refused"
    if error.errno:
        return os.strerror(error.errno).lower()
    return _first_line(error)


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__
