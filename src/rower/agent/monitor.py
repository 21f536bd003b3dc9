"""The polling loop: asks llama-server about its slots every interval and publishes the status.

This module only does the HTTP exchanges and turns them (or their failure) into the values of
`llamacpp_probe`, which decides what they mean. What the server serves (`/props`: router or
not, number of slots; `/v1/models`: the model's id and aliases) is read at start, after a
failed poll, when the number of slots changed and when the slots' task ids say the server
restarted between two polls, because it rarely changes and a restarted server may run another
model. `/health` is read only when `/slots` failed, to tell a server that is loading its model
apart from one that is broken.

A router-mode server (`--models-dir`) loads and unloads models on its own, so its `/v1/models`
is read at every poll, and then the slots of each model it says is loaded, all at once. The
agent never asks for a model that is not loaded: a router loads a model it is asked about.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os

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
    facts_from_props,
    model_listing,
    model_slots_path,
    models_to_poll,
    restarted,
    router_status_from_poll,
    status_from_poll,
    with_model_list,
)
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
        self._needs_facts = True
        self._facts_read = False
        self._sequence = 0
        self._last_slots: list[SlotStatus] = []
        self._known_totals: dict[str, int] = {}
        self._loaded_models: list[str] = []
        self.slots_url = local_addr.url("/slots")
        self.models_url = local_addr.url("/v1/models")
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
        """One poll; returns the status.

        A single-model server: `/slots`, plus `/props`, `/v1/models` and `/health` when needed.
        A router: `/v1/models`, then `/slots?model=` of each loaded model, concurrently.
        """
        if self._needs_facts:
            await self._read_facts()
        if self._facts.is_router:
            status = await self._poll_router()
        else:
            status = await self._poll_server()
        self._needs_facts = status.error is not None or not self._facts_read
        return status

    async def _poll_server(self) -> StatusUpdate:
        outcome = await self._get(self.slots_url)
        if isinstance(outcome, SlotsAnswer) and outcome.status == 400:
            # What a router answers to `/slots` without a model: it may have restarted as one.
            await self._read_facts()
            if self._facts.is_router:
                return await self._poll_router()
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
                status = await self._with_facts_read_again(status)
            elif restarted(self._last_slots, status.slots):
                logger.info(
                    "llama-server at %s restarted (its task ids began again)", self._local_addr
                )
                status = await self._with_facts_read_again(status)
            self._last_slots = status.slots
        else:
            # What it serves is read again at the next poll anyway.
            self._last_slots = []
        return status

    async def _with_facts_read_again(self, status: StatusUpdate) -> StatusUpdate:
        await self._read_facts()
        return msgspec.structs.replace(
            status, model=self._facts.model, model_aliases=list(self._facts.aliases)
        )

    async def _poll_router(self) -> StatusUpdate:
        listing = model_listing(await self._get(self.models_url), models_url=self.models_url)
        if isinstance(listing, list) and listing and all(m.state is None for m in listing):
            # A single-model server's list: it restarted without --models-dir.
            await self._read_facts()
            if not self._facts.is_router:
                return await self._poll_server()
        names = models_to_poll(listing) if isinstance(listing, list) else []
        # One request per loaded model, side by side: k models cost one round trip, not k.
        answers = await asyncio.gather(
            *(self._get(self._local_addr.url(model_slots_path(name))) for name in names)
        )
        self._sequence += 1
        status = router_status_from_poll(
            listing,
            dict(zip(names, answers, strict=True)),
            base_url=self._local_addr.url(),
            identity=self._identity,
            facts=self._facts,
            sequence=self._sequence,
            is_draining=self.draining,
            known_totals=self._known_totals,
        )
        self._known_totals = {m.model: m.slots_total for m in status.models if m.slots_total}
        self._last_slots = []
        if status.error is None and names != self._loaded_models:
            logger.info(
                "llama-server router at %s: %s",
                self._local_addr,
                f"models loaded: {', '.join(names)}" if names else "no model loaded",
            )
        self._loaded_models = names if status.error is None else self._loaded_models
        return status

    async def _get(self, url: str) -> SlotsOutcome:
        try:
            async with self._session.get(
                url,
                headers=self._headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as answer:
                body = await answer.content.read(MAX_BODY_BYTES)
                return SlotsAnswer(answer.status, body)
        except (aiohttp.ClientError, TimeoutError, OSError) as error:
            return failure_from_error(error, timeout=self._request_timeout)

    async def _read_facts(self) -> None:
        """Read what the server serves: `/props`, and `/v1/models` for a single-model server."""
        answer = await self._get(self._local_addr.url("/props"))
        if not isinstance(answer, SlotsAnswer) or answer.status != 200:
            logger.debug("%s: no /props answer: %s", self._local_addr, answer)
            self._facts_read = False
            return
        facts = facts_from_props(answer.body)
        if isinstance(facts, str):
            logger.debug("%s: unreadable /props answer: %s", self._local_addr, facts)
            self._facts_read = False
            return
        if not facts.is_router:
            # Best effort: without it the model keeps the name /props gives, with no aliases.
            listing = model_listing(await self._get(self.models_url), models_url=self.models_url)
            if isinstance(listing, list):
                facts = with_model_list(facts, listing)
        if facts != self._facts:
            if facts.is_router:
                logger.info(
                    "llama-server at %s is a router: one child server per model", self._local_addr
                )
            else:
                logger.info(
                    "llama-server at %s: model %s%s, %s slots",
                    self._local_addr,
                    facts.model or "(unknown)",
                    f" (also {', '.join(facts.aliases)})" if facts.aliases else "",
                    facts.total_slots if facts.total_slots is not None else "(unknown)",
                )
        self._facts = facts
        self._facts_read = True

    async def _read_health(self) -> Health:
        answer = await self._get(self._local_addr.url("/health"))
        if isinstance(answer, SlotsFailure):
            return Health.UNKNOWN
        if answer.status == 200:
            return Health.OK
        if answer.status == 503:
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
