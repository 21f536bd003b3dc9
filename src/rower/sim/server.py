"""The sim's HTTP side: llama-server's routes as thin aiohttp handlers around the engine.

A handler parses the body (`bodies`), holds a slot (`engine`), and relays what the engine
generates in the endpoint's format (`dialects`, `responses`). Faults and the loading phase are
switches checked here, so the core stays a faithful model of a healthy server.
"""

from __future__ import annotations

import asyncio
import logging
import random
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
from aiohttp import web

from rower.addresses import Address
from rower.http_errors import error_response
from rower.sim import bodies, dialects, responses, tokens
from rower.sim.bodies import BadRequest, Generation
from rower.sim.engine import Engine
from rower.sim.responses import Identity, Json
from rower.sim.slots import SlotTable, Task
from rower.sim.timing import Speed

log = logging.getLogger(__name__)

_PUBLIC_PATHS = {"/health", "/v1/health"}
_NO_SLOTS = "This server does not support slots endpoint. Start it with `--slots`"
_NO_METRICS = "This server does not support metrics endpoint. Start it with `--metrics`"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Parser(Protocol):
    """`bodies.completion` or `bodies.chat`."""

    def __call__(self, data: Mapping[str, object], *, default_n_predict: int) -> Generation: ...


@dataclass(frozen=True, slots=True)
class Faults:
    """Ways the sim can misbehave on purpose.

    Attributes:
        no_slots: `/slots` answers 501, as llama-server started with `--no-slots`.
        hang: inference requests take a slot and never get an answer (not even headers) until
            the client goes away; other endpoints answer normally.
        slots_delay: seconds `/slots` waits before answering.
        fail_rate: fraction of inference requests answered with a 500 error at once.
    """

    no_slots: bool = False
    hang: bool = False
    slots_delay: float = 0.0
    fail_rate: float = 0.0


@dataclass(frozen=True, slots=True)
class SimConfig:
    """Everything `rower sim` is started with.

    Attributes:
        identity: model name, context size, slot count.
        speed: prefill and decode speeds.
        api_key: required bearer token on every endpoint but `/health`, or None.
        loading_seconds: how long every endpoint answers 503 "Loading model" after start.
        default_n_predict: tokens generated when a request does not say.
        cache_ram_tokens: bound of the host-RAM prompt cache in tokens; 0 = none.
        metrics: serve Prometheus text at `/metrics` (else 501, as llama-server).
        faults: fault switches.
    """

    identity: Identity
    speed: Speed = field(default_factory=Speed)
    api_key: str | None = None
    loading_seconds: float = 0.0
    default_n_predict: int = 16
    cache_ram_tokens: int = 0
    metrics: bool = False
    faults: Faults = field(default_factory=Faults)


class Sim:
    """One simulated llama-server: its slot table, engine and routes."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.table = SlotTable(
            config.identity.total_slots, cache_ram_tokens=config.cache_ram_tokens
        )
        self.engine = Engine(self.table, config.speed)
        self._random = random.Random(0)
        self._ready_at = 0.0

    def application(self) -> web.Application:
        """The aiohttp application with llama-server's routes."""
        app = web.Application(
            middlewares=[self._errors, self._loading, self._authorization],
            client_max_size=64 * 1024 * 1024,
        )
        app.on_startup.append(self._start_loading)
        inference = self._inference
        app.router.add_get("/health", self._health)
        app.router.add_get("/v1/health", self._health)
        app.router.add_get("/slots", self._slots)
        app.router.add_get("/props", self._props)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/models", self._models)
        app.router.add_get("/v1/models", self._models)
        app.router.add_post("/tokenize", self._tokenize)
        for path in ("/completion", "/completions"):
            app.router.add_post(path, inference(bodies.completion, dialects.Native))
        app.router.add_post(
            "/v1/completions", inference(bodies.completion, dialects.TextCompletion)
        )
        for path in ("/chat/completions", "/v1/chat/completions"):
            app.router.add_post(path, inference(bodies.chat, dialects.ChatCompletion))
        for path in ("/embedding", "/embeddings"):
            app.router.add_post(path, self._embeddings(oai=False))
        app.router.add_post("/v1/embeddings", self._embeddings(oai=True))
        return app

    def counters(self) -> Json:
        """The sim's counters and gauges, as `/props` shows them under `rower_sim`."""
        counters = self.table.counters
        return {
            "requests_total": counters.requests_total,
            "requests_deferred": counters.requests_deferred,
            "requests_cancelled": counters.requests_cancelled,
            "requests_waiting": len(self.table.waiting),
            "slots_processing": self.table.busy,
            "tokens_prompt": counters.tokens_prompt,
            "tokens_cached": counters.tokens_cached,
            "tokens_predicted": counters.tokens_predicted,
            "cache_saves": counters.cache_saves,
            "cache_restores": counters.cache_restores,
            "cache_tokens": self.table.cache.n_tokens if self.table.cache else 0,
        }

    # --- middlewares ------------------------------------------------------------------------

    async def _start_loading(self, app: web.Application) -> None:
        self._ready_at = asyncio.get_running_loop().time() + self.config.loading_seconds

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except BadRequest as error:
            return error_response(400, str(error))
        except web.HTTPException as error:
            if error.status == 404:
                return error_response(404, "File Not Found")
            if error.status == 405:
                return error_response(405, "Method Not Allowed", error_type="invalid_request_error")
            if error.status == 413:
                return error_response(413, "Request body too large")
            raise
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as error:
            log.exception("%s %s failed", request.method, request.path)
            return error_response(500, str(error) or type(error).__name__)

    @web.middleware
    async def _loading(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if asyncio.get_running_loop().time() < self._ready_at:
            return error_response(503, "Loading model")
        return await handler(request)

    @web.middleware
    async def _authorization(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self.config.api_key
        if key is None or request.path in _PUBLIC_PATHS:
            return await handler(request)
        given = request.headers.get("Authorization") or request.headers.get("X-Api-Key") or ""
        given = given.removeprefix("Bearer ")
        if given != key:
            return error_response(401, "Invalid API Key")
        return await handler(request)

    # --- state endpoints --------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def _slots(self, request: web.Request) -> web.Response:
        faults = self.config.faults
        if faults.no_slots:
            return error_response(501, _NO_SLOTS)
        if faults.slots_delay > 0:
            await asyncio.sleep(faults.slots_delay)
        if request.query.get("fail_on_no_slot") and self.table.idle == 0:
            return error_response(503, "no slot available")
        return _json(responses.slots(self.table, self.config.identity))

    async def _props(self, request: web.Request) -> web.Response:
        extra = {
            "endpoint_slots": not self.config.faults.no_slots,
            "endpoint_metrics": self.config.metrics,
            "rower_sim": self.counters(),
        }
        return _json(responses.props(self.config.identity, extra))

    async def _models(self, request: web.Request) -> web.Response:
        return _json(responses.models(self.config.identity))

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.config.metrics:
            return error_response(501, _NO_METRICS)
        counters = self.counters()
        lines = []
        for name, kind, value in (
            ("prompt_tokens_total", "counter", counters["tokens_prompt"]),
            ("prompt_tokens_cached_total", "counter", counters["tokens_cached"]),
            ("tokens_predicted_total", "counter", counters["tokens_predicted"]),
            ("requests_processing", "gauge", counters["slots_processing"]),
            ("requests_deferred", "gauge", counters["requests_waiting"]),
        ):
            lines += [f"# TYPE llamacpp:{name} {kind}", f"llamacpp:{name} {value}"]
        for name in ("requests_total", "requests_deferred", "requests_cancelled"):
            lines += [f"# TYPE rower_sim_{name} counter", f"rower_sim_{name} {counters[name]}"]
        return web.Response(
            text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8"
        )

    async def _tokenize(self, request: web.Request) -> web.Response:
        data = bodies.parse_json(await request.read())
        content = data.get("content", "")
        if not isinstance(content, str):
            raise BadRequest('"content" must be a string')
        pieces = tokens.tokenize(content)[1:]
        return _json({"tokens": [tokens.token_id(piece) for piece in pieces]})

    # --- inference --------------------------------------------------------------------------

    def _inference(
        self,
        parse: Parser,
        dialect: Callable[[Generation, Identity], dialects.Dialect],
    ) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            data = bodies.parse_json(await request.read())
            generation = parse(data, default_n_predict=self.config.default_n_predict)
            failure = self._failure()
            if failure is not None:
                return failure
            task = self._task(generation)
            answer = dialect(generation, self.config.identity)
            async with self.engine.hold(task) as run:
                if self.config.faults.hang:
                    await run.hang()
                if not generation.stream:
                    await run.prefill()
                    async for _ in run.decode(stop=generation.stop, seed=generation.seed):
                        pass
                    return _json(answer.answer(run))
                # llama-server sends the headers when a slot starts on the task.
                response = web.StreamResponse(
                    headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
                )
                await response.prepare(request)
                await run.prefill()
                async for piece in run.decode(stop=generation.stop, seed=generation.seed):
                    await response.write(_events(answer.chunks(run, piece)))
                await response.write(_events(answer.final_chunks(run)) + answer.trailer())
                await response.write_eof()
                return response

        return handle

    def _embeddings(self, *, oai: bool) -> Handler:
        async def handle(request: web.Request) -> web.StreamResponse:
            data = bodies.parse_json(await request.read())
            inputs = bodies.embedding_inputs(data)
            failure = self._failure()
            if failure is not None:
                return failure
            prompt = tuple(piece for pieces in inputs for piece in pieces)
            self._check_context(prompt)
            task = Task(self.table.new_task_id(), prompt, n_predict=0, completion=False)
            identity = self.config.identity
            async with self.engine.hold(task) as run:
                if self.config.faults.hang:
                    await run.hang()
                await run.prefill()
            if oai and "input" in data:
                model = data.get("model")
                return _json(
                    responses.embeddings_oai(
                        inputs,
                        model if isinstance(model, str) else identity.model,
                        identity,
                        base64_format=data.get("encoding_format") == "base64",
                    )
                )
            return _json(responses.embeddings(inputs, identity))

        return handle

    def _task(self, generation: Generation) -> Task:
        self._check_context(generation.prompt)
        room = self.config.identity.n_ctx - len(generation.prompt)
        n_predict = room if generation.n_predict < 0 else min(generation.n_predict, room)
        return Task(
            self.table.new_task_id(),
            generation.prompt,
            id_slot=generation.id_slot,
            n_predict=n_predict,
            limited=generation.n_predict >= 0,
            params=generation.params,
        )

    def _check_context(self, prompt: tuple[str, ...]) -> None:
        n_ctx = self.config.identity.n_ctx
        if len(prompt) >= n_ctx:
            raise _ContextExceeded(
                f"request ({len(prompt)} tokens) exceeds the available context size "
                f"({n_ctx} tokens), try increasing it"
            )

    def _failure(self) -> web.Response | None:
        rate = self.config.faults.fail_rate
        if rate > 0 and self._random.random() < rate:
            return error_response(500, "simulated failure (rower sim --fail-rate)")
        return None


class _ContextExceeded(BadRequest):
    """A prompt that does not fit a slot's context."""


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=msgspec.json.encode(body),
        status=status,
        content_type="application/json",
        charset="utf-8",
    )


def _events(events: list[Json]) -> bytes:
    return b"".join(responses.sse(event) for event in events)


async def serve(config: SimConfig, address: Address) -> None:
    """Serve `config` at `address` until SIGINT or SIGTERM."""
    sim = Sim(config)
    # handler_cancellation: a client that goes away cancels its handler, which frees its slot.
    runner = web.AppRunner(
        sim.application(), handler_cancellation=True, access_log=None, shutdown_timeout=0.1
    )
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, shutdown_timeout=0.1)
    await site.start()
    identity = config.identity
    log.info(
        "rower sim listening on http://%s with %d slots of %d tokens, model %r",
        address,
        identity.total_slots,
        identity.n_ctx,
        identity.model,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("rower sim stopping")
        await runner.cleanup()
