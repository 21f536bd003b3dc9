"""The real llama-servers of a benchmark: the cached binary and tiny model, started and read.

Servers are started through a scenario's `Procs` (so they end with it) on free loopback ports,
and read only through their own endpoints: `/health`, `/slots` and `/metrics`.
"""

from __future__ import annotations

import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import procs
from bench.scheduling import get_json

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class LlamaServer:
    """One started llama-server."""

    port: int
    pid: int
    slots: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}"


def tools(*, build: bool = True) -> tuple[Path, Path] | None:
    """The cached llama-server binary and tiny model, built if missing; None if impossible."""
    if not build:
        sys.path.insert(0, str(ROOT / "scripts"))
        import llamacpp_cache  # type: ignore[import-not-found]

        server, model = llamacpp_cache.llama_server_path(), llamacpp_cache.tiny_model_path()
        return (server, model) if server.is_file() and model.is_file() else None

    def last_line_of(script: str, timeout: float) -> Path:
        printed = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / script)],
            capture_output=True,
            text=True,
            check=True,
            timeout=timeout,
        ).stdout.strip()
        return Path(printed.splitlines()[-1])

    try:
        return last_line_of("build_llama_server.py", 1800), last_line_of("make_tiny_model.py", 600)
    except (subprocess.SubprocessError, OSError):
        return None


def start(
    runner: procs.Procs,
    server: Path,
    model: Path,
    *,
    count: int,
    slots: int,
    slot_context: int,
    extra: Sequence[str] = (),
) -> list[LlamaServer]:
    """Start `count` llama-servers of `slots` slots (one thread each); return once healthy."""
    started = []
    for _ in range(count):
        port = procs.free_port()
        argv = [str(server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port)]
        argv += ["-np", str(slots), "-c", str(slots * slot_context), "-t", "1", "--metrics"]
        proc = runner.start(f"llama-server-{port}", [*argv, *extra], port=port)
        started.append(LlamaServer(port, proc.pid, slots))
    for one in started:
        wait_healthy(one.port)
    return started


def wait_healthy(port: int, seconds: float = 60.0) -> None:
    """Block until llama-server on `port` answers `/health` with ok."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if get_json(f"http://127.0.0.1:{port}/health").get("status") == "ok":
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"llama-server on port {port} not healthy after {seconds} s")


def metrics(port: int) -> dict[str, float]:
    """Every sample of llama-server's Prometheus `/metrics` (it needs `--metrics`)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=3) as answer:
        text = answer.read().decode()
    return prometheus_samples(text)


def deferred(server: LlamaServer) -> float:
    """Requests waiting inside the server for a slot (its `requests_deferred` gauge)."""
    name = "llamacpp:requests_deferred"
    value = metrics(server.port).get(name)
    if value is None:
        # Not 0: a server without the metric (no --metrics, another build) has not shown "none".
        raise ValueError(f"no {name} in llama-server's /metrics")
    return value


def prometheus_samples(text: str) -> dict[str, float]:
    """`name{labels}` -> value of every sample in a Prometheus text exposition."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def activity(servers: Sequence[LlamaServer]) -> dict[str, float]:
    """Slots processing and requests deferred inside the servers, summed (for `wait_idle`)."""
    total = {"busy": 0.0, "waiting": 0.0}
    for one in servers:
        slots = get_json(f"{one.url}/slots")
        total["busy"] += sum(1 for slot in slots if slot["is_processing"])
        total["waiting"] += deferred(one)
    return total
