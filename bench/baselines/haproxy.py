"""HAProxy as a baseline: `leastconn` with `maxconn` = slots per server and its queue.

This is the strongest slot-aware setup a generic balancer can do without agents: HAProxy never
sends a server more requests than it has slots, and queues the rest centrally, FIFO.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path


def binary() -> str | None:
    """Path of the haproxy binary, or None when it is not installed."""
    return shutil.which("haproxy") or (
        "/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None
    )


def config(directory: Path, port: int, upstreams: Sequence[tuple[str, int]]) -> Path:
    """Write haproxy.cfg (one thread, like Rower) into `directory`; upstreams are (addr, slots)."""
    directory.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(
        f"    server s{index} {address} maxconn {slots}"
        for index, (address, slots) in enumerate(upstreams)
    )
    text = f"""
global
    maxconn 9000
    nbthread 1
defaults
    mode http
    timeout connect 5s
    timeout client 600s
    timeout server 600s
    timeout queue 600s
    option http-no-delay
frontend bench
    bind 127.0.0.1:{port}
    default_backend llama
backend llama
    balance leastconn
{servers}
"""
    path = directory / "haproxy.cfg"
    path.write_text(text)
    return path


def argv(conf: Path) -> list[str]:
    """Command line that runs HAProxy in the foreground with `conf`."""
    return [binary() or "haproxy", "-f", str(conf), "-db"]
