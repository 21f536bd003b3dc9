"""Rower: a stateful, slot-aware load balancer for llama.cpp's llama-server."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rower")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
