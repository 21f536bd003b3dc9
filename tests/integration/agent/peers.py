"""Real HTTP peers for agent tests: an NDJSON status receiver (the balancer's side of the
stream) and a small server that answers `/slots`, `/props`, `/v1/models` and `/health` as
llama-server does, in single-model or in router mode.

Both listen on 127.0.0.1 at a free port, in the test's own event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import msgspec
from aiohttp import web

from rower.llamacpp import error_body
from rower.status import StatusUpdate, status_decoder


async def eventually(check: Callable[[], object], *, timeout: float = 5.0) -> None:  # noqa: ASYNC109
    """Wait until `check()` is truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


@dataclass
class ReceivedLine:
    status: StatusUpdate
    agent_id: str
    at: float


class Site:
    """An aiohttp app on 127.0.0.1 that can be stopped abruptly and started again on its port."""

    def __init__(self, app: web.Application, port: int = 0) -> None:
        self.app = app
        self.port = port
        self._runner: web.AppRunner | None = None
        self._open: dict[int, web.BaseRequest] = {}

        @web.middleware
        async def track(request: web.Request, handler: web.Handler) -> web.StreamResponse:
            self._open[id(request)] = request
            try:
                return await handler(request)
            finally:
                self._open.pop(id(request), None)

        app.middlewares.append(track)

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if not self.port:
            server = site._server
            assert isinstance(server, asyncio.Server)
            self.port = server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Drop every open connection (as a crashed process would) and stop listening."""
        for request in list(self._open.values()):
            if request.transport is not None:
                request.transport.abort()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


class Receiver(Site):
    """The balancer's side of the status stream: records every line it gets."""

    def __init__(self, *, token: str | None = None, port: int = 0) -> None:
        self.token = token
        self.lines: list[ReceivedLine] = []
        self.headers: list[dict[str, str]] = []
        self.streams_ended = 0
        self.rejected = 0
        self.reject_all_with: int | None = None
        app = web.Application()
        app.router.add_post("/api/v1/agent_status_update/{agent_id}", self._status_update)
        super().__init__(app, port)

    @property
    def statuses(self) -> list[StatusUpdate]:
        return [line.status for line in self.lines]

    @property
    def latest(self) -> StatusUpdate | None:
        return self.lines[-1].status if self.lines else None

    async def _status_update(self, request: web.Request) -> web.Response:
        self.headers.append(dict(request.headers))
        if self.reject_all_with is not None:
            self.rejected += 1
            return web.Response(
                status=self.reject_all_with,
                body=error_body(self.reject_all_with, "rejected by the test"),
                content_type="application/json",
            )
        if self.token is not None and request.headers.get("Authorization") != (
            f"Bearer {self.token}"
        ):
            self.rejected += 1
            return web.Response(
                status=401,
                body=error_body(401, "invalid management token"),
                content_type="application/json",
            )
        agent_id = request.match_info["agent_id"]
        async for line in request.content:
            try:
                status = status_decoder.decode(line)
            except msgspec.DecodeError as error:
                return web.Response(status=400, body=error_body(400, str(error)))
            self.lines.append(ReceivedLine(status, agent_id, time.monotonic()))
        self.streams_ended += 1
        return web.json_response({})


@dataclass
class LlamaState:
    """What the fake llama-server answers; tests change it while the agent runs."""

    slots: list[dict[str, object]] = field(
        default_factory=lambda: [
            {"id": 0, "n_ctx": 2048, "speculative": False, "is_processing": False},
            {"id": 1, "n_ctx": 2048, "speculative": False, "is_processing": False},
        ]
    )
    model_path: str = "/models/tiny-llama.gguf"
    model_alias: str = ""
    aliases: list[str] = field(default_factory=list)
    """More names after `model_alias`, as `--alias a,b,c` gives."""
    router: dict[str, str] | None = None
    """Router mode (`--models-dir`): each model's `status.value`; every loaded model has
    `slots`. A `/slots?model=` for a model that is not loaded loads it, as llama-server's
    autoload does, unless the request says `autoload=false`."""
    models_status: int | None = None
    """Answer `/v1/models` with this status and an empty body, when set."""
    slots_barrier: int = 0
    """Each `/slots` waits until this many are in progress at once (or answers 500 after 2 s)."""
    api_key: str | None = None
    no_slots: bool = False
    loading: bool = False
    slots_status: int | None = None
    slots_body: bytes | None = None
    slots_delay: float = 0.0
    slots_requests: int = 0
    props_requests: int = 0
    models_requests: int = 0
    slots_queries: list[dict[str, str]] = field(default_factory=list)
    """The query of every `/slots` request, in order."""
    slots_answered_at: list[float] = field(default_factory=list)
    """When each `/slots` answer with the slots was made (`time.monotonic()`), in order."""
    loads: list[str] = field(default_factory=list)
    """Models a `/slots?model=` request loaded (the agent must never make one)."""
    authorizations: list[str | None] = field(default_factory=list)


class FakeLlama(Site):
    """Answers like llama-server (JSON copied from LLAMACPP.md)."""

    def __init__(self, state: LlamaState | None = None, port: int = 0) -> None:
        self.state = state or LlamaState()
        app = web.Application()
        app.router.add_get("/slots", self._slots)
        app.router.add_get("/props", self._props)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/health", self._health)
        self._slots_arrived = 0
        self._slots_together = asyncio.Event()
        super().__init__(app, port)

    def _refuse(self, request: web.Request, *, public: bool = False) -> web.Response | None:
        self.state.authorizations.append(request.headers.get("Authorization"))
        if self.state.loading:
            return web.Response(
                status=503, body=error_body(503, "Loading model"), content_type="application/json"
            )
        key = self.state.api_key
        if not public and key and request.headers.get("Authorization") != f"Bearer {key}":
            return web.Response(
                status=401, body=error_body(401, "Invalid API Key"), content_type="application/json"
            )
        return None

    async def _slots(self, request: web.Request) -> web.Response:
        self.state.slots_requests += 1
        self.state.slots_queries.append(dict(request.query))
        if self.state.slots_delay:
            await asyncio.sleep(self.state.slots_delay)
        if self.state.slots_barrier:
            self._slots_arrived += 1
            if self._slots_arrived >= self.state.slots_barrier:
                self._slots_together.set()
            try:
                await asyncio.wait_for(self._slots_together.wait(), 2.0)
            except TimeoutError:
                return _error(500, "the requests did not come together")
        if self.state.slots_status is not None:
            return web.Response(status=self.state.slots_status, body=self.state.slots_body or b"")
        refused = self._refuse(request)
        if refused:
            return refused
        if self.state.router is not None:
            refused = self._route(request.query)
            if refused:
                return refused
        if self.state.no_slots:
            return web.Response(
                status=501,
                body=error_body(
                    501, "This server does not support slots endpoint. Start it with `--slots`"
                ),
                content_type="application/json",
            )
        self.state.slots_answered_at.append(time.monotonic())
        return web.Response(
            body=self.state.slots_body or msgspec.json.encode(self.state.slots),
            content_type="application/json",
        )

    def _route(self, query: Mapping[str, str]) -> web.Response | None:
        """What a router answers before it hands a `/slots` to the model's child, if anything."""
        router = self.state.router
        assert router is not None
        name = query.get("model", "")
        if not name:
            return _error(400, "model name is missing from the request")
        if name not in router:
            return _error(400, f"model '{name}' not found")
        if router[name] != "loaded":
            if query.get("autoload") in ("false", "0"):
                return _error(400, "model is not loaded")
            router[name] = "loaded"
            self.state.loads.append(name)
        return None

    async def _models(self, request: web.Request) -> web.Response:
        self.state.models_requests += 1
        if self.state.models_status is not None:
            return web.Response(status=self.state.models_status)
        refused = self._refuse(request)
        if refused:
            return refused
        router = self.state.router
        if router is not None:
            data = [
                {"id": name, "aliases": [], "object": "model", "status": {"value": value}}
                for name, value in router.items()
            ]
        else:
            name = self.state.model_alias or self.state.model_path
            aliases = list(dict.fromkeys([name, *self.state.aliases]))
            data = [{"id": name, "aliases": aliases, "object": "model", "owned_by": "llamacpp"}]
        return web.json_response({"object": "list", "data": data})

    async def _props(self, request: web.Request) -> web.Response:
        self.state.props_requests += 1
        refused = self._refuse(request)
        if refused:
            return refused
        if self.state.router is not None:
            return web.json_response(
                {"role": "router", "model_alias": "llama-server", "model_path": "none"}
            )
        return web.json_response(
            {
                "total_slots": len(self.state.slots),
                "model_path": self.state.model_path,
                "model_alias": self.state.model_alias,
                "is_sleeping": False,
                "build_info": "b0-test",
            }
        )

    async def _health(self, request: web.Request) -> web.Response:
        refused = self._refuse(request, public=True)
        return refused or web.json_response({"status": "ok"})


def _error(code: int, message: str) -> web.Response:
    return web.Response(
        status=code, body=error_body(code, message), content_type="application/json"
    )
