"""Rower in front of real llama-servers running the tiny model: the whole path, for real.

While these tests run, a watcher polls every server's `/metrics`: no server may ever run more
tasks than it has slots, or defer a request, while the balancer is its only client. A poll that
fails fails the test: the watch must not read "could not see" as "idle". Where a test asserts
how work was spread, it reads the servers' own token counters before and after.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.e2e.real_llama_server import LlamaServer, LlamaServerFactory
from tests.integration.fleet import Fleet, until

LONG = {"prompt": "Once upon a time", "n_predict": 300, "ignore_eos": True}
PATIENT = ("--buffered-request-timeout", "120000")  # a loaded 2-core machine is slow


POLL_TIMEOUT = 5.0
"""A poll of a server that takes longer than this is a failure of the watch, not a zero."""


@dataclass
class SlotWatch:
    """Polls servers' `/metrics`; remembers the most tasks and deferrals each server showed.

    A poll that fails is recorded, never read as an idle server: `watching` fails the test with
    the failures unless the test said it expects that server to be down (`expect_down`).
    """

    servers: list[LlamaServer]
    most_processing: dict[str, int] = field(init=False)
    most_deferred: dict[str, int] = field(init=False)
    polls: dict[str, int] = field(init=False)
    failures: list[str] = field(default_factory=list)
    down: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        addrs = [s.addr for s in self.servers]
        self.most_processing = dict.fromkeys(addrs, 0)
        self.most_deferred = dict.fromkeys(addrs, 0)
        self.polls = dict.fromkeys(addrs, 0)

    def expect_down(self, server: LlamaServer) -> None:
        """Stop watching `server`: the test is about to stop it."""
        self.down.add(server.addr)

    async def run(self, session: aiohttp.ClientSession) -> None:
        while True:
            for server in self.servers:
                if server.addr not in self.down:
                    await self._poll(session, server)
            await asyncio.sleep(0.02)

    async def _poll(self, session: aiohttp.ClientSession, server: LlamaServer) -> None:
        try:
            async with asyncio.timeout(POLL_TIMEOUT):
                metrics = await server_metrics(session, server)
        except (aiohttp.ClientError, TimeoutError) as error:
            if server.addr not in self.down:
                self.failures.append(f"{server.addr}: {type(error).__name__} {error}")
            return
        addr = server.addr
        self.polls[addr] += 1
        busy = int(metrics["llamacpp:requests_processing"])
        self.most_processing[addr] = max(self.most_processing[addr], busy)
        deferred = int(metrics["llamacpp:requests_deferred"])
        self.most_deferred[addr] = max(self.most_deferred[addr], deferred)

    def check(self) -> None:
        """Fail with what could not be observed: failed polls, servers never polled."""
        assert not self.failures, (
            f"{len(self.failures)} polls failed, so the watch saw less than happened: "
            + "; ".join(list(dict.fromkeys(self.failures))[:5])
        )
        unpolled = [addr for addr, n in self.polls.items() if n == 0 and addr not in self.down]
        assert not unpolled, f"never polled: {unpolled}"


async def server_metrics(session: aiohttp.ClientSession, server: LlamaServer) -> dict[str, float]:
    """llama-server's own `/metrics` (it needs `--metrics`) as a name -> value table."""
    async with session.get(server.url + "/metrics") as answer:
        text = await answer.text()
        assert answer.status == 200, f"{server.addr}/metrics answered {answer.status}: {text}"
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def watch_session() -> aiohttp.ClientSession:
    """A client that opens a new connection for every poll.

    llama-server closes a kept-alive connection after 100 requests or 5 s idle; a poll sent on
    a connection it had just closed fails with "Server disconnected". Polls every 20 ms hit
    that cap every second.
    """
    connector = aiohttp.TCPConnector(force_close=True)
    return aiohttp.ClientSession(connector=connector)


@contextlib.asynccontextmanager
async def watching(servers: list[LlamaServer]) -> AsyncIterator[SlotWatch]:
    """Watch `servers` for the block; then fail if the watch missed anything."""
    watch = SlotWatch(servers)
    async with watch_session() as session:
        task = asyncio.create_task(watch.run(session))
        try:
            yield watch
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    watch.check()


def requests_served(
    before: dict[str, float], after: dict[str, float], *, tokens_each: int
) -> dict[str, float]:
    """Requests each server served between two `tokens_predicted` readings."""
    return {addr: (after[addr] - before[addr]) / tokens_each for addr in after}


async def tokens_predicted(servers: list[LlamaServer]) -> dict[str, float]:
    """Each server's own count of the tokens it generated so far."""
    async with watch_session() as session:
        return {
            s.addr: (await server_metrics(session, s))["llamacpp:tokens_predicted_total"]
            for s in servers
        }


async def post_json(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    async with session.post(url, json=body) as answer:
        return answer.status, await answer.json()


def busy_slots(server: LlamaServer) -> int:
    import urllib.request

    with urllib.request.urlopen(server.url + "/slots", timeout=5) as answer:
        return sum(s["is_processing"] for s in json.load(answer))


async def test_two_servers_one_slot_each_never_over_dispatched(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer(*PATIENT)
    servers = [llama_server(slots=1, extra_args=["--metrics"]) for _ in range(2)]
    for server in servers:
        fleet.agent(server, interval_ms=1000)
    fleet.wait_agents(2)
    before = await tokens_predicted(servers)
    async with watching(servers) as watch, aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(post_json(session, fleet.proxy + "/completion", LONG) for _ in range(4))
        )
    assert [status for status, _ in results] == [200] * 4
    assert all(body["tokens_predicted"] == 300 for _, body in results)
    # Spread over both servers, by their own counters: each served whole requests.
    served = requests_served(before, await tokens_predicted(servers), tokens_each=300)
    assert sum(served.values()) == 4, served
    assert all(n >= 1 and n.is_integer() for n in served.values()), served
    # Never more tasks than slots on a server, never a deferred request, in any poll.
    assert all(most <= 1 for most in watch.most_processing.values()), watch.most_processing
    assert watch.most_deferred == {s.addr: 0 for s in servers}
    assert fleet.in_flight() == 0


async def test_requests_spread_over_two_servers(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer(*PATIENT)
    servers = [llama_server(slots=2, extra_args=["--metrics"]) for _ in range(2)]
    for server in servers:
        fleet.agent(server)
    fleet.wait_agents(2)
    before = await tokens_predicted(servers)
    # Long enough that all four arrive while the first still runs: then each server gets two.
    body = {**LONG, "n_predict": 1000}
    async with watching(servers) as watch, aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(post_json(session, fleet.proxy + "/completion", body) for _ in range(4))
        )
    assert [status for status, _ in results] == [200] * 4
    served = requests_served(before, await tokens_predicted(servers), tokens_each=1000)
    assert served == {s.addr: 2 for s in servers}
    assert all(most <= 2 for most in watch.most_processing.values()), watch.most_processing
    assert watch.most_deferred == {s.addr: 0 for s in servers}


async def test_buffer_full_429_and_timeout_504(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer("--max-buffered-requests", "1", "--buffered-request-timeout", "400")
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    long = {**LONG, "n_predict": 20000, "stream": True}
    async with aiohttp.ClientSession() as session:
        running = await session.post(fleet.proxy + "/completion", json=long)
        await until(lambda: busy_slots(server) == 1, what="slot busy")
        waiting = asyncio.create_task(post_json(session, fleet.proxy + "/completion", LONG))
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        status, body = await post_json(session, fleet.proxy + "/completion", LONG)
        assert status == 429
        assert body["error"]["code"] == 429
        status, body = await waiting
        assert status == 504
        assert body["error"]["code"] == 504
        assert not running.content.at_eof()
        running.close()
        await until(lambda: busy_slots(server) == 0, within=3, what="slot freed")


async def test_request_before_any_agent_is_served_when_one_registers(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer("--buffered-request-timeout", "30000")
    server = llama_server(slots=1)
    async with aiohttp.ClientSession() as session:
        waiting = asyncio.create_task(
            post_json(session, fleet.proxy + "/completion", {"prompt": "hi", "n_predict": 8})
        )
        await until(lambda: fleet.agents_view()["requests_buffered"] == 1, what="buffered")
        fleet.agent(server)
        status, body = await asyncio.wait_for(waiting, 30)
    assert status == 200
    assert body["tokens_predicted"] == 8


async def test_streamed_chat_arrives_token_by_token(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    body = {
        "messages": [{"role": "user", "content": "Tell me a story."}],
        "stream": True,
        "max_tokens": 1000,
        "ignore_eos": True,
    }
    async with (
        aiohttp.ClientSession() as session,
        session.post(fleet.proxy + "/v1/chat/completions", json=body) as answer,
    ):
        assert answer.status == 200
        assert (await answer.content.readline()).startswith(b"data: ")
        # Token by token: the first event is here while the server is still generating. (Not
        # timed: on a loaded machine a client may read a whole stream in one burst.)
        assert busy_slots(server) == 1
        events = [line async for line in answer.content if line.startswith(b"data: ")]
    assert events[-1].strip() == b"data: [DONE]"
    assert len(events) > 20


async def test_dropped_stream_frees_the_slot_within_a_second(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    async with aiohttp.ClientSession() as session:
        answer = await session.post(
            fleet.proxy + "/completion", json={**LONG, "n_predict": 20000, "stream": True}
        )
        assert (await answer.content.readline()).startswith(b"data: ")
        assert busy_slots(server) == 1
        answer.close()
        dropped = time.monotonic()
        await until(lambda: busy_slots(server) == 0, within=3, what="slot freed")
        assert time.monotonic() - dropped < 1.0
    await until(lambda: fleet.in_flight() == 0, within=2, what="balancer released")


async def test_slots_is_403(fleet: Fleet, llama_server: LlamaServerFactory) -> None:
    fleet.balancer()
    server = llama_server(slots=1)
    fleet.agent(server)
    fleet.wait_agents(1)
    async with (
        aiohttp.ClientSession() as session,
        session.get(fleet.proxy + "/slots") as answer,
    ):
        assert answer.status == 403
        assert (await answer.json())["error"]["code"] == 403


async def test_killed_server_is_reported_and_avoided_and_stopped_agent_removed(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    fleet.balancer()
    doomed, healthy = llama_server(slots=2), llama_server(slots=1)
    doomed_agent = fleet.agent(doomed)
    fleet.agent(healthy)
    fleet.wait_agents(2)
    doomed.process.kill()

    def doomed_status() -> dict[str, Any]:
        agents = fleet.agents_view()["agents"]
        return next(a for a in agents if a["status"]["external_llamacpp_addr"] == doomed.addr)

    await until(lambda: bool(doomed_status()["status"]["error"]), what="error reported")
    assert doomed_status()["status"]["is_connect_error"] is True
    assert not doomed_status()["is_usable"]
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            status, _ = await post_json(
                session, fleet.proxy + "/completion", {"prompt": "x", "n_predict": 4}
            )
            assert status == 200
    doomed_agent.signal(signal.SIGTERM)
    await until(lambda: len(fleet.agents_view()["agents"]) == 1, what="agent removed")
    remaining = fleet.agents_view()["agents"][0]
    assert remaining["status"]["external_llamacpp_addr"] == healthy.addr


async def test_abandoned_non_streamed_request_still_holds_its_slot(
    fleet: Fleet, llama_server: LlamaServerFactory
) -> None:
    # llama-server generates a non-streamed answer to its end even when the client left: the
    # balancer must not send the next request to that busy slot.
    fleet.balancer(*PATIENT)
    server = llama_server(slots=1, extra_args=["--metrics"])
    fleet.agent(server, interval_ms=200)
    fleet.wait_agents(1)
    async with watching([server]) as watch, aiohttp.ClientSession() as session:
        abandoned = asyncio.create_task(
            post_json(session, fleet.proxy + "/completion", {**LONG, "n_predict": 1500})
        )
        await until(lambda: busy_slots(server) == 1, what="slot busy")
        abandoned.cancel()
        await until(lambda: fleet.in_flight() == 0, what="balancer let go of the request")
        status, body = await post_json(
            session, fleet.proxy + "/completion", {"prompt": "next", "n_predict": 4}
        )
    assert status == 200
    assert body["tokens_predicted"] == 4
    assert watch.most_deferred == {server.addr: 0}
