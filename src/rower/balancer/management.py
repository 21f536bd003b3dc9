"""The management side: agents stream their status in, operators read the fleet out.

Handlers parse and validate, hand the result to the slot gate (and so the fleet core), and
answer. Nothing here decides where requests go. A status line is acted on only once it is
known to be sound: UTF-8 JSON of the right shape (`status.decode_status`), an address that is
`HOST:PORT` and no more with slot counts in bounds (`status.checked_status`), and an address
that is not one of the balancer's own listeners (`own_listeners`). Anything else ends the
stream with a 400 that names what was refused, and nothing is registered.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
from collections.abc import Awaitable, Callable
from importlib import resources

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong

from rower.addresses import Address
from rower.balancer.dashboard_web import dashboard_paths
from rower.balancer.fleet_stream import FleetPublisher
from rower.balancer.own_listeners import OwnListeners
from rower.balancer.peers import KEEPALIVE_SECONDS, PLACEMENTS_PATH
from rower.balancer.settings import BalancerSettings
from rower.balancer.slot_gate import SlotGate
from rower.http_errors import error_response
from rower.logs import log_throttled
from rower.status import StatusRefused, StatusUpdate, checked_status, decode_status

log = logging.getLogger(__name__)

AGENT_ID = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")
SSE_KEEPALIVE_SECONDS = 15.0
UNAUTHORIZED = (
    "Unauthorized: this balancer requires a management token; send "
    "'Authorization: Bearer TOKEN' with the balancer's --management-token"
)
OPEN_READS = frozenset({"/health", "/api/v1/openapi.json", *dashboard_paths()})
"""What anyone may read when the token guards reads: liveness, the API's description and the
dashboard's own files (which hold no fleet data; the page asks for the token)."""

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

gate_key = web.AppKey("gate", SlotGate)
publisher_key = web.AppKey("publisher", FleetPublisher)
settings_key = web.AppKey("settings", BalancerSettings)


class AgentStreams:
    """Which status stream currently speaks for each agent id.

    An agent that reconnects opens a new stream before the balancer notices the old one ended;
    only the newest stream's end may remove the agent.
    """

    def __init__(self) -> None:
        self._owners: dict[str, object] = {}

    def claim(self, agent_id: str) -> object:
        """The new stream of `agent_id` takes over; returns its ownership token."""
        token = object()
        self._owners[agent_id] = token
        return token

    def release(self, agent_id: str, token: object) -> bool:
        """The stream with `token` ended; returns whether it was still the agent's stream."""
        if self._owners.get(agent_id) is token:
            del self._owners[agent_id]
            return True
        return False


def is_authorized(request: web.Request, token: str | None) -> bool:
    """Whether the request carries `Authorization: Bearer <token>` (always, without a token)."""
    if token is None:
        return True
    given = request.headers.get("Authorization", "")
    scheme, _, value = given.partition(" ")
    # Header bytes that are not UTF-8 arrive as surrogate escapes: compare the bytes as sent.
    sent = value.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(sent, token.encode())


class ManagementApi:
    """Handlers of the management listener."""

    def __init__(
        self, gate: SlotGate, publisher: FleetPublisher, settings: BalancerSettings
    ) -> None:
        self.gate = gate
        self.publisher = publisher
        self.settings = settings
        self.streams = AgentStreams()
        self.own_listeners = OwnListeners(
            {
                "reverse-proxy listener": settings.reverseproxy_addr,
                "management listener": settings.management_addr,
            }
        )
        self.openapi = resources.files("rower.balancer").joinpath("openapi.json").read_bytes()

    async def agent_status_update(self, request: web.Request) -> web.StreamResponse:
        """`POST /api/v1/agent_status_update/{agent_id}`: an endless NDJSON stream of status."""
        agent_id = request.match_info["agent_id"]
        if not AGENT_ID.match(agent_id):
            return _closing(
                error_response(
                    400,
                    "agent id must be 1-128 letters, digits, '-', '_' or '.' (agents use a UUID)",
                )
            )
        if not is_authorized(request, self.settings.management_token):
            log_throttled(
                log,
                logging.WARNING,
                "status stream unauthorized",
                "rejected a status stream for agent %s from %s: wrong or missing token",
                agent_id,
                request.remote,
            )
            return _closing(
                error_response(
                    401,
                    "Unauthorized: this balancer requires a management token; start the agent "
                    "with the same --management-token as the balancer",
                )
            )
        token = self.streams.claim(agent_id)
        registered = False
        vetted_address: str | None = None
        max_line = self.settings.max_status_line_bytes
        # An agent sends its first line at its first poll of llama-server (seconds at most); a
        # stream that says nothing would hold its connection forever. Later lines may take any
        # time: a frozen agent goes stale, it is not cut off.
        first_line_by = asyncio.get_running_loop().time() + self.settings.request_body_timeout
        try:
            while True:
                try:
                    async with asyncio.timeout_at(None if registered else first_line_by):
                        line = await request.content.readline(max_line_length=max_line)
                except TimeoutError:
                    return self._bad_line(
                        request,
                        agent_id,
                        f"no status line within {self.settings.request_body_timeout:g} s of "
                        "connecting (--request-body-timeout)",
                        status=408,
                    )
                except LineTooLong:
                    return self._bad_line(
                        request,
                        agent_id,
                        f"a status line is over {max_line} bytes (--max-status-line-bytes)",
                        status=413,
                    )
                if not line:
                    return web.json_response({"status": "ok"})
                if not line.strip():
                    continue
                try:
                    status = checked_status(
                        decode_status(line), max_slots=self.settings.max_slots_per_agent
                    )
                except StatusRefused as error:
                    return self._bad_line(request, agent_id, str(error))
                if status.external_llamacpp_addr != vetted_address:
                    owner = await self.own_listeners.owner_of(
                        Address.parse(status.external_llamacpp_addr)
                    )
                    if owner is not None:
                        return self._bad_line(
                            request,
                            agent_id,
                            f"external_llamacpp_addr refused: {status.external_llamacpp_addr} is "
                            f"this balancer's own {owner}; report the address of llama-server",
                        )
                    vetted_address = status.external_llamacpp_addr
                if not registered:
                    if not self.gate.fleet.admits(agent_id, status.external_llamacpp_addr):
                        limit = self.settings.max_agents
                        log_throttled(
                            log,
                            logging.WARNING,
                            "too many agents",
                            "refused agent %s: %d agents registered (--max-agents)",
                            agent_id,
                            limit,
                        )
                        return _closing(
                            error_response(
                                429,
                                f"This balancer already has {limit} agents (--max-agents)",
                                headers={"Retry-After": "1"},
                            )
                        )
                    log.info(
                        "agent %s (%s) registered for %s",
                        agent_id,
                        status.agent_name or "unnamed",
                        status.external_llamacpp_addr,
                    )
                    registered = True
                self._report(agent_id, status)
        finally:
            if self.streams.release(agent_id, token) and registered:
                log.info("agent %s left", agent_id)
                self.gate.remove_agent(agent_id)

    def _report(self, agent_id: str, status: StatusUpdate) -> None:
        self.gate.report(agent_id, status)
        for old in self.gate.fleet.superseded_by_last_report:
            log.warning(
                "agent %s now speaks for %s; agent %s, which did too, is ignored until its "
                "stream ends",
                agent_id,
                status.external_llamacpp_addr,
                old,
            )

    def _bad_line(
        self, request: web.Request, agent_id: str, message: str, *, status: int = 400
    ) -> web.Response:
        log_throttled(
            log,
            logging.WARNING,
            "status line refused",
            "closing the status stream of agent %s from %s: %s",
            agent_id,
            request.remote,
            message,
        )
        return _closing(
            error_response(
                status,
                message + "; one StatusUpdate JSON object per line is expected",
                error_type="invalid_request_error",
            )
        )

    async def drain_agent(self, request: web.Request) -> web.Response:
        """`POST /api/v1/agents/{agent_id}/drain`: send the agent nothing new from now on."""
        if not is_authorized(request, self.settings.management_token):
            log_throttled(
                log,
                logging.WARNING,
                "drain unauthorized",
                "rejected a drain request from %s: wrong or missing token",
                request.remote,
            )
            return error_response(401, UNAUTHORIZED)
        agent_id = request.match_info["agent_id"]
        if not AGENT_ID.match(agent_id) or not self.gate.drain(agent_id):
            return error_response(404, f"No agent {agent_id[:128]!r} is registered")
        log.info("agent %s drained by an operator", agent_id)
        return web.json_response({"agent_id": agent_id, "is_draining": True})

    async def openapi_description(self, request: web.Request) -> web.Response:
        """`GET /api/v1/openapi.json`: this API, described."""
        return web.Response(body=self.openapi, content_type="application/json")

    async def agents(self, request: web.Request) -> web.Response:
        """`GET /api/v1/agents`."""
        return web.Response(body=self.publisher.snapshot(), content_type="application/json")

    async def agents_stream(self, request: web.Request) -> web.StreamResponse:
        """`GET /api/v1/agents/stream`: a snapshot now, then one per change (SSE)."""
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        async with self.publisher.subscribe() as queue:
            while True:
                try:
                    snapshot = await asyncio.wait_for(queue.get(), SSE_KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                await response.write(b"data: " + snapshot + b"\n\n")

    async def placements(self, request: web.Request) -> web.StreamResponse:
        """`GET /api/v1/placements`: what this balancer sends where from now on, one NDJSON
        line per dispatch (`placement_wire`), for the balancers that follow it (`peers`)."""
        if not is_authorized(request, self.settings.management_token):
            log_throttled(
                log,
                logging.WARNING,
                "placements unauthorized",
                "refused to tell placements to %s: wrong or missing token",
                request.remote,
            )
            return error_response(401, UNAUTHORIZED)
        response = web.StreamResponse(
            headers={"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        async with self.gate.placements.follow() as follower:
            lines = follower.lines
            while not follower.fell_behind:
                try:
                    line = await asyncio.wait_for(lines.get(), KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b"\n")
                    continue
                batch = [line]
                while not lines.empty() and len(batch) < 256:
                    batch.append(lines.get_nowait())
                await response.write(b"".join(batch))
        log_throttled(
            log,
            logging.WARNING,
            "placements follower behind",
            "a balancer following this one's placements from %s fell behind; its stream ends "
            "and it follows again",
            request.remote,
        )
        return response

    async def health(self, request: web.Request) -> web.Response:
        """`GET /health`."""
        return web.json_response({"status": "ok"})


def cors_middleware(
    allowed_origins: tuple[str, ...],
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Answer CORS preflights and tag answers for the exact origins allowed, and no others."""
    allowed = frozenset(allowed_origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None or origin not in allowed:
            return await handler(request)
        if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers:
            response: web.StreamResponse = web.Response(status=204)
        else:
            response = await handler(request)
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = "GET, POST, OPTIONS"
        response.headers["Access-Control-Allow-Headers"] = "Authorization, Content-Type"
        response.headers["Vary"] = "Origin"
        return response

    return cors


def read_guard(token: str) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Let only holders of the token read the fleet (`--management-token-guards-reads`).

    Every GET and HEAD needs the token except `OPEN_READS`; what changes state (status streams,
    drains) checks the token in its own handler, always.
    """

    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        if (
            request.method in ("GET", "HEAD")
            and request.path not in OPEN_READS
            and not is_authorized(request, token)
        ):
            log_throttled(
                log,
                logging.WARNING,
                "read unauthorized",
                "refused a read of %s from %s: wrong or missing token",
                request.path,
                request.remote,
            )
            return error_response(
                401,
                "Unauthorized: this balancer lets only holders of its management token read the "
                "fleet (--management-token-guards-reads); send 'Authorization: Bearer TOKEN'",
                headers={"WWW-Authenticate": 'Bearer realm="rower"'},
            )
        return await handler(request)

    return guard


def _closing(response: web.Response) -> web.Response:
    # The request body (a status stream) is not read to its end: the connection cannot carry
    # another request.
    response.force_close()
    return response


@web.middleware
async def json_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """aiohttp's own 404/405 answers, and a bug's 500, in the JSON error shape of the rest."""
    try:
        return await handler(request)
    except web.HTTPException as error:
        if error.status < 400:
            raise
        return error_response(error.status, f"{error.reason}: {request.method} {request.path}")
    except HttpProcessingError:
        # A malformed body (a bad chunk size, a short Content-Length): the listener answers 400.
        raise
    except Exception:
        log_throttled(
            log,
            logging.ERROR,
            "unexpected error",
            "unexpected error answering %s %s",
            request.method,
            request.path,
            exc_info=True,
        )
        return error_response(500, "Internal error in the balancer; its log has the details")


def management_app(
    gate: SlotGate, publisher: FleetPublisher, settings: BalancerSettings
) -> web.Application:
    """The management application: agents in, fleet out."""
    api = ManagementApi(gate, publisher, settings)
    middlewares = [cors_middleware(settings.management_cors_allowed_hosts)]
    if settings.management_token_guards_reads and settings.management_token is not None:
        middlewares.append(read_guard(settings.management_token))
    app = web.Application(middlewares=[*middlewares, json_errors], client_max_size=1024 * 1024)
    app[gate_key] = gate
    app[publisher_key] = publisher
    app[settings_key] = settings
    app.router.add_post("/api/v1/agent_status_update/{agent_id}", api.agent_status_update)
    app.router.add_get("/api/v1/agents", api.agents)
    app.router.add_get("/api/v1/agents/stream", api.agents_stream)
    app.router.add_post("/api/v1/agents/{agent_id}/drain", api.drain_agent)
    app.router.add_get(PLACEMENTS_PATH, api.placements)
    app.router.add_get("/api/v1/openapi.json", api.openapi_description)
    app.router.add_get("/health", api.health)
    return app
