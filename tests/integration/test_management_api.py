"""The management API of a real balancer, spoken to by the test as an agent would."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from rower.balancer.affinity import BLOCK_BYTES
from rower.balancer.placement_wire import decode as decode_placement
from rower.balancer.placement_wire import encode as encode_placement
from rower.balancer.prefix_memory import Placement
from tests.integration.fleet import Fleet, get_json, until
from tests.processes import free_port


def status_line(addr: str, **fields: Any) -> bytes:
    status = {
        "agent_name": "test",
        "error": None,
        "external_llamacpp_addr": addr,
        "is_authorized": True,
        "is_connect_error": False,
        "is_decode_error": False,
        "is_deserialize_error": False,
        "is_request_error": False,
        "is_slots_endpoint_enabled": True,
        "is_unexpected_response_status": False,
        "slots_idle": 2,
        "slots_processing": 0,
        **fields,
    }
    return json.dumps(status).encode() + b"\n"


class StatusStream:
    """An agent's endless NDJSON request body, fed line by line by the test."""

    def __init__(self) -> None:
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def body(self) -> AsyncIterator[bytes]:
        while (line := await self.lines.get()) is not None:
            yield line


async def open_stream(
    session: aiohttp.ClientSession,
    fleet: Fleet,
    agent_id: str,
    stream: StatusStream,
    headers: dict[str, str] | None = None,
) -> asyncio.Task[tuple[int, dict[str, Any]]]:
    async def post() -> tuple[int, dict[str, Any]]:
        url = f"{fleet.management}/api/v1/agent_status_update/{agent_id}"
        async with session.post(url, data=stream.body(), headers=headers) as answer:
            return answer.status, await answer.json()

    return asyncio.create_task(post())


def agent_ids(fleet: Fleet) -> list[str]:
    return [a["agent_id"] for a in fleet.agents_view()["agents"]]


async def test_status_stream_registers_and_its_end_removes(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        stream = StatusStream()
        posting = await open_stream(session, fleet, "agent-1", stream)
        stream.lines.put_nowait(status_line("127.0.0.1:9", slots_idle=3, slots_processing=1))
        await until(lambda: agent_ids(fleet) == ["agent-1"], what="registered")
        agent = fleet.agents_view()["agents"][0]
        assert agent["status"]["slots_idle"] == 3
        assert agent["status"]["slots_processing"] == 1
        assert agent["slots_taken"] == 0
        assert agent["quarantined_until"] is None
        assert set(agent["last_update"]) == {"secs_since_epoch", "nanos_since_epoch"}
        stream.lines.put_nowait(None)
        assert (await posting)[0] == 200
        await until(lambda: agent_ids(fleet) == [], what="removed")


async def test_bad_line_answers_400_and_registers_nothing(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        for bad in (b"{not json\n", b'{"slots_idle": -1}\n', b"[1, 2]\n"):
            stream = StatusStream()
            posting = await open_stream(session, fleet, "agent-bad", stream)
            stream.lines.put_nowait(bad)
            status, body = await asyncio.wait_for(posting, 5)
            assert status == 400, bad
            assert body["error"]["code"] == 400
            assert "StatusUpdate" in body["error"]["message"]
            assert agent_ids(fleet) == []
        # After a good line, a bad one removes the agent.
        stream = StatusStream()
        posting = await open_stream(session, fleet, "agent-2", stream)
        stream.lines.put_nowait(status_line("127.0.0.1:9"))
        await until(lambda: agent_ids(fleet) == ["agent-2"], what="registered")
        stream.lines.put_nowait(b"garbage\n")
        assert (await asyncio.wait_for(posting, 5))[0] == 400
        await until(lambda: agent_ids(fleet) == [], what="removed")


async def test_an_impossible_poll_age_answers_400_naming_it(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        for age in (-1, 10**9):
            stream = StatusStream()
            posting = await open_stream(session, fleet, "agent-bad", stream)
            stream.lines.put_nowait(status_line("127.0.0.1:9", poll_age_ms=age))
            status, body = await asyncio.wait_for(posting, 5)
            assert status == 400, age
            assert "poll_age_ms" in body["error"]["message"]
            assert agent_ids(fleet) == []


async def test_bad_agent_id_is_refused(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        url = f"{fleet.management}/api/v1/agent_status_update/{'x' * 200}"
        async with session.post(url, data=status_line("127.0.0.1:9")) as answer:
            assert answer.status == 400
    assert agent_ids(fleet) == []


async def test_management_token_is_required_when_set(fleet: Fleet) -> None:
    fleet.balancer("--management-token", "s3cret")
    async with aiohttp.ClientSession() as session:
        for headers in (None, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            stream = StatusStream()
            posting = await open_stream(session, fleet, "intruder", stream, headers)
            stream.lines.put_nowait(status_line("127.0.0.1:9"))
            status, body = await asyncio.wait_for(posting, 5)
            assert status == 401
            assert "--management-token" in body["error"]["message"]
        assert agent_ids(fleet) == []
        stream = StatusStream()
        await open_stream(session, fleet, "trusted", stream, {"Authorization": "Bearer s3cret"})
        stream.lines.put_nowait(status_line("127.0.0.1:9"))
        await until(lambda: agent_ids(fleet) == ["trusted"], what="registered with token")
        stream.lines.put_nowait(None)
    balancer_log = fleet.processes[0].output
    assert "s3cret" not in balancer_log


async def test_real_agent_with_token(fleet: Fleet) -> None:
    fleet.balancer("--management-token", "t0ken")
    sim = fleet.sim()
    fleet.agent(sim, flags=["--management-token", "t0ken"])
    fleet.wait_agents(1)


async def test_agent_silent_for_three_intervals_is_stale(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        stream = StatusStream()
        await open_stream(session, fleet, "quiet", stream)
        stream.lines.put_nowait(status_line("127.0.0.1:9", monitoring_interval_ms=100))
        await until(lambda: agent_ids(fleet) == ["quiet"], what="registered")
        assert fleet.agents_view()["agents"][0]["is_usable"]
        await until(lambda: fleet.agents_view()["agents"][0]["is_stale"], within=3, what="stale")
        assert not fleet.agents_view()["agents"][0]["is_usable"]
        stream.lines.put_nowait(status_line("127.0.0.1:9", monitoring_interval_ms=100))
        await until(lambda: fleet.agents_view()["agents"][0]["is_usable"], what="fresh again")
        stream.lines.put_nowait(None)


async def test_agents_are_sorted_usable_first_then_most_idle(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        streams = {name: StatusStream() for name in ("broken", "busy", "idle")}
        for name, stream in streams.items():
            await open_stream(session, fleet, name, stream)
        streams["broken"].lines.put_nowait(
            status_line("127.0.0.1:7", error="Unauthorized", is_authorized=False, slots_idle=0)
        )
        streams["busy"].lines.put_nowait(status_line("127.0.0.1:8", slots_idle=1))
        streams["idle"].lines.put_nowait(status_line("127.0.0.1:9", slots_idle=4))
        await until(lambda: len(agent_ids(fleet)) == 3, what="all registered")
        assert agent_ids(fleet) == ["idle", "busy", "broken"]
        for stream in streams.values():
            stream.lines.put_nowait(None)


async def test_sse_stream_sends_a_snapshot_then_changes(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        events = await session.get(fleet.management + "/api/v1/agents/stream")
        assert events.headers["Content-Type"].startswith("text/event-stream")

        async def next_event() -> dict[str, Any]:
            while True:
                line = await asyncio.wait_for(events.content.readline(), 5)
                if line.startswith(b"data: "):
                    return dict(json.loads(line[6:]))

        assert (await next_event())["agents"] == []
        stream = StatusStream()
        await open_stream(session, fleet, "watched", stream)
        stream.lines.put_nowait(status_line("127.0.0.1:9"))
        while not (snapshot := await next_event())["agents"]:
            pass
        assert snapshot["agents"][0]["agent_id"] == "watched"
        stream.lines.put_nowait(None)
        while (await next_event())["agents"]:
            pass
        events.close()


async def test_cors_allows_only_listed_origins(fleet: Fleet) -> None:
    fleet.balancer("--management-cors-allowed-host", "http://dash.example")
    async with aiohttp.ClientSession() as session:
        url = fleet.management + "/api/v1/agents"
        async with session.get(url, headers={"Origin": "http://dash.example"}) as answer:
            assert answer.headers["Access-Control-Allow-Origin"] == "http://dash.example"
        async with session.get(url, headers={"Origin": "http://evil.example"}) as answer:
            assert "Access-Control-Allow-Origin" not in answer.headers
        preflight = {"Origin": "http://dash.example", "Access-Control-Request-Method": "GET"}
        async with session.options(url, headers=preflight) as answer:
            assert answer.status == 204
            assert answer.headers["Access-Control-Allow-Origin"] == "http://dash.example"


async def test_unknown_paths_and_health(fleet: Fleet) -> None:
    fleet.balancer()
    async with aiohttp.ClientSession() as session:
        async with session.get(fleet.management + "/health") as answer:
            assert await answer.json() == {"status": "ok"}
        async with session.get(fleet.management + "/nope") as answer:
            assert answer.status == 404
            assert (await answer.json())["error"]["code"] == 404
        async with session.get(fleet.proxy + "/props") as answer:
            assert answer.status == 503
            assert "start an agent" in (await answer.json())["error"]["message"]
        # The fleet's models are the balancer's own answer: none yet.
        async with session.get(fleet.proxy + "/v1/models") as answer:
            assert answer.status == 200
            assert (await answer.json())["data"] == []


async def test_host_header_is_kept_or_rewritten(fleet: Fleet) -> None:
    seen: list[str] = []

    async def props(request: web.Request) -> web.Response:
        seen.append(request.headers["Host"])
        return web.json_response({"total_slots": 1})

    app = web.Application()
    app.router.add_get("/props", props)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        for flags, expected in (((), "client.example"), (("--rewrite-host-header",), None)):
            fleet.balancer(*flags)
            async with aiohttp.ClientSession() as session:
                stream = StatusStream()
                await open_stream(session, fleet, "echo", stream)
                stream.lines.put_nowait(status_line(f"127.0.0.1:{port}"))
                await until(lambda: agent_ids(fleet) == ["echo"], what="registered")
                async with session.get(
                    fleet.proxy + "/props", headers={"Host": "client.example"}
                ) as answer:
                    assert answer.status == 200
                stream.lines.put_nowait(None)
            assert seen[-1] == (expected or f"127.0.0.1:{port}")
            fleet.close()
            fleet.processes.clear()
    finally:
        await runner.cleanup()


async def test_placements_stream_tells_followers_what_was_sent_where(fleet: Fleet) -> None:
    fleet.balancer("--management-token", "t0ken")
    sim = fleet.sim(slots=2)
    fleet.agent(sim, flags=["--management-token", "t0ken"])
    fleet.wait_agents(1)
    url = fleet.management + "/api/v1/placements"
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as refused:
            assert refused.status == 401
            assert "--management-token" in (await refused.json())["error"]["message"]
        headers = {"Authorization": "Bearer t0ken"}
        async with session.get(url, headers=headers) as stream:
            assert stream.status == 200
            assert stream.headers["Content-Type"] == "application/x-ndjson"
            prompt = "a conversation head long enough for a few blocks " * 40
            async with session.post(
                fleet.proxy + "/completion", json={"prompt": prompt, "n_predict": 2}
            ) as answer:
                assert answer.status == 200
            line = await asyncio.wait_for(stream.content.readline(), 5.0)
    placement = decode_placement(line.rstrip(b"\n"))
    assert placement.server == sim.addr
    assert len(placement.prefix) == len(prompt.encode()) // BLOCK_BYTES


class FakePeer:
    """A balancer's placement stream that sends what the test says, then ends."""

    def __init__(self, lines: list[bytes]) -> None:
        self.lines = lines
        self.port = free_port()
        self.connections = 0
        self.runner: web.AppRunner | None = None

    async def placements(self, request: web.Request) -> web.StreamResponse:
        self.connections += 1
        response = web.StreamResponse()
        await response.prepare(request)
        for line in self.lines:
            await response.write(line + b"\n")
        return response

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/api/v1/placements", self.placements)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    async def stop(self) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


def metric(fleet: Fleet, name: str, **labels: str) -> float:
    """The value of the one sample `name{labels}` of the balancer's metrics."""
    with urllib.request.urlopen(fleet.management + "/metrics", timeout=5) as answer:
        text = answer.read().decode()
    values = [
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and sample.labels == labels
    ]
    assert len(values) == 1, (name, labels, values)
    return float(values[0])


async def test_a_peer_that_sends_what_is_not_a_placement_is_dropped_and_followed_again(
    fleet: Fleet,
) -> None:
    unknown = encode_placement(Placement("127.0.0.1:9", (1, 2, 3)))
    peer = FakePeer([b"", unknown.rstrip(b"\n"), b'{"server": "127.0.0.1:9"}'])
    await peer.start()
    try:
        process = fleet.balancer(
            "--metrics-endpoint-enable", "--peer-balancer-addr", f"127.0.0.1:{peer.port}"
        )
        await until(lambda: peer.connections >= 2, within=15.0, what="followed again")
        name = f"127.0.0.1:{peer.port}"
        heard = "rower_peer_placements_total"
        assert metric(fleet, heard, peer=name, outcome="unknown_server") >= 1
        assert metric(fleet, heard, peer=name, outcome="applied") == 0
        assert metric(fleet, "rower_peer_refused_lines_total", peer=name) >= 1
        assert get_json(fleet.management + "/health") == {"status": "ok"}
        assert "it sent a line that is not a placement" in process.output
    finally:
        await peer.stop()
