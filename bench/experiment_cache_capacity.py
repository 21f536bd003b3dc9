"""How many conversations does one llama-server of the affinity scenario keep? (issue 9)

One llama-server as in `scenario_affinity` (2 slots, `--cache-ram 6` MiB, the tiny model), N
conversations of ~3,000 tokens taking turns in a round (each turn appends the answer and a few
words), and the later turns that found their prompt cached (`cache_n` >= `prompt_n`): one
client sending one request at a time, then two clients at once (each with its own half of the
conversations, so both slots are busy). With llama-server's default `--cache-idle-slots`
(every idle slot copied into the host-RAM cache when a task starts) and with
`--no-cache-idle-slots`. Round-robin is least-recently-used eviction's worst case: one
conversation more than the server keeps, and every turn finds its prompt gone.

    python -m bench.experiment_cache_capacity [--rounds 6] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import urllib.request
from pathlib import Path
from typing import Any

from bench import llama_servers, procs
from bench.scenario_affinity import CACHE_RAM_MIB, SLOT_CONTEXT, SLOTS, words

CONVERSATIONS = (3, 4, 5, 6)
PRIVATE_TOKENS = 3000


def turns(port: int, conversations: list[str], rng: random.Random, rounds: int) -> list[bool]:
    """Each conversation's turns in a round, `rounds` times; whether each later turn found its
    prompt cached."""
    found = []
    for round_ in range(rounds):
        for index, prompt in enumerate(conversations):
            body = json.dumps({"prompt": prompt, "n_predict": 8, "cache_prompt": True}).encode()
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/completion",
                body,
                {"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                reply = json.loads(answer.read())
            conversations[index] = prompt + reply["content"] + " " + words(rng, 12)
            timings = reply["timings"]
            if round_ > 0:
                found.append(timings["cache_n"] >= timings["prompt_n"])
    return found


def run_clients(port: int, count: int, clients: int, rounds: int) -> list[bool]:
    """`count` conversations split between `clients` clients sending at once."""
    results: list[list[bool]] = [[] for _ in range(clients)]
    threads = []
    for client in range(clients):
        rng = random.Random(f"{count} {clients} {client}")
        mine = [words(rng, PRIVATE_TOKENS) for _ in range(client, count, clients)]

        def work(client: int = client, mine: list[str] = mine, rng: random.Random = rng) -> None:
            results[client] = turns(port, mine, rng, rounds)

        threads.append(threading.Thread(target=work))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return [found for result in results for found in result]


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.experiment_cache_capacity", description=__doc__
    )
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--out", type=Path, default=Path("/tmp/cache-capacity"))
    args = parser.parse_args()
    found_tools = llama_servers.tools(build=False)
    if found_tools is None:
        raise SystemExit("llama-server or the tiny model is missing (scripts/setup.sh)")
    server, model = found_tools
    rows: list[dict[str, Any]] = []
    for flags in ((), ("--no-cache-idle-slots",)):
        name = " ".join(flags) or "default"
        with procs.Procs(args.out / "logs" / (flags[0].strip("-") if flags else "default")) as run:
            (one,) = llama_servers.start(
                run,
                server,
                model,
                count=1,
                slots=SLOTS,
                slot_context=SLOT_CONTEXT,
                extra=("--cache-ram", str(CACHE_RAM_MIB), *flags),
            )
            for clients in (1, 2):
                for count in CONVERSATIONS:
                    found = run_clients(one.port, count, clients, args.rounds)
                    rows.append(
                        {
                            "flags": name,
                            "clients": clients,
                            "conversations": count,
                            "turns": len(found),
                            "cached": sum(found),
                        }
                    )
                    print(
                        f"{name:<22} {clients} client(s), {count} conversations: "
                        f"{sum(found)}/{len(found)} later turns found their prompt cached",
                        flush=True,
                    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "cache_capacity.json").write_text(json.dumps({"rows": rows}, indent=1))


if __name__ == "__main__":
    main()
