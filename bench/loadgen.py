"""Load generator, run as its own process so its CPU does not count against the proxy.

Open loop (`open`): requests start at the times a schedule says (Poisson arrivals chosen by the
scenario), whatever happened to earlier ones, as real users do; each one streams and records its
time to first token (TTFT) and end to end (E2E) from the moment it was due.
Closed loop (`closed`): C workers each send N/C requests back to back; records time to first
byte (TTFB) and E2E. Conversations (`conversations`): multi-turn chats, each its own closed
loop: send a turn, read the answer, think, send the next turn with the answer and a new user
message appended; records what the client saw and llama-server's own `timings` (`cache_n`,
`prompt_n`, `prompt_ms`) of every answer. All write one JSON file of per-request records and
stop by themselves: every request has a deadline.

    python -m bench.loadgen open SCHEDULE.json OUT.json
    python -m bench.loadgen closed URL CONCURRENCY COUNT OUT.json [--body JSON] [--deadline S]
    python -m bench.loadgen conversations SPEC.json OUT.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

TOKEN_EVENT = b'"stop":false'
"""Every streamed token event of llama-server's (and the sim's) `/completion` carries this."""


@dataclass
class Record:
    """One request as the client saw it; times in seconds from the start of the run."""

    due: float
    status: int = 0
    ttft: float | None = None
    e2e: float | None = None
    tokens: int = 0
    reads: int = 0
    """Reads that carried tokens (several tokens per read: the front wrote them together)."""
    longest_gap: float = 0.0
    """The longest time between two reads that carried tokens."""
    error: str | None = None


async def stream_one(
    session: aiohttp.ClientSession,
    url: str,
    body: bytes,
    record: Record,
    t0: float,
    deadline: float,
) -> None:
    """Send one request and read its stream to the end, filling `record`."""
    due = t0 + record.due
    tail = b""
    last_read = 0.0
    try:
        async with asyncio.timeout(deadline), session.post(url, data=body) as response:
            record.status = response.status
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                if record.ttft is None:
                    record.ttft = now - due
                buffer = tail + chunk
                tokens = buffer.count(TOKEN_EVENT)
                if tokens:
                    if record.reads:
                        record.longest_gap = max(record.longest_gap, now - last_read)
                    record.tokens += tokens
                    record.reads += 1
                    last_read = now
                tail = buffer[-(len(TOKEN_EVENT) - 1) :]
            record.e2e = time.perf_counter() - due
            if response.status != 200:
                record.error = f"HTTP {response.status}"
    except TimeoutError:
        record.error = "deadline"
    except (aiohttp.ClientError, OSError) as error:
        record.error = type(error).__name__


def session(limit: int = 0, *, fresh: bool = False) -> aiohttp.ClientSession:
    """A client; `fresh`: a new connection for every request (as many distinct users)."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit, force_close=fresh),
        timeout=aiohttp.ClientTimeout(total=None),
        headers={"Content-Type": "application/json"},
    )


async def open_loop(schedule: dict[str, Any]) -> list[Record]:
    """Start each request of the schedule at its time; wait for all of them."""
    url = schedule["url"]
    deadline = float(schedule.get("deadline", 120.0))
    tasks: list[asyncio.Task[None]] = []
    records: list[Record] = []
    async with session(fresh=bool(schedule.get("fresh_connections"))) as client:
        t0 = time.perf_counter() + 0.2
        for item in schedule["requests"]:
            record = Record(due=item["at"])
            records.append(record)
            body = json.dumps(item["body"]).encode()
            delay = t0 + record.due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(stream_one(client, url, body, record, t0, deadline)))
        await asyncio.gather(*tasks)
    return records


async def closed_loop(
    url: str, concurrency: int, count: int, body: bytes, deadline: float
) -> list[Record]:
    """`concurrency` workers send `count` requests in all, each as soon as the last ended."""
    records: list[Record] = []
    remaining = [count]

    async def worker(client: aiohttp.ClientSession) -> None:
        while remaining[0] > 0:
            remaining[0] -= 1
            record = Record(due=0.0)
            t0 = time.perf_counter()
            await stream_one(client, url, body, record, t0, deadline)
            record.due = t0
            records.append(record)

    async with session(limit=concurrency) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return records


# Conversations.


@dataclass
class Turn(Record):
    """One turn of a conversation, with what llama-server's answer says it computed."""

    conversation: int = 0
    turn: int = 0
    front: int = 0
    prompt_n: int | None = None
    cache_n: int | None = None
    prompt_ms: float | None = None
    predicted_n: int | None = None
    slot: int | None = None
    request_id: str = ""


def conversation_body(
    api: str, system: str, exchanges: Sequence[tuple[str, str]], user: str, spec: dict[str, Any]
) -> dict[str, Any]:
    """The request of the next turn: the history so far (user, answer pairs) and `user`."""
    stream = bool(spec["stream"])
    if api == "chat":
        messages = [{"role": "system", "content": system}] if system else []
        for asked, answered in exchanges:
            messages += [
                {"role": "user", "content": asked},
                {"role": "assistant", "content": answered},
            ]
        messages.append({"role": "user", "content": user})
        return {
            "messages": messages,
            "max_tokens": spec["n_predict"],
            "ignore_eos": True,
            "stream": stream,
        }
    history = "".join(f"\nUser: {asked}\nAssistant:{answered}" for asked, answered in exchanges)
    return {
        "prompt": f"{system}{history}\nUser: {user}\nAssistant:",
        "n_predict": spec["n_predict"],
        "ignore_eos": True,
        "stream": stream,
    }


def _answer_text(event: dict[str, Any]) -> str:
    """The generated text in an answer or a streamed event, of either API."""
    if "choices" in event:
        texts = []
        for choice in event["choices"]:
            part = choice.get("delta") or choice.get("message") or {}
            texts.append(part.get("content") or choice.get("text") or "")
        return "".join(texts)
    return str(event.get("content") or "")


async def converse_one(
    client: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    record: Turn,
    deadline: float,
) -> str | None:
    """Send one turn; fill `record` from the answer; return the answer's text (None: failed)."""
    started = time.perf_counter()
    text: list[str] = []
    timings: dict[str, Any] = {}
    try:
        async with (
            asyncio.timeout(deadline),
            client.post(url, data=json.dumps(body).encode(), headers=headers) as response,
        ):
            record.status = response.status
            if response.status != 200:
                await response.read()
                record.error = f"HTTP {response.status}"
            elif body["stream"]:
                async for line in response.content:
                    if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                        continue
                    event = json.loads(line[6:])
                    piece = _answer_text(event)
                    if piece and record.ttft is None:
                        record.ttft = time.perf_counter() - started
                    text.append(piece)
                    record.tokens += bool(piece)
                    timings = event.get("timings") or timings
                    record.slot = event.get("id_slot", record.slot)
            else:
                answer = await response.json(content_type=None)
                text.append(_answer_text(answer))
                timings = answer.get("timings") or {}
                record.tokens = int(timings.get("predicted_n", 0))
                record.slot = answer.get("id_slot")
            record.e2e = time.perf_counter() - started
    except TimeoutError:
        record.error = "deadline"
    except (aiohttp.ClientError, OSError, ValueError) as error:
        record.error = type(error).__name__
    if record.error is None and not timings:
        record.error = "no timings in the answer"
    if record.error is not None:
        return None
    record.prompt_n = int(timings["prompt_n"])
    record.cache_n = int(timings["cache_n"])
    record.prompt_ms = float(timings["prompt_ms"])
    record.predicted_n = int(timings["predicted_n"])
    return "".join(text)


async def conversations(spec: dict[str, Any]) -> list[Turn]:
    """Run every conversation of `spec` to its last turn, each as its own closed loop.

    A turn that fails is sent again (with the same history) after the think time, as a user
    would retry; it still uses up one of the conversation's turns. Turns alternate over
    `spec["urls"]` (two balancers in front of the same servers). With `session_header`, each
    request names its conversation in that header (for a front that hashes it).

    `pin_slot` (one llama-server, `/completion`, the id_slot experiment): "last" sends every
    turn to the slot (`id_slot`) that answered the conversation's previous turn; "held" does
    so only while no other conversation's answer has come from that slot since.
    """
    urls: list[str] = spec["urls"]
    deadline = float(spec.get("deadline", 120.0))
    header: str | None = spec.get("session_header")
    pin: str | None = spec.get("pin_slot")
    last_slot: dict[int, int] = {}
    holder: dict[int, int] = {}
    records: list[Turn] = []
    # A new connection per request, as clients of an inference API mostly do between turns.
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    t0 = time.perf_counter()

    async def converse(client: aiohttp.ClientSession, index: int, chat: dict[str, Any]) -> None:
        headers = {"Content-Type": "application/json"}
        if header:
            headers[header] = f"conversation-{chat['id']}"
        exchanges: list[tuple[str, str]] = []
        await asyncio.sleep(max(0.0, t0 + chat["start"] - time.perf_counter()))
        for turn, think in enumerate(chat["think"]):
            user = chat["users"][len(exchanges)]
            front = (index + turn) % len(urls)
            body = conversation_body(spec["api"], chat["system"], exchanges, user, spec)
            slot = last_slot.get(index)
            if slot is not None and (pin == "last" or (pin == "held" and holder[slot] == index)):
                body["id_slot"] = slot
            record = Turn(due=time.perf_counter() - t0, conversation=index, turn=turn, front=front)
            # Each turn names itself, so a front's access log says where it went.
            record.request_id = f"{chat['id']}-{turn}"
            records.append(record)
            answer = await converse_one(
                client,
                urls[front] + spec["path"],
                body,
                {**headers, "X-Request-Id": record.request_id},
                record,
                deadline,
            )
            if answer is not None:
                exchanges.append((user, answer))
            if record.slot is not None:
                last_slot[index] = record.slot
                holder[record.slot] = index
            if turn + 1 < len(chat["think"]):
                await asyncio.sleep(think)

    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=None)
    ) as client:
        await asyncio.gather(
            *(converse(client, index, chat) for index, chat in enumerate(spec["conversations"]))
        )
    return records


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="mode", required=True)
    open_parser = sub.add_parser("open")
    open_parser.add_argument("schedule")
    open_parser.add_argument("out")
    closed = sub.add_parser("closed")
    closed.add_argument("url")
    closed.add_argument("concurrency", type=int)
    closed.add_argument("count", type=int)
    closed.add_argument("out")
    closed.add_argument("--body", default='{"prompt": "hi", "n_predict": 1, "stream": true}')
    closed.add_argument("--deadline", type=float, default=30.0)
    talks = sub.add_parser("conversations")
    talks.add_argument("spec")
    talks.add_argument("out")
    args = parser.parse_args()
    import uvloop

    started = time.perf_counter()
    records: Sequence[Record]
    if args.mode == "open":
        with open(args.schedule) as file:
            schedule = json.load(file)
        records = uvloop.run(open_loop(schedule))
    elif args.mode == "conversations":
        with open(args.spec) as file:
            records = uvloop.run(conversations(json.load(file)))
    else:
        records = uvloop.run(
            closed_loop(args.url, args.concurrency, args.count, args.body.encode(), args.deadline)
        )
    elapsed = time.perf_counter() - started
    with open(args.out, "w") as file:
        json.dump({"elapsed": elapsed, "records": [asdict(r) for r in records]}, file)


if __name__ == "__main__":
    main()
