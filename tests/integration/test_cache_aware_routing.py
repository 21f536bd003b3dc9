"""Cache-aware routing through a real balancer, real agents and `rower sim` servers.

Each sim keeps its slots' prompt caches and a host-RAM prompt cache (`--cache-ram-tokens`), as
llama-server does, and reports `timings.cache_n`. Which server answered a request is read from
the sims' own request counters (requests here are sent one at a time, so exactly one counter
moves), never from the balancer: the test checks the balancer against the servers' truth.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import urllib.request
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from tests.integration.fleet import Fleet, Sim, get_json, until

pytestmark = pytest.mark.timeout(120)

SIM_FLAGS = (
    "--cache-ram-tokens",
    "100000",
    "--prefill-tokens-per-second",
    "50000",
    "--ctx-size",
    "8192",
)
WORDS = [
    "amber",
    "basalt",
    "cobalt",
    "dune",
    "ember",
    "fjord",
    "granite",
    "harbor",
    "island",
    "jasper",
    "kelp",
    "lagoon",
    "meadow",
    "nectar",
    "obsidian",
    "prairie",
    "quartz",
    "river",
    "sierra",
    "tundra",
    "umber",
    "valley",
    "willow",
    "xenon",
    "yarrow",
    "zephyr",
]
REPLY_TOKENS = 8


def text(seed: int, chars: int) -> str:
    """About `chars` characters of words, the same for the same seed."""
    pick = random.Random(seed).choice
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(pick(WORDS))
    return " ".join(words)


@dataclass
class Conversation:
    """A multi-turn conversation over `/completion` or `/v1/chat/completions`."""

    path: str
    system: str
    first: str
    seed: int
    turns: int = 0
    messages: list[dict[str, str]] = field(default_factory=list)
    prompt: str = ""

    def __post_init__(self) -> None:
        if self.path == "/completion":
            self.prompt = f"{self.system}\nUser: {self.first}\nAssistant:"
        else:
            if self.system:
                self.messages.append({"role": "system", "content": self.system})
            self.messages.append({"role": "user", "content": self.first})

    def body(self, n_predict: int) -> dict[str, Any]:
        if self.path == "/completion":
            return {"prompt": self.prompt, "n_predict": n_predict}
        return {"messages": self.messages, "max_tokens": n_predict}

    async def turn(
        self, session: aiohttp.ClientSession, proxy: str, *, n_predict: int = REPLY_TOKENS
    ) -> dict[str, int]:
        """Send the next turn; returns its `timings`, and adds the reply and a new question."""
        async with session.post(proxy + self.path, json=self.body(n_predict)) as answer:
            body = await answer.json()
            assert answer.status == 200, body
        self.turns += 1
        question = text(self.seed * 1000 + self.turns, 120)
        if self.path == "/completion":
            self.prompt += f"{body['content']}\nUser: {question}\nAssistant:"
        else:
            reply = body["choices"][0]["message"]["content"]
            self.messages += [
                {"role": "assistant", "content": reply},
                {"role": "user", "content": question},
            ]
        return dict(body["timings"])


def reuse(timings: dict[str, int]) -> float:
    """Share of the prompt the server found in its caches."""
    return timings["cache_n"] / (timings["cache_n"] + timings["prompt_n"])


def totals(sims: Sequence[Sim]) -> list[int]:
    return [sim.counters()["requests_total"] for sim in sims]


async def served_by(
    sims: Sequence[Sim], conversation: Conversation, session: aiohttp.ClientSession, proxy: str
) -> tuple[int, dict[str, int]]:
    """Which sim (index) answered the conversation's next turn, and its timings."""
    before = totals(sims)
    timings = await conversation.turn(session, proxy)
    moved = [i for i, (a, b) in enumerate(zip(before, totals(sims), strict=True)) if b != a]
    assert len(moved) == 1, (before, totals(sims))
    return moved[0], timings


def start(fleet: Fleet, servers: int, *, routing: str, slots: int = 2) -> list[Sim]:
    fleet.balancer("--routing", routing)
    sims = [fleet.sim(slots=slots, speed=400, flags=SIM_FLAGS) for _ in range(servers)]
    for sim in sims:
        fleet.agent(sim)
    fleet.wait_agents(servers)
    return sims


def conversations(path: str, count: int, *, system: str = "") -> list[Conversation]:
    # ~3,000 private characters each: several 512-byte blocks, ~750 sim tokens.
    return [Conversation(path, system, text(seed, 3000), seed) for seed in range(1, count + 1)]


@pytest.mark.parametrize("path", ["/completion", "/v1/chat/completions"])
async def test_each_turn_returns_to_the_server_that_served_the_previous_one(
    fleet: Fleet, path: str
) -> None:
    sims = start(fleet, 3, routing="cache-aware")
    chats = conversations(path, 4)
    homes: dict[int, int] = {}
    async with aiohttp.ClientSession() as session:
        for turn in range(3):
            for chat in chats:
                server, timings = await served_by(sims, chat, session, fleet.proxy)
                if turn == 0:
                    homes[chat.seed] = server
                    continue
                assert server == homes[chat.seed], f"turn {turn} of conversation {chat.seed}"
                assert reuse(timings) >= 0.9, timings
    assert all(sim.counters()["requests_deferred"] == 0 for sim in sims)


async def test_least_busy_routing_spreads_turns_as_before(fleet: Fleet) -> None:
    sims = start(fleet, 3, routing="least-busy")
    chats = conversations("/completion", 4)
    visited: dict[int, set[int]] = {chat.seed: set() for chat in chats}
    async with aiohttp.ClientSession() as session:
        for _ in range(3):
            for chat in chats:
                server, _ = await served_by(sims, chat, session, fleet.proxy)
                visited[chat.seed].add(server)
    # One request at a time on idle servers: the least recently used one takes it, whatever
    # conversation it belongs to.
    assert all(count >= 2 for count in totals(sims)), totals(sims)
    assert any(len(servers) > 1 for servers in visited.values()), visited


async def test_conversation_spills_when_its_server_is_full_and_stays_where_it_went(
    fleet: Fleet,
) -> None:
    sims = start(fleet, 2, routing="cache-aware")
    (chat,) = conversations("/v1/chat/completions", 1)
    async with aiohttp.ClientSession() as session:
        home, _ = await served_by(sims, chat, session, fleet.proxy)
        other = 1 - home
        # Every slot of its server busy with generations far longer than the test.
        async with filling(sims[home], session):
            await until(
                lambda: free_slots(fleet, sims[home]) == 0, what="the balancer sees home full"
            )
            started = time.monotonic()
            server, timings = await served_by(sims, chat, session, fleet.proxy)
            waited = time.monotonic() - started
        assert server == other
        # The policy may wait for a slot that frees soon; these free in minutes, not seconds.
        assert waited < 2.0, waited
        # The next turn's longest prefix is now on the other server: it goes there.
        server, timings = await served_by(sims, chat, session, fleet.proxy)
    assert server == other
    assert reuse(timings) >= 0.9, timings
    assert [sim.counters()["requests_deferred"] for sim in sims] == [0, 0]


async def test_conversations_sharing_a_long_system_prompt_do_not_all_go_to_one_server(
    fleet: Fleet,
) -> None:
    # Measured on llama-server (and the sim agrees): two conversations sharing a long system
    # prompt on one 2-slot server evict each other, since llama-server gives a prompt the idle
    # slot with the longest common prefix: 53 % reuse on later turns, against 93 % apart.
    sims = start(fleet, 2, routing="cache-aware")
    first, second = conversations("/v1/chat/completions", 2, system=text(0, 4000))
    async with aiohttp.ClientSession() as session:
        running = asyncio.create_task(first.turn(session, fleet.proxy, n_predict=400))
        await until(lambda: sum(sim.slots_processing() for sim in sims) == 1, what="first busy")
        first_home = next(i for i, sim in enumerate(sims) if sim.slots_processing())
        # A new conversation, sharing only the system prompt, while the first one generates.
        second_home, _ = await served_by(sims, second, session, fleet.proxy)
        await running
        assert second_home != first_home
        for _ in range(2):
            for chat, home in ((first, first_home), (second, second_home)):
                server, timings = await served_by(sims, chat, session, fleet.proxy)
                assert server == home, chat.seed
                assert reuse(timings) >= 0.9, timings


def free_slots(fleet: Fleet, sim: Sim) -> int:
    return int(fleet.agents_by_addr()[sim.addr]["slots_free"])


@contextlib.asynccontextmanager
async def filling(sim: Sim, session: aiohttp.ClientSession) -> AsyncIterator[None]:
    """Every slot of `sim` busy with a long streamed generation (sent past the balancer)."""
    slots = len(await asyncio.to_thread(get_json, sim.url + "/slots"))
    body = {"prompt": "occupied", "n_predict": 100_000, "stream": True}
    streams = [await session.post(sim.url + "/completion", json=body) for _ in range(slots)]
    try:
        for stream in streams:
            assert stream.status == 200
            await stream.content.readuntil(b"\n\n")
        yield
    finally:
        for stream in streams:
            stream.close()
        await until(lambda: sim.slots_processing() == 0, what="filler streams ended")


def peer_connected(fleet: Fleet) -> bool:
    """Whether `fleet`'s balancer follows its peer's placements now (its metrics say)."""
    with urllib.request.urlopen(fleet.management + "/metrics", timeout=5.0) as answer:
        text = answer.read().decode()
    return any(
        line.startswith("rower_peer_connected{") and line.endswith(" 1.0")
        for line in text.splitlines()
    )


async def test_two_balancers_that_follow_each_other_send_a_conversation_to_one_server(
    fleet: Fleet,
) -> None:
    # A conversation starts on its hash home H through balancer A, spills to the other server
    # O while H is full, and its next turn comes through balancer B once H is free again.
    # Without A's placements B has never seen the conversation: a new one, it would go to its
    # hash home H (where its prefix is a spill old); following A, it goes to O.
    other = Fleet()
    try:
        fleet.balancer(
            "--routing", "cache-aware", "--metrics-endpoint-enable",
            "--peer-balancer-addr", other.management_addr,
        )  # fmt: skip
        other.balancer(
            "--routing", "cache-aware", "--metrics-endpoint-enable",
            "--peer-balancer-addr", fleet.management_addr,
        )  # fmt: skip
        sims = [fleet.sim(slots=2, speed=400, flags=SIM_FLAGS) for _ in range(2)]
        for sim in sims:
            fleet.agent(sim, flags=("--management-addr", other.management_addr))
        fleet.wait_agents(2)
        other.wait_agents(2)
        await until(lambda: peer_connected(fleet) and peer_connected(other), what="peers follow")
        (chat,) = conversations("/v1/chat/completions", 1)
        async with aiohttp.ClientSession() as session:
            home, _ = await served_by(sims, chat, session, fleet.proxy)
            spilled = 1 - home
            async with filling(sims[home], session):
                await until(lambda: free_slots(fleet, sims[home]) == 0, what="A sees the home full")
                server, _ = await served_by(sims, chat, session, fleet.proxy)
                assert server == spilled
            await until(
                lambda: free_slots(other, sims[home]) == 2, what="B sees the home free again"
            )
            server, timings = await served_by(sims, chat, session, other.proxy)
            assert server == spilled, "B did not follow A's placement"
            assert reuse(timings) >= 0.9, timings
            server, timings = await served_by(sims, chat, session, fleet.proxy)
            assert server == spilled, "A did not follow B's placement"
            assert reuse(timings) >= 0.9, timings
    finally:
        other.close()
