"""The EC2 IMDSv2 lookup against a local metadata service on 127.0.0.1."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from rower.agent.aws_metadata import AwsMetadataError, fetch_local_ipv4, metadata_endpoint
from tests.integration.agent.peers import Site
from tests.processes import free_port


class FakeImds(Site):
    """IMDSv2: a token from PUT /latest/api/token, required on every metadata read."""

    def __init__(self, ipv4: str = "172.31.5.17") -> None:
        self.ipv4 = ipv4
        self.ttls: list[str | None] = []
        app = web.Application()
        app.router.add_put("/latest/api/token", self._token)
        app.router.add_get("/latest/meta-data/local-ipv4", self._local_ipv4)
        super().__init__(app)

    @property
    def url(self) -> str:
        return f"http://{self.addr}"

    async def _token(self, request: web.Request) -> web.Response:
        ttl = request.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
        self.ttls.append(ttl)
        if not ttl:
            return web.Response(status=400)
        return web.Response(text="TOKEN-123")

    async def _local_ipv4(self, request: web.Request) -> web.Response:
        if request.headers.get("X-aws-ec2-metadata-token") != "TOKEN-123":
            return web.Response(status=401)
        return web.Response(text=self.ipv4)


@pytest.fixture
async def imds() -> AsyncIterator[FakeImds]:
    server = FakeImds()
    await server.start()
    yield server
    await server.stop()


async def test_reads_the_private_ipv4_with_a_session_token(imds: FakeImds) -> None:
    assert await fetch_local_ipv4(imds.url) == "172.31.5.17"
    assert imds.ttls == ["60"]


async def test_endpoint_comes_from_the_environment(
    imds: FakeImds, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
    assert metadata_endpoint() == imds.url
    assert await fetch_local_ipv4() == "172.31.5.17"


def test_default_endpoint_is_the_link_local_service() -> None:
    assert metadata_endpoint({}) == "http://169.254.169.254"


async def test_unreachable_service_is_a_clear_error() -> None:
    with pytest.raises(AwsMetadataError, match="cannot reach the EC2 metadata service"):
        await fetch_local_ipv4(f"http://127.0.0.1:{free_port()}", seconds=0.5)


async def test_not_an_address_is_an_error(imds: FakeImds) -> None:
    imds.ipv4 = "<html>captive portal</html>"
    with pytest.raises(AwsMetadataError, match="not an IPv4 address"):
        await fetch_local_ipv4(imds.url)


async def test_refused_token_is_an_error() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=403)

    app = web.Application()
    app.router.add_put("/latest/api/token", refuse)
    site = Site(app)
    await site.start()
    try:
        with pytest.raises(AwsMetadataError, match=r"refused a session token \(status 403\)"):
            await fetch_local_ipv4(f"http://{site.addr}")
    finally:
        await site.stop()
