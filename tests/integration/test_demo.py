"""The README's demo command works: a fleet comes up and a request goes through it."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def six_free_ports() -> int:
    """A base port such that it and the five above it are free right now."""
    for base in range(21000, 30000, 7):
        try:
            sockets = []
            for port in range(base, base + 6):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError("no six free ports in a row")


def test_demo_fleet_serves_a_request() -> None:
    demo = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "demo.py"), "--once",
         "--base-port", str(six_free_ports())],
        capture_output=True,
        text=True,
        timeout=90,
    )  # fmt: skip
    assert demo.returncode == 0, demo.stdout + demo.stderr
    assert "Fleet up: balancer, 2 agents, 2 rower sim servers" in demo.stdout
    assert "A chat completion through the balancer:" in demo.stdout
    streamed = demo.stdout.split("token by token:")[1].splitlines()[1]
    assert len(streamed.split()) >= 5
