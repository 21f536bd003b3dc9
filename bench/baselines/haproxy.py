"""HAProxy as a baseline: `leastconn` with `maxconn` = slots per server and its queue.

This is the strongest slot-aware setup a generic balancer can do without agents: HAProxy never
sends a server more requests than it has slots, and queues the rest centrally, FIFO.

With `hash_header`, HAProxy is instead the sticky anchor of the cache-affinity benchmark: a
hash of a header the client sends (a session id) picks the server, whatever its load, and
nothing caps a server's connections: the trivial way to keep a conversation on the server that
holds its prompt cache (`balance hdr(...)` as written in HAProxy's manual; llama-server queues
what it cannot run at once).
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


def config(
    directory: Path,
    port: int,
    upstreams: Sequence[tuple[str, int]],
    *,
    hash_header: str | None = None,
) -> Path:
    """Write haproxy.cfg (one thread, like Rower) into `directory`; upstreams are (addr, slots)."""
    directory.mkdir(parents=True, exist_ok=True)
    servers = "\n".join(
        f"    server s{index} {address}" + ("" if hash_header else f" maxconn {slots}")
        for index, (address, slots) in enumerate(upstreams)
    )
    balance = "balance leastconn"
    if hash_header:
        balance = f"balance hdr({hash_header})"
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
    {balance}
{servers}
"""
    path = directory / ("haproxy-hash.cfg" if hash_header else "haproxy.cfg")
    path.write_text(text)
    return path


def argv(conf: Path) -> list[str]:
    """Command line that runs HAProxy in the foreground with `conf`."""
    return [binary() or "haproxy", "-f", str(conf), "-db"]
