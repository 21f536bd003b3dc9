"""`rower agent` as a real process: flags, environment variables, signals, the EC2 lookup."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from aiohttp import web

from tests.integration.agent.peers import FakeLlama, Receiver, Site, eventually
from tests.processes import Process, free_port, rower


async def exited(process: Process, *, within: float = 5.0) -> int:
    """Wait for the process to exit without blocking the event loop (peers keep serving)."""
    deadline = time.monotonic() + within
    while process.popen.poll() is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"{process.argv} still running after {within}s:\n{process.output}")
        await asyncio.sleep(0.02)
    return process.popen.returncode


async def stopped(process: Process) -> int:
    """SIGTERM, then wait while the peers keep serving the agent's last lines."""
    process.signal(signal.SIGTERM)
    return await exited(process)


async def test_environment_variables_and_sigterm(llama: FakeLlama, receiver: Receiver) -> None:
    other = Receiver()
    await other.start()
    agent = rower(
        "agent",
        env={
            "ROWER_MANAGEMENT_ADDR": f"{receiver.addr},{other.addr}",
            "ROWER_LOCAL_LLAMACPP_ADDR": llama.addr,
            "ROWER_NAME": "from-env",
            "ROWER_MONITORING_INTERVAL": "100",
            "ROWER_MANAGEMENT_TOKEN": "tok",
        },
    )
    try:
        await eventually(lambda: len(receiver.lines) >= 2 and len(other.lines) >= 2, timeout=10)
        status = receiver.statuses[0]
        assert status.agent_name == "from-env"
        assert status.external_llamacpp_addr == llama.addr
        assert status.monitoring_interval_ms == 100
        assert (status.slots_idle, status.model) == (2, "/models/tiny-llama.gguf")
        assert receiver.headers[0]["Authorization"] == "Bearer tok"
        assert await stopped(agent) == 0
        # Both streams ended cleanly, with a last line marked draining.
        assert (receiver.streams_ended, other.streams_ended) == (1, 1)
        assert receiver.latest is not None
        assert receiver.latest.is_draining
    except BaseException:
        print(agent.output)
        raise
    finally:
        agent.close()
        await other.stop()


async def test_flags_win_over_environment(llama: FakeLlama, receiver: Receiver) -> None:
    agent = rower(
        "agent",
        "--management-addr",
        receiver.addr,
        "--local-llamacpp-addr",
        llama.addr,
        "--external-llamacpp-addr",
        "gpu-7.internal:9000",
        "--monitoring-interval",
        "100",
        env={"ROWER_NAME": "env-name", "ROWER_MANAGEMENT_ADDR": f"127.0.0.1:{free_port()}"},
    )
    try:
        await eventually(lambda: len(receiver.lines) >= 1, timeout=10)
        assert receiver.statuses[0].external_llamacpp_addr == "gpu-7.internal:9000"
        assert receiver.statuses[0].agent_name == "env-name"
        assert await stopped(agent) == 0
    finally:
        agent.close()


async def test_aws_metadata_address(llama: FakeLlama, receiver: Receiver) -> None:
    async def token(request: web.Request) -> web.Response:
        return web.Response(text="T")

    async def local_ipv4(request: web.Request) -> web.Response:
        ok = request.headers.get("X-aws-ec2-metadata-token") == "T"
        return web.Response(text="172.31.9.9") if ok else web.Response(status=401)

    app = web.Application()
    app.router.add_put("/latest/api/token", token)
    app.router.add_get("/latest/meta-data/local-ipv4", local_ipv4)
    imds = Site(app)
    await imds.start()
    agent = rower(
        "agent",
        "--management-addr",
        receiver.addr,
        "--local-llamacpp-addr",
        llama.addr,
        "--external-llamacpp-addr",
        "aws:metadata:local-ipv4:8080",
        env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://{imds.addr}"},
    )
    try:
        await eventually(lambda: len(receiver.lines) >= 1, timeout=10)
        assert receiver.statuses[0].external_llamacpp_addr == "172.31.9.9:8080"
        assert await stopped(agent) == 0
    finally:
        agent.close()
        await imds.stop()


async def test_unreachable_aws_metadata_exits_2(receiver: Receiver) -> None:
    agent = rower(
        "agent",
        "--management-addr",
        receiver.addr,
        "--local-llamacpp-addr",
        "127.0.0.1:8088",
        "--external-llamacpp-addr",
        "aws:metadata:local-ipv4:8080",
        env={"AWS_EC2_METADATA_SERVICE_ENDPOINT": f"http://127.0.0.1:{free_port()}"},
    )
    try:
        assert await exited(agent, within=10) == 2
        assert "cannot reach the EC2 metadata service" in agent.output
        assert not receiver.lines
    finally:
        agent.close()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--management-addr"),
        (["--management-addr", "127.0.0.1:1"], "--local-llamacpp-addr"),
        (["--management-addr", "http://x:1", "--local-llamacpp-addr", "a:1"], "is a URL"),
        (
            [
                "--management-addr",
                "127.0.0.1:1",
                "--local-llamacpp-addr",
                "127.0.0.1:2",
                "--monitoring-interval",
                "0",
            ],
            "not a positive number of milliseconds",
        ),
        (
            [
                "--management-addr",
                "127.0.0.1:1",
                "--local-llamacpp-addr",
                "127.0.0.1:2",
                "--external-llamacpp-addr",
                "10.0.0.7:8080/slots",
            ],
            "path, query or user part",
        ),
        (
            ["--management-addr", "127.0.0.1:1", "--local-llamacpp-addr", "0.0.0.0:8080"],
            "give --external-llamacpp-addr",
        ),
    ],
)
async def test_bad_flags_exit_2(args: list[str], message: str) -> None:
    agent = rower("agent", *args)
    try:
        assert await exited(agent, within=10) == 2
        assert message in agent.output
    finally:
        agent.close()
