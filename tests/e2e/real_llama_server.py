"""A real llama-server for end-to-end tests: where its binary and model are, and how to run one.

The paths come from `scripts/llamacpp_cache.py`, the module the build scripts write with, so
the tests look exactly where `scripts/setup.sh` put things.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from tests.processes import LoopbackServer, Process, free_port

REPO = Path(__file__).resolve().parents[2]


def _load_llamacpp_cache() -> ModuleType:
    # scripts/ is not a package; load the one module the scripts and the tests share.
    spec = importlib.util.spec_from_file_location(
        "llamacpp_cache", REPO / "scripts" / "llamacpp_cache.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


llamacpp_cache = _load_llamacpp_cache()


@dataclass(frozen=True)
class LlamaCppArtifacts:
    """The llama-server binary and the model it serves."""

    server: Path
    model: Path

    def missing(self) -> list[str]:
        """What is not there yet, as phrases for a message; empty when both are."""
        problems = []
        if not (self.server.is_file() and self.server.stat().st_mode & 0o111):
            problems.append(f"llama-server {self.server}")
        if not self.model.is_file():
            problems.append(f"model {self.model}")
        return problems


def configured_artifacts() -> LlamaCppArtifacts:
    """`ROWER_LLAMA_SERVER` / `ROWER_TINY_MODEL`, else the cached paths (may not exist)."""
    return LlamaCppArtifacts(
        server=llamacpp_cache.configured_llama_server(),
        model=llamacpp_cache.configured_tiny_model(),
    )


@dataclass(frozen=True)
class LlamaServer(LoopbackServer):
    """A running llama-server on loopback."""

    process: Process
    port: int
    slots: int
    ctx: int
    startup_seconds: float


LlamaServerFactory = Callable[..., LlamaServer]


def start_llama_server(
    artifacts: LlamaCppArtifacts, *, slots: int, ctx: int, extra_args: Sequence[str] = ()
) -> LlamaServer:
    """Start llama-server with `slots` slots of `ctx` tokens each; return once `/health` is 200.

    It computes on one thread: llama.cpp's worker threads spin-wait for each other, and on a
    machine busy with other tests that made generation 12 times slower (19 instead of 230
    tokens/s) than one thread. `extra_args` come last, so `-t N` there wins. On failure the
    process is stopped and the error carries its output.
    """
    port = free_port()
    began = time.monotonic()
    process = Process(
        [
            str(artifacts.server),
            "-m", str(artifacts.model),
            "--host", "127.0.0.1",
            "--port", str(port),
            "-np", str(slots),
            "-c", str(ctx * slots),  # -c is the total context, split over the slots
            "--threads", "1",
            *extra_args,
        ]
    )  # fmt: skip
    try:
        process.wait_http(f"http://127.0.0.1:{port}/health", timeout=30)
    except BaseException:
        process.close()
        raise
    return LlamaServer(process, port, slots, ctx, time.monotonic() - began)


@dataclass(frozen=True)
class LlamaRouter(LoopbackServer):
    """A running router-mode llama-server (`--models-dir`): one child server per loaded model."""

    process: Process
    port: int
    models: tuple[str, ...]
    """The model names it serves: the file stems in its models directory."""
    slots: int
    ctx: int

    def close(self) -> None:
        """Stop the router, and any child it left (they share its process group)."""
        self.process.close()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.popen.pid, signal.SIGKILL)


def start_llama_router(
    artifacts: LlamaCppArtifacts,
    models_dir: Path,
    *,
    models: Sequence[str] = ("tiny-a", "tiny-b"),
    models_max: int = 2,
    slots: int = 2,
    ctx: int = 4096,
    extra_args: Sequence[str] = (),
) -> LlamaRouter:
    """Start llama-server in router mode serving the tiny model under each name of `models`.

    `models_dir` gets one link `NAME.gguf` to the tiny model per name (the router names a
    model by its file stem). Each child gets `slots` slots of `ctx` tokens and one thread, as
    `start_llama_server`'s servers. Returns once `/health` is 200, which a router answers at
    once: no model is loaded yet.
    """
    models_dir.mkdir(parents=True, exist_ok=True)
    for name in models:
        link = models_dir / f"{name}.gguf"
        if not link.exists():
            link.symlink_to(artifacts.model.resolve())
    port = free_port()
    process = Process(
        [
            str(artifacts.server),
            "--models-dir", str(models_dir),
            "--models-max", str(models_max),
            "--host", "127.0.0.1",
            "--port", str(port),
            "-np", str(slots),
            "-c", str(ctx * slots),
            "--threads", "1",
            *extra_args,
        ]
    )  # fmt: skip
    router = LlamaRouter(process, port, tuple(models), slots, ctx)
    try:
        process.wait_http(f"{router.url}/health", timeout=30)
    except BaseException:
        router.close()
        raise
    return router
