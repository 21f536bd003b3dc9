"""A demo fleet on this machine: a balancer, two agents and two servers, then a request through it.

    .venv/bin/python scripts/demo.py            # two `rower sim` servers
    .venv/bin/python scripts/demo.py --real     # two real llama-servers with the tiny model

Everything listens on 127.0.0.1. The fleet keeps running until Ctrl-C (or, with `--once`, stops
after the demo requests: that is how the test suite runs this script).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def start(name: str, argv: list[str], processes: list[tuple[str, subprocess.Popen[bytes]]]) -> None:
    log = open(f"{os.environ.get('TMPDIR', '/tmp')}/rower-demo-{name}.log", "wb")  # noqa: SIM115
    processes.append((name, subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)))


def rower(*args: str) -> list[str]:
    return [sys.executable, "-m", "rower", *args]


def wait_until(what: str, check: object, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if callable(check) and check():
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise SystemExit(
        f"demo: {what} did not happen within {timeout:.0f} s; see /tmp/rower-demo-*.log"
    )


def get_json(url: str) -> object:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.load(answer)


def post(url: str, body: dict[str, object]) -> urllib.request.Request:
    return urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )


def llama_server_argv(port: int, slots: int) -> list[str]:
    binary = subprocess.check_output(
        [sys.executable, str(ROOT / "scripts" / "build_llama_server.py")], text=True
    ).strip()
    model = subprocess.check_output(
        [sys.executable, str(ROOT / "scripts" / "make_tiny_model.py")], text=True
    ).strip()
    return [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", str(slots),
            "-c", str(4096 * slots)]  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="real llama-servers, tiny model")
    parser.add_argument("--base-port", type=int, default=8060, help="first of 6 ports (8060)")
    parser.add_argument("--slots", type=int, default=2, help="slots per server (2)")
    parser.add_argument("--once", action="store_true", help="stop after the demo requests")
    args = parser.parse_args()

    management, proxy = args.base_port, args.base_port + 1
    servers = [args.base_port + 2, args.base_port + 3]
    processes: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        start(
            "balancer",
            rower("balancer", "--management-addr", f"127.0.0.1:{management}",
                  "--reverseproxy-addr", f"127.0.0.1:{proxy}",
                  "--management-dashboard-enable", "--metrics-endpoint-enable"),
            processes,
        )  # fmt: skip
        for index, port in enumerate(servers, 1):
            if args.real:
                server = llama_server_argv(port, args.slots)
            else:
                server = rower("sim", "--addr", f"127.0.0.1:{port}", "--slots", str(args.slots),
                               "--decode-tokens-per-second", "40")  # fmt: skip
            start(f"server-{index}", server, processes)
            start(
                f"agent-{index}",
                rower("agent", "--management-addr", f"127.0.0.1:{management}",
                      "--local-llamacpp-addr", f"127.0.0.1:{port}", "--name", f"server-{index}"),
                processes,
            )  # fmt: skip
        base = f"http://127.0.0.1:{management}"

        def fleet_ready() -> bool:
            agents = get_json(base + "/api/v1/agents")["agents"]  # type: ignore[index]
            return len(agents) == 2 and all(a["is_usable"] for a in agents)

        wait_until("both agents registering", fleet_ready)
        kind = "llama-servers" if args.real else "rower sim servers"
        print(f"Fleet up: balancer, 2 agents, 2 {kind} with {args.slots} slots each.")

        request = post(f"http://127.0.0.1:{proxy}/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello to Rower."}], "max_tokens": 12,
        })  # fmt: skip
        with urllib.request.urlopen(request, timeout=60) as answer:
            reply = json.load(answer)
        print("A chat completion through the balancer:")
        print("  " + json.dumps(reply["choices"][0]["message"]["content"])[:200])

        request = post(f"http://127.0.0.1:{proxy}/completion",
                       {"prompt": "Once upon a time", "n_predict": 12, "stream": True})  # fmt: skip
        print("A streamed completion, token by token:\n  ", end="")
        with urllib.request.urlopen(request, timeout=60) as answer:
            for line in answer:
                if line.startswith(b"data: "):
                    print(json.loads(line[6:]).get("content", ""), end="", flush=True)
        print()
        print(f"""
Try it:
  curl http://127.0.0.1:{proxy}/v1/chat/completions \\
    -d '{{"messages":[{{"role":"user","content":"hi"}}]}}'
  web dashboard:      http://127.0.0.1:{management}/dashboard
  terminal dashboard: .venv/bin/rower dashboard --management-addr 127.0.0.1:{management}
  agents (JSON):      curl http://127.0.0.1:{management}/api/v1/agents
  Prometheus:         curl http://127.0.0.1:{management}/metrics
Logs: /tmp/rower-demo-*.log""")
        if args.once:
            return 0
        print("Ctrl-C stops the fleet.")
        with contextlib.suppress(KeyboardInterrupt):
            signal.pause()
        return 0
    finally:
        for _, process in reversed(processes):
            process.terminate()
        for _, process in processes:
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    raise SystemExit(main())
