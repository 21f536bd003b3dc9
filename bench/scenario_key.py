"""What the affinity key costs: reading a request into `RequestNeeds`, and the hash under it.

For a chat of 32,000 characters (a long multi-turn conversation), measures the whole
`read_needs` (JSON decode, conversation head, block chain) and, on the same head, the chain
with each candidate hash: xxh3-64 (the one used), chained crc32, and blake2b. Also what the
prefix memory costs: bytes per remembered conversation and microseconds per record. Medians
of interleaved repeats, in one process.
"""

from __future__ import annotations

import json
import random
import statistics
import time
import tracemalloc
import zlib
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path
from typing import Any

import xxhash

from rower.balancer.affinity import BLOCK_BYTES, chain, conversation_head
from rower.balancer.prefix_memory import PrefixMemory
from rower.balancer.request_needs import read_needs

WORDS = tuple(
    [
        "the",
        "of",
        "and",
        "to",
        "in",
        "is",
        "you",
        "that",
        "it",
        "he",
        "was",
        "for",
        "on",
        "are",
        "as",
        "with",
        "his",
        "they",
        "at",
        "be",
        "this",
    ]
)


def conversation(chars: int, seed: int = 1) -> bytes:
    """A chat request whose messages add up to about `chars` characters."""
    rng = random.Random(seed)
    messages: list[dict[str, str]] = [{"role": "system", "content": "You are helpful. " * 20}]
    total = len(messages[0]["content"])
    while total < chars:
        text = " ".join(rng.choice(WORDS) for _ in range(120))
        messages.append({"role": "user" if len(messages) % 2 else "assistant", "content": text})
        total += len(text)
    return json.dumps({"model": "m", "messages": messages, "stream": True}).encode()


def crc_chain(text: bytes) -> list[int]:
    out, previous = [], 0
    for start in range(0, len(text) - BLOCK_BYTES + 1, BLOCK_BYTES):
        previous = zlib.crc32(text[start : start + BLOCK_BYTES], previous)
        out.append(previous)
    return out


def blake_chain(text: bytes) -> list[bytes]:
    out, running = [], blake2b(digest_size=8)
    for start in range(0, len(text) - BLOCK_BYTES + 1, BLOCK_BYTES):
        running.update(text[start : start + BLOCK_BYTES])
        out.append(running.copy().digest())
    return out


def xxh_chain(text: bytes) -> list[int]:
    out, previous = [], 0
    for start in range(0, len(text) - BLOCK_BYTES + 1, BLOCK_BYTES):
        previous = xxhash.xxh3_64_intdigest(text[start : start + BLOCK_BYTES], previous)
        out.append(previous)
    return out


def microseconds(work: Callable[[], object], number: int) -> float:
    started = time.perf_counter()
    for _ in range(number):
        work()
    return (time.perf_counter() - started) / number * 1e6


def memory_per_conversation(count: int) -> tuple[float, float]:
    """Bytes and microseconds per conversation remembered (3 turns of 24 blocks each)."""
    memory = PrefixMemory(max_entries=count * 2)
    rng = random.Random(7)
    tracemalloc.start()
    started = time.perf_counter()
    for n in range(count):
        turn = tuple(rng.getrandbits(64) for _ in range(24))
        for extra in range(3):
            turn = (*turn, n * 10 + extra)
            memory.record(f"10.0.{n % 50}.1:8080", turn, capacity_blocks=10**9)
    seconds = time.perf_counter() - started
    used, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return used / count, seconds / (count * 3) * 1e6


def run(out: Path, *, quick: bool = False) -> dict[str, Any]:
    """Measure, write `key.json` into `out`, and return the results."""
    body = conversation(32_000)
    head = conversation_head("/v1/chat/completions", json.loads(body)).text
    cases: dict[str, Callable[[], object]] = {
        "read_needs (decode + head + xxh3 chain)": lambda: read_needs("/v1/chat/completions", body),
        "chain: xxh3-64": lambda: chain("m", head),
        "chain: xxh3-64, plain loop": lambda: xxh_chain(head),
        "chain: crc32": lambda: crc_chain(head),
        "chain: blake2b": lambda: blake_chain(head),
    }
    repeats, number = (3, 50) if quick else (9, 300)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(repeats):
        for name, work in cases.items():  # interleaved: each repeat runs every case once
            samples[name].append(microseconds(work, number))
    per_conversation, record_us = memory_per_conversation(10_000 if quick else 100_000)
    results = {
        "conversation_bytes": len(body),
        "head_bytes": len(head),
        "blocks": len(head) // BLOCK_BYTES,
        "microseconds_median": {name: statistics.median(v) for name, v in samples.items()},
        "prefix_memory_bytes_per_conversation": per_conversation,
        "prefix_memory_record_microseconds": record_us,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "key.json").write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    print(json.dumps(run(Path("bench/results")), indent=2))
