"""Both listeners of a running balancer, spoken to with raw sockets as an attacker would.

One balancer, one `rower sim` behind a recording relay (so the tests see every byte that
reached the server) and one honest agent serve the whole module. After every hostile case,
`still_sound` checks what must hold: the balancer lives and answers normal traffic, nothing
but the honest agent is registered, no slot is held (`slots_taken` 0 and `requests_in_flight`
0 in `/api/v1/agents`), and no request was smuggled through to the server.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from rower.balancer.http_limits import LINGER
from tests.chaos.invariants import settled
from tests.chaos.raw_http import Exchange, RecordingRelay, exchange
from tests.integration.fleet import Fleet, Sim
from tests.processes import Process

TOKEN = "raw-socket-token"
HEADER_TIMEOUT_MS = 1500
BODY_TIMEOUT_MS = 1000
IDLE_TIMEOUT_MS = 3000
MAX_HEADER_BYTES = 4096
MAX_SLOTS = 64
SMUGGLED = b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
"""A request hidden where a body should be: it must never reach llama-server as a request."""
PIPELINED = b"GET /pipelined HTTP/1.1\r\nHost: x\r\n\r\n"
"""A request sent after another on one connection, which is no fault."""


def hostile(examples: int) -> settings:
    """Hypothesis settings for `examples` cases against the module's balancer (each ~30 ms)."""
    return settings(
        max_examples=examples,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@dataclass
class Rig:
    fleet: Fleet
    balancer: Process
    sim: Sim
    relay: RecordingRelay

    @property
    def ports(self) -> dict[str, int]:
        return {"proxy": self.fleet.proxy_port, "management": self.fleet.management_port}


@pytest.fixture(scope="module")
def rig() -> Iterator[Rig]:
    fleet = Fleet()
    try:
        sim = fleet.sim(slots=2, speed=400)
        relay = RecordingRelay(sim.port)
        balancer = fleet.balancer(
            "--management-token",
            TOKEN,
            "--metrics-endpoint-enable",
            "--request-header-timeout",
            str(HEADER_TIMEOUT_MS),
            "--request-body-timeout",
            str(BODY_TIMEOUT_MS),
            "--idle-connection-timeout",
            str(IDLE_TIMEOUT_MS),
            "--max-header-bytes",
            str(MAX_HEADER_BYTES),
            "--max-slots-per-agent",
            str(MAX_SLOTS),
        )
        fleet.agent(
            sim,
            name="honest",
            flags=["--external-llamacpp-addr", relay.addr, "--management-token", TOKEN],
        )
        fleet.wait_agents(1)
        yield Rig(fleet, balancer, sim, relay)
    finally:
        fleet.close()
        relay.close()


@pytest.fixture(autouse=True)
def balancer_log_on_failure(request: pytest.FixtureRequest, rig: Rig) -> Iterator[None]:
    yield
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        print(rig.fleet.outputs())


async def still_sound(rig: Rig) -> None:
    """The balancer lives, serves, registered nothing and holds nothing; nothing was smuggled
    (`RecordingRelay.requests` fails on a request the balancer did not make)."""
    assert rig.balancer.popen.poll() is None, "the balancer died"
    await settled(rig.fleet, within=5.0)
    assert rig.fleet.agent_names() == ["honest"]
    rig.relay.requests()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(rig.fleet.proxy + "/v1/models") as answer:
            assert answer.status == 200
        body = {"prompt": "still there?", "n_predict": 1}
        async with session.post(rig.fleet.proxy + "/completion", json=body) as answer:
            assert answer.status == 200, await answer.text()
        async with session.get(rig.fleet.management + "/health") as answer:
            assert answer.status == 200


def refused(seen: Exchange, status: int) -> dict[str, Any]:
    """The exchange got one `status` answer in llama.cpp's error shape and was closed."""
    answer = seen.first
    assert answer.status == status, (answer.status, answer.body)
    assert seen.closed, "the connection was kept open after a refusal"
    assert not seen.trailing, seen.trailing
    return answer.error()


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


def head(request_line: bytes, *headers: bytes) -> bytes:
    return request_line + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"


POST = b"POST /v1/models HTTP/1.1"
FRAMING = {
    "HTTP/0.9 request line": (b"GET /v1/models\r\n\r\n", 400),
    "HTTP/1.0 chunked keep-alive with a request smuggled in the body": (
        head(
            b"POST /v1/models HTTP/1.0",
            b"Host: x",
            b"Transfer-Encoding: chunked",
            b"Connection: keep-alive",
        )
        + chunked(SMUGGLED)
        + SMUGGLED,
        400,
    ),
    "HTTP/1.0 chunked": (
        head(b"POST /v1/models HTTP/1.0", b"Transfer-Encoding: chunked") + chunked(b"{}"),
        400,
    ),
    "Transfer-Encoding with Content-Length": (
        head(POST, b"Host: x", b"Content-Length: 4", b"Transfer-Encoding: chunked")
        + chunked(SMUGGLED),
        400,
    ),
    "Transfer-Encoding gzip, chunked": (
        head(POST, b"Host: x", b"Transfer-Encoding: gzip, chunked") + chunked(b"{}"),
        501,
    ),
    "Transfer-Encoding twice": (
        head(POST, b"Host: x", b"Transfer-Encoding: chunked", b"Transfer-Encoding: chunked")
        + chunked(b"{}"),
        400,
    ),
    "Transfer-Encoding chunked, identity": (
        head(POST, b"Host: x", b"Transfer-Encoding: chunked, identity") + chunked(b"{}"),
        400,
    ),
    "Content-Length twice": (
        head(POST, b"Host: x", b"Content-Length: 2", b"Content-Length: 2") + b"{}",
        400,
    ),
    "Content-Length twice, different": (
        head(POST, b"Host: x", b"Content-Length: 2", b"Content-Length: 38") + b"{}" + SMUGGLED,
        400,
    ),
    "Transfer_Encoding with an underscore": (
        head(POST, b"Host: x", b"Content-Length: 4", b"Transfer_Encoding: chunked")
        + chunked(SMUGGLED),
        400,
    ),
    "Content-Length as a list": (head(POST, b"Host: x", b"Content-Length: 2, 2") + b"{}", 400),
    "Content-Length with a sign": (head(POST, b"Host: x", b"Content-Length: +2") + b"{}", 400),
    "obs-fold": (head(b"GET /v1/models HTTP/1.1", b"Host: x", b"X-A: a", b"  folded"), 400),
    "bare LF line ends": (b"GET /v1/models HTTP/1.1\nHost: x\n\n", 400),
    "bare CR in a header": (b"GET /v1/models HTTP/1.1\r\nHost: x\rX: y\r\n\r\n", 400),
    "space before the colon": (head(b"GET /v1/models HTTP/1.1", b"Host : x"), 400),
    "NUL in a header value": (head(b"GET /v1/models HTTP/1.1", b"Host: x", b"X: a\0b"), 400),
    "NUL in the target": (head(b"GET /v1/\0models HTTP/1.1", b"Host: x"), 400),
    "no Host in HTTP/1.1": (head(b"GET /v1/models HTTP/1.1"), 400),
    "two Hosts": (head(b"GET /v1/models HTTP/1.1", b"Host: x", b"Host: y"), 400),
    "HTTP/2.0 request line": (head(b"GET /v1/models HTTP/2.0", b"Host: x"), 505),
    "HTTP/1.2": (head(b"GET /v1/models HTTP/1.2", b"Host: x"), 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 400),
    "TLS on the plain port": (bytes.fromhex("16030100a5010000a10303") + bytes(40), 400),
    "CONNECT": (head(b"CONNECT 127.0.0.1:22 HTTP/1.1", b"Host: 127.0.0.1:22"), 405),
    "asterisk-form": (head(b"OPTIONS * HTTP/1.1", b"Host: x"), 400),
    "authority-form GET": (head(b"GET 127.0.0.1:22 HTTP/1.1", b"Host: x"), 400),
    "fragment in the target": (head(b"GET /v1/models#x HTTP/1.1", b"Host: x"), 400),
    "bad chunk size": (
        head(POST, b"Host: x", b"Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "chunk longer than its size": (
        head(POST, b"Host: x", b"Transfer-Encoding: chunked") + b"1\r\n{}\r\n0\r\n\r\n",
        400,
    ),
    "chunk size overflow": (
        head(POST, b"Host: x", b"Transfer-Encoding: chunked") + b"f" * 20 + b"\r\n{}\r\n",
        400,
    ),
    "request line too long": (
        head(b"GET /" + b"x" * MAX_HEADER_BYTES + b" HTTP/1.1", b"Host: x"),
        431,
    ),
    "header too long": (
        head(b"GET /v1/models HTTP/1.1", b"Host: x", b"X: " + b"y" * (MAX_HEADER_BYTES + 10)),
        431,
    ),
    "too many headers": (
        head(b"GET /v1/models HTTP/1.1", b"Host: x", *(b"X-%d: y" % i for i in range(200))),
        431,
    ),
}


@pytest.mark.parametrize("listener", ["proxy", "management"])
@pytest.mark.parametrize("case", list(FRAMING))
async def test_bad_framing_is_refused_and_closed(rig: Rig, listener: str, case: str) -> None:
    data, status = FRAMING[case]
    before = rig.relay.requests()
    seen = await exchange(rig.ports[listener], data, answers=2)
    assert len(seen.answers) == 1, f"{len(seen.answers)} answers: {seen.answers}"
    refused(seen, status)
    assert rig.relay.requests() == before, "a refused request reached llama-server"
    await still_sound(rig)


async def test_the_refusals_answer_http_1_1(rig: Rig) -> None:
    for data in (b"GET /v1/models\r\n\r\n", head(b"GET /v1/models HTTP/2.0", b"Host: x")):
        seen = await exchange(rig.fleet.proxy_port, data)
        assert seen.first.version == "HTTP/1.1"


async def test_a_declined_upgrade_is_served_as_a_plain_request(rig: Rig) -> None:
    # A websocket upgrade is not a framing fault: the proxy answers it as HTTP and the bytes
    # after it are the next request on the connection, handled in turn (never a tunnel).
    upgrade = head(
        b"GET /v1/models HTTP/1.1",
        b"Host: x",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    )
    seen = await exchange(
        rig.fleet.proxy_port, upgrade + head(b"GET /slots HTTP/1.1", b"Host: x"), answers=2
    )
    assert [a.status for a in seen.answers] == [200, 403]
    await still_sound(rig)


# Request heads of every shape: methods, targets, versions, header names, values and line ends
# that parsers disagree on, bodies framed right and wrong, and a request smuggled behind.
methods = st.sampled_from(
    [
        b"GET",
        b"POST",
        b"HEAD",
        b"PUT",
        b"DELETE",
        b"OPTIONS",
        b"PATCH",
        b"TRACE",
        b"CONNECT",
        b"PRI",
        b"get",
        b"G\xffT",
        b"",
        b"FOO",
    ]
)
targets = st.sampled_from(
    [
        b"/v1/models",
        b"/health",
        b"/props",
        b"/completion",
        b"/v1/chat/completions",
        b"/slots",
        b"//slots",
        b"/%73lots",
        b"/x/../slots",
        b"*",
        b"127.0.0.1:22",
        b"",
        b"/a b",
        b"/\xff",
        b"http://127.0.0.1:9/v1/models",
        b"/api/v1/agents",
        b"/api/v1/agents/x/drain",
        b"/api/v1/agent_status_update/x",
        b"/dashboard",
        b"/metrics",
        b"/v1/models?x=%00",
    ]
) | st.binary(max_size=12).map(lambda b: b"/" + b)
versions = st.sampled_from(
    [
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"HTTP/0.9",
        b"HTTP/2.0",
        b"HTTP/1.2",
        b"http/1.1",
        b"",
        b"HTTP/1.1 x",
        b"HTTP/1",
    ]
)
names = st.sampled_from(
    [
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Expect",
        b"Upgrade",
        b"Authorization",
        b"Content-Type",
        b"X-Forwarded-Host",
        b"Te",
        b"Trailer",
        b"X-A",
        b"X A",
        b"X:A",
        b"",
        b"\xff",
        b"Content-Length ",
    ]
)
values = st.sampled_from(
    [
        b"x",
        b"chunked",
        b"gzip, chunked",
        b"chunked, gzip",
        b"identity",
        b"CHUNKED",
        b"keep-alive",
        b"close",
        b"Upgrade",
        b"websocket",
        b"100-continue",
        b"0",
        b"2",
        b"-1",
        b"+2",
        b"2, 2",
        b"99999999999999999999",
        b"\xff\xfe",
        b"a\0b",
        b"a\rb",
        b" spaced ",
        b"Bearer \xff",
        b"Bearer " + TOKEN.encode(),
        b"application/json",
        b"127.0.0.1:9",
    ]
) | st.binary(max_size=16)
separators = st.sampled_from([b": ", b":", b" : ", b":\t", b"\t: "])
line_ends = st.sampled_from([b"\r\n"] * 6 + [b"\n", b"\r", b"\r\n  folded\r\n"])
bodies = st.one_of(
    st.just(b""),
    st.binary(max_size=40),
    st.lists(st.binary(min_size=1, max_size=20), max_size=3).map(lambda p: chunked(*p)),
    st.just(chunked(SMUGGLED) + SMUGGLED),
)


@st.composite
def request_heads(draw: st.DrawFn) -> bytes:
    line = draw(methods) + b" " + draw(targets) + (b" " + draw(versions)).rstrip(b" ")
    fields = draw(st.lists(st.tuples(names, separators, values, line_ends), max_size=6))
    if draw(st.booleans()):
        fields.insert(0, (b"Host", b": ", b"x", b"\r\n"))
    data = line + b"\r\n"
    data += b"".join(name + sep + value + end for name, sep, value, end in fields)
    data += b"\r\n" + draw(bodies)
    if draw(st.booleans()):
        data += PIPELINED
    return data


@hostile(100)
@given(data=request_heads(), listener=st.sampled_from(["proxy", "management"]))
@example(
    data=FRAMING["HTTP/1.0 chunked keep-alive with a request smuggled in the body"][0],
    listener="proxy",
)
def test_any_request_head_is_answered_or_refused(rig: Rig, data: bytes, listener: str) -> None:
    async def case() -> None:
        head_only = data.startswith(b"HEAD ")
        seen = await exchange(rig.ports[listener], data, answers=3, wait=2.5, head_only=head_only)
        for answer in seen.answers:
            assert answer.status != 500, answer.body
            assert b"Internal error in the balancer" not in answer.body
            if answer.status in (400, 405, 408, 411, 413, 431, 501, 505):
                error = json.loads(answer.body)["error"] if not head_only else None
                assert error is None or error["code"] == answer.status
        await still_sound(rig)

    asyncio.run(case())


@st.composite
def chunk_encodings(draw: st.DrawFn) -> tuple[bytes, bytes | None]:
    """A chunked body and what it decodes to (None: it is malformed)."""
    pieces = draw(st.lists(st.binary(min_size=1, max_size=30), max_size=4))
    encoded, sound = b"", True
    for piece in pieces:
        size = draw(
            st.sampled_from(["exact", "exact", "upper", "zeros", "extension", "short", "garbage"])
        )
        if size == "exact":
            line = b"%x" % len(piece)
        elif size == "upper":
            line = b"%X" % len(piece)
        elif size == "zeros":
            line = b"000%x" % len(piece)
        elif size == "extension":
            line = b"%x;name=value" % len(piece)
        elif size == "short":
            line, sound = b"%x" % (len(piece) - 1 if len(piece) > 1 else 2), False
        else:
            line, sound = draw(st.sampled_from([b"-1", b"0x5", b" 5", b"5 ", b"", b"g"])), False
        encoded += line + b"\r\n" + piece + b"\r\n"
    end = draw(
        st.sampled_from([b"0\r\n\r\n", b"0\r\n\r\n", b"0\r\nX-Trailer: 1\r\n\r\n", b"0\n\n"])
    )
    if end == b"0\n\n":
        sound = False
    return encoded + end, b"".join(pieces) if sound else None


@hostile(40)
@given(body=chunk_encodings())
@example(body=(b"5\r\nhello\r\n0\r\n\r\n", b"hello"))
@example(body=(b"3\r\nhello\r\n0\r\n\r\n", None))
def test_a_chunked_body_reaches_the_server_whole_or_not_at_all(
    rig: Rig, body: tuple[bytes, bytes | None]
) -> None:
    encoded, decoded = body

    async def case() -> None:
        before = rig.relay.requests()
        data = head(
            b"POST /v1/models HTTP/1.1",
            b"Host: x",
            b"Transfer-Encoding: chunked",
            b"Connection: close",
        )
        seen = await exchange(rig.fleet.proxy_port, data + encoded, wait=3.0)
        relayed = [r for key, r in rig.relay.requests().items() if key not in before]
        if decoded is None:
            assert seen.first.status in (400, 408), seen.first.body
            assert relayed == [], "a malformed body reached llama-server"
        else:
            # The sim answers 405 to a POST of /v1/models: the request reached it.
            assert seen.first.status == 405, seen.first.body
            assert [r.body for r in relayed] == [decoded]
        await still_sound(rig)

    asyncio.run(case())


def status_post(agent_id: str, body: bytes, *, authorization: bytes | None = None) -> bytes:
    auth = authorization if authorization is not None else b"Bearer " + TOKEN.encode()
    return (
        head(
            b"POST /api/v1/agent_status_update/" + agent_id.encode() + b" HTTP/1.1",
            b"Host: x",
            b"Authorization: " + auth,
            b"Content-Type: application/x-ndjson",
            b"Content-Length: %d" % len(body),
        )
        + body
    )


def own_spellings(port: int) -> list[str]:
    """Ways an agent could name a listener of the balancer at 127.0.0.1:`port`."""
    return [
        f"127.0.0.1:{port}",
        f"localhost:{port}",
        f"LocalHost.:{port}",
        f"api.localhost:{port}",
        f"127.0.0.2:{port}",
        f"127.255.255.254:{port}",
        f"[::1]:{port}",
        f"[::ffff:127.0.0.1]:{port}",
        f"[0:0::1]:{port}",
    ]


NOT_HOST_PORT = [
    "127.0.0.1:8088/slots?x=",
    "127.0.0.1:8088/",
    "user@127.0.0.1:8088",
    "not a host:80",
    "127.0.0.1:99999",
    "127.0.0.1:0",
    "127.0.0.1:08088",
    "127.1:8088",
    "0x7f000001:8088",
    "2130706433:8088",
    "[fe80::1%eth0]:8088",
    "0.0.0.0:8088",
    "[::]:8088",
    "http://127.0.0.1:8088",
    "127.0.0.1:\u0668\u0660",
    "gpu\u00e9.example:8080",
    "a:b:c",
]
GOOD_ADDRESSES = ["127.0.0.1:9", "10.255.255.1:8080", "[2001:db8::1]:8080", "GPU-7.example:8080"]


async def test_agents_cannot_point_the_proxy_anywhere_but_at_a_server(rig: Rig) -> None:
    addresses = NOT_HOST_PORT + own_spellings(rig.fleet.proxy_port)
    addresses += own_spellings(rig.fleet.management_port)
    for index, address in enumerate(addresses):
        line = json.dumps({"external_llamacpp_addr": address, "slots_idle": 1, "slots_total": 1})
        seen = await exchange(
            rig.fleet.management_port, status_post(f"hostile-{index}", line.encode() + b"\n")
        )
        error = refused(seen, 400)
        assert "external_llamacpp_addr refused" in error["message"], (address, error)
    await still_sound(rig)


async def test_absurd_slot_counts_are_refused(rig: Rig) -> None:
    lines = [
        {"slots_total": 10**12, "slots_idle": 10**12},
        {"slots_idle": MAX_SLOTS + 1},
        {"slots_idle": MAX_SLOTS, "slots_processing": 1},
        {"slots_total": 2, "slots_idle": 3},
        {"slots": [{"id": i, "is_processing": False} for i in range(MAX_SLOTS + 1)]},
    ]
    for index, fields in enumerate(lines):
        line = json.dumps({"external_llamacpp_addr": "127.0.0.1:9", **fields}).encode()
        seen = await exchange(
            rig.fleet.management_port, status_post(f"greedy-{index}", line + b"\n")
        )
        error = refused(seen, 400)
        assert "slots" in error["message"], error
    async with (
        aiohttp.ClientSession() as session,
        session.get(rig.fleet.management + "/metrics") as answer,
    ):
        metrics = await answer.text()
    idle = re.search(r"^rower_slots_idle (\S+)$", metrics, re.M)
    assert idle is not None, metrics
    assert float(idle.group(1)) <= 2, idle
    await still_sound(rig)


async def test_bytes_that_are_not_utf8_get_4xx_not_500(rig: Rig) -> None:
    port = rig.fleet.management_port
    good = json.dumps({"external_llamacpp_addr": "127.0.0.1:9", "slots_idle": 1}).encode() + b"\n"
    # In the token, on the status stream and on a drain.
    seen = await exchange(port, status_post("bytes-1", good, authorization=b"Bearer \xff\xfe"))
    refused(seen, 401)
    drain = head(
        b"POST /api/v1/agents/x/drain HTTP/1.1",
        b"Host: x",
        b"Authorization: Bearer \xc3\x28",
        b"Content-Length: 0",
    )
    seen = await exchange(port, drain)
    assert seen.first.status == 401, seen.first.body
    # Inside the JSON strings of a status line, and as a whole line.
    for line in (
        b'{"external_llamacpp_addr": "127.0.0.1:9", "agent_name": "\xff\xfe"}\n',
        b'{"external_llamacpp_addr": "127.0.0.1:9\xc0"}\n',
        b'{"external_llamacpp_addr": "127.0.0.1:9", "error": "\xed\xa0\x80"}\n',
        b'{"external_llamacpp_addr": "127.0.0.1:9", "model": "\\ud800"}\n',
        b"\xff\xfe\xfd\n",
    ):
        seen = await exchange(port, status_post("bytes-2", line))
        error = refused(seen, 400)
        assert "status update" in error["message"], error
    await still_sound(rig)


addresses = st.one_of(
    st.sampled_from(GOOD_ADDRESSES).map(lambda a: (a, True)),
    st.sampled_from(NOT_HOST_PORT).map(lambda a: (a, False)),
    st.builds(lambda a: (a, False), st.just("own")),
    st.text(max_size=30).map(lambda a: (a, None)),
)
counts = st.integers(0, 4) | st.sampled_from([MAX_SLOTS, MAX_SLOTS + 1, 10**12, 2**63 - 1])
json_junk = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3)
    ),
    max_leaves=6,
)


@st.composite
def status_lines(draw: st.DrawFn, own: list[str]) -> tuple[bytes, bool | None]:
    """A status line and whether a balancer must take it (None: the test does not know)."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80)) + b"\n", None
    address, good = draw(addresses)
    if address == "own":
        address = draw(st.sampled_from(own))
    fields: dict[str, Any] = {"external_llamacpp_addr": address}
    idle, processing, total = draw(counts), draw(counts), draw(st.none() | counts)
    fields.update(slots_idle=idle, slots_processing=processing)
    if total is not None:
        fields["slots_total"] = total
    too_many = idle + processing > MAX_SLOTS or (total or 0) > MAX_SLOTS
    if too_many or (total and idle + processing > total):
        good = False
    extra = draw(
        st.dictionaries(
            st.sampled_from(["agent_name", "error", "model", "x"]), json_junk, max_size=2
        )
    )
    for key, value in extra.items():
        fields[key] = value
        if key != "x" and not (value is None or isinstance(value, str)):
            good = False
    text = json.dumps(fields, ensure_ascii=draw(st.booleans()))
    return text.encode("utf-8", "surrogatepass") + b"\n", good


@hostile(60)
@given(data=st.data())
def test_any_status_line_is_taken_or_refused(rig: Rig, data: st.DataObject) -> None:
    own = own_spellings(rig.fleet.proxy_port) + own_spellings(rig.fleet.management_port)
    line, good = data.draw(status_lines(own))
    agent_id = data.draw(st.from_regex(r"\A[A-Za-z0-9_.-]{1,40}\Z"))

    async def case() -> None:
        seen = await exchange(rig.fleet.management_port, status_post(agent_id, line))
        answer = seen.first
        assert answer.status in (200, 400), answer.body
        if good is True:
            assert answer.status == 200, answer.body
        elif good is False:
            refused(seen, 400)
        await still_sound(rig)

    asyncio.run(case())


async def test_a_flood_of_malformed_requests_logs_a_line_or_two_and_no_traceback(rig: Rig) -> None:
    before = rig.balancer.output.count("refused a request from")
    for _ in range(100):
        seen = await exchange(rig.fleet.proxy_port, b"GET /v1/models\n\n", close_wait=0.2)
        assert seen.first.status == 400
        seen = await exchange(
            rig.fleet.management_port, b"\x16\x03\x01garbage\r\n\r\n", close_wait=0.2
        )
        assert seen.first.status == 400
    for _ in range(50):
        seen = await exchange(
            rig.fleet.management_port, status_post("flood", b"{}\n", authorization=b"Bearer no")
        )
        assert seen.first.status == 401
    output = rig.balancer.output
    logged = output.count("refused a request from") - before
    assert logged <= 4, f"{logged} lines for 200 malformed requests"
    assert "Traceback" not in output
    assert " ERROR " not in output
    await still_sound(rig)


async def test_a_status_stream_that_never_says_anything_is_closed(rig: Rig) -> None:
    opened = head(
        b"POST /api/v1/agent_status_update/silent HTTP/1.1",
        b"Host: x",
        b"Authorization: Bearer " + TOKEN.encode(),
        b"Transfer-Encoding: chunked",
    )
    for after_head in (b"", b"1\r\n\n\r\n" * 3):  # nothing, or blank lines only
        # The rest of the body is drained for LINGER before the close.
        seen = await exchange(
            rig.fleet.management_port,
            opened + after_head,
            wait=BODY_TIMEOUT_MS / 1000 + 3,
            close_wait=LINGER + 2,
        )
        error = refused(seen, 408)
        assert "--request-body-timeout" in error["message"]
    await still_sound(rig)
