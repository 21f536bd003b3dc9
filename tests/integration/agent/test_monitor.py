"""The monitor against real HTTP peers: what each kind of llama-server answer becomes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import pytest

from rower.addresses import Address
from rower.agent.latest_status import LatestStatus
from rower.agent.llamacpp_probe import AgentIdentity
from rower.agent.monitor import Monitor
from tests.integration.agent.peers import FakeLlama, LlamaState
from tests.processes import free_port


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def monitor_for(
    session: aiohttp.ClientSession,
    addr: str,
    *,
    api_key: str | None = None,
    request_timeout: float = 3.0,
    board: LatestStatus | None = None,
) -> Monitor:
    return Monitor(
        session=session,
        local_addr=Address.parse(addr),
        identity=AgentIdentity("10.1.2.3:8080", agent_name="a", monitoring_interval_ms=50),
        board=board or LatestStatus(),
        api_key=api_key,
        request_timeout=request_timeout,
    )


async def test_healthy_server(llama: FakeLlama, session: aiohttp.ClientSession) -> None:
    llama.state.slots[1]["is_processing"] = True
    monitor = monitor_for(session, llama.addr)
    status = await monitor.poll_once()
    assert status.error is None
    assert (status.slots_idle, status.slots_processing, status.slots_total) == (1, 1, 2)
    # Without --alias, llama-server's /v1/models names the model by its -m path.
    assert (status.model, status.model_aliases) == ("/models/tiny-llama.gguf", [])
    assert status.external_llamacpp_addr == "10.1.2.3:8080"
    assert status.sequence == 1
    assert (await monitor.poll_once()).sequence == 2
    # What it serves is read once at start, not at every poll.
    assert (llama.state.props_requests, llama.state.models_requests) == (1, 1)


async def test_model_alias_wins_over_path(llama: FakeLlama, session: aiohttp.ClientSession) -> None:
    llama.state.model_alias = "qwen-7b"
    status = await monitor_for(session, llama.addr).poll_once()
    assert status.model == "qwen-7b"


async def test_props_reread_when_slot_count_changes(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    monitor = monitor_for(session, llama.addr)
    await monitor.poll_once()
    llama.state.slots.append({"id": 2, "n_ctx": 2048, "is_processing": False})
    llama.state.model_path = "/m/other.gguf"
    status = await monitor.poll_once()
    assert (status.slots_total, status.model) == (3, "/m/other.gguf")
    assert llama.state.props_requests == 2


async def test_props_reread_when_task_ids_say_the_server_restarted(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    progress = [{"has_next_token": False, "has_new_line": False, "n_remain": 0, "n_decoded": 9}]
    llama.state.slots[0].update(id_task=41, next_token=progress)
    monitor = monitor_for(session, llama.addr)
    slot = (await monitor.poll_once()).slots[0]
    assert (slot.id_task, slot.n_decoded, slot.n_remain) == (41, 9, 0)
    assert (await monitor.poll_once()).model == "/models/tiny-llama.gguf"
    assert llama.state.props_requests == 1
    # Restarted between two polls, same slot count, another model.
    llama.state.slots[0].update(id_task=0)
    llama.state.model_path = "/m/other.gguf"
    llama.state.aliases = ["other"]
    status = await monitor.poll_once()
    assert (status.error, status.model, status.slots[0].id_task) == (None, "/m/other.gguf", 0)
    assert status.model_aliases == ["other"]
    assert llama.state.props_requests == 2


async def test_props_reread_after_failed_poll(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    monitor = monitor_for(session, llama.addr)
    await monitor.poll_once()
    llama.state.slots_status = 500
    assert (await monitor.poll_once()).error == "Unexpected response status 500"
    llama.state.slots_status = None
    llama.state.model_alias = "restarted"
    assert (await monitor.poll_once()).model == "restarted"


async def test_api_key_is_sent(session: aiohttp.ClientSession) -> None:
    llama = FakeLlama(LlamaState(api_key="sekret"))
    await llama.start()
    try:
        wrong = await monitor_for(session, llama.addr, api_key="nope").poll_once()
        assert (wrong.error, wrong.is_authorized) == ("Unauthorized", False)
        assert (wrong.slots_idle, wrong.slots_total) == (0, 0)
        missing = await monitor_for(session, llama.addr).poll_once()
        assert missing.is_authorized is False
        right = await monitor_for(session, llama.addr, api_key="sekret").poll_once()
        assert (right.error, right.is_authorized, right.slots_idle) == (None, True, 2)
        assert "Bearer sekret" in llama.state.authorizations
    finally:
        await llama.stop()


async def test_no_slots_endpoint(llama: FakeLlama, session: aiohttp.ClientSession) -> None:
    llama.state.no_slots = True
    status = await monitor_for(session, llama.addr).poll_once()
    assert (status.error, status.is_slots_endpoint_enabled) == ("Not implemented", False)
    assert status.slots_total == 2  # known from /props


async def test_loading_model(llama: FakeLlama, session: aiohttp.ClientSession) -> None:
    llama.state.loading = True
    monitor = monitor_for(session, llama.addr)
    status = await monitor.poll_once()
    assert status.error == "Llama.cpp is loading the model"
    assert status.slots_idle == 0
    llama.state.loading = False
    healthy = await monitor.poll_once()
    assert (healthy.error, healthy.slots_idle, healthy.model) == (
        None,
        2,
        "/models/tiny-llama.gguf",
    )


async def test_503_with_healthy_health_is_unexpected(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.slots_status = 503
    status = await monitor_for(session, llama.addr).poll_once()
    assert status.error == "Unexpected response status 503"


async def test_garbage_json_is_a_deserialize_error(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    llama.state.slots_body = b'{"slots": "no"}'
    status = await monitor_for(session, llama.addr).poll_once()
    assert status.is_deserialize_error is True
    assert status.slots_idle == 0


async def test_connection_refused(session: aiohttp.ClientSession) -> None:
    port = free_port()
    status = await monitor_for(session, f"127.0.0.1:{port}").poll_once()
    assert status.error == f"Request to http://127.0.0.1:{port}/slots failed: connection refused"
    assert (status.is_connect_error, status.is_request_error, status.is_decode_error) == (
        True,
        False,
        False,
    )


async def raw_server(reply: bytes | None) -> tuple[asyncio.Server, str]:
    """A TCP server that reads the request, then writes `reply` and closes (or hangs if None)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if reply is None:
            await asyncio.sleep(30)
        writer.write(reply or b"")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("reply", "flag"),
    [
        (b"", "is_request_error"),
        (b"NOT HTTP AT ALL\r\n\r\n", "is_decode_error"),
        (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\n\r\nzz\r\n[]\r\n",
            "is_decode_error",
        ),
        (None, "is_request_error"),
    ],
)
async def test_transport_failures(session: aiohttp.ClientSession, reply: bytes, flag: str) -> None:
    server, addr = await raw_server(reply)
    try:
        status = await monitor_for(session, addr, request_timeout=0.3).poll_once()
    finally:
        server.close()
    assert status.error is not None
    assert status.error.startswith(f"Request to http://{addr}/slots")
    for name in ("is_connect_error", "is_request_error", "is_decode_error"):
        assert getattr(status, name) is (name == flag), status


async def test_timeout_sentence(session: aiohttp.ClientSession) -> None:
    server, addr = await raw_server(None)
    try:
        status = await monitor_for(session, addr, request_timeout=0.2).poll_once()
    finally:
        server.close()
    assert status.error == f"Request to http://{addr}/slots failed: timed out after 0.2 s"


async def test_run_publishes_every_interval(
    llama: FakeLlama, session: aiohttp.ClientSession
) -> None:
    board = LatestStatus()
    monitor = monitor_for(session, llama.addr, board=board)
    stop = asyncio.Event()
    task = asyncio.create_task(monitor.run(stop))
    await asyncio.sleep(0.33)
    stop.set()
    await asyncio.wait_for(task, 1)
    # 50 ms interval: a poll at 0, 50, ..., 300 ms.
    assert board.latest is not None
    assert 5 <= board.latest.sequence <= 8
    assert llama.state.slots_requests == board.latest.sequence
