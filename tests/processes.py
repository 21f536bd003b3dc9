"""Real processes for integration and end-to-end tests: `rower ...` and `llama-server`.

Every process listens on loopback at a free port, is waited for until it answers, and is
killed (with its output kept for the failure message) when the test ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LoopbackServer:
    """A server listening on 127.0.0.1 at `port`: a `rower sim` or a real llama-server."""

    port: int

    @property
    def addr(self) -> str:
        """`host:port`, as Rower's flags take it."""
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        """Base URL without a trailing slash."""
        return f"http://{self.addr}"


class Process:
    """A child process whose stdout+stderr go to a temporary file, readable as `output`."""

    def __init__(self, argv: Sequence[str], *, env: dict[str, str] | None = None) -> None:
        self.argv = list(argv)
        # Kept open for the process's life and closed in close(), not in a with block.
        self._log = tempfile.NamedTemporaryFile(  # noqa: SIM115
            prefix="rower-test-", suffix=".log", delete=False
        )
        self.popen = subprocess.Popen(
            self.argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            start_new_session=True,
        )

    @property
    def output(self) -> str:
        """Everything the process wrote so far."""
        return Path(self._log.name).read_text(errors="replace")

    def signal(self, signum: int) -> None:
        """Send `signum` to the process."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signum)

    def stop(self, timeout: float = 5.0) -> int:
        """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
        if self.popen.poll() is None:
            self.signal(signal.SIGCONT)
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL now."""
        self.signal(signal.SIGKILL)
        self.popen.wait(5)

    def close(self) -> None:
        """Stop the process and delete its log."""
        self.stop()
        self._log.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._log.name)

    def wait_http(
        self, url: str, *, timeout: float = 15.0, statuses: Sequence[int] = (200,)
    ) -> None:
        """Wait until `url` answers one of `statuses`; fail with the process output if not."""
        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise AssertionError(f"{self.argv} exited {self.popen.returncode}:\n{self.output}")
            try:
                with urllib.request.urlopen(url, timeout=1) as answer:
                    if answer.status in statuses:
                        return
                    last = f"status {answer.status}"
            except urllib.error.HTTPError as error:
                if error.code in statuses:
                    return
                last = f"status {error.code}"
            except OSError as error:
                last = str(error)
            time.sleep(0.05)
        raise AssertionError(f"{url} not ready after {timeout}s ({last}):\n{self.output}")


def rower(*args: str, env: dict[str, str] | None = None) -> Process:
    """Start `python -m rower ARGS...` with this interpreter."""
    return Process([sys.executable, "-m", "rower", *args], env=env)


@contextlib.contextmanager
def running(process: Process) -> Iterator[Process]:
    """Close `process` when the block ends, printing its output if the block failed."""
    try:
        yield process
    except BaseException:
        print(f"--- output of {' '.join(process.argv)} ---\n{process.output}")
        raise
    finally:
        process.close()
