"""Child processes of a benchmark run: free ports, start, wait for a port, measure, stop.

Every process a scenario starts goes through `Procs`, so that leaving the `with` block ends all
of them (SIGTERM, then SIGKILL), whatever went wrong.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

PYTHON = sys.executable
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(
    port: int, *, seconds: float = 20.0, proc: subprocess.Popen[bytes] | None = None
) -> None:
    """Block until something accepts connections on 127.0.0.1:`port`."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args!r} exited with {proc.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {seconds} s")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (and its reaped children), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of a process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores together."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    total = sum(values[:8])
    return (total - idle) / CLOCK_TICKS, total / CLOCK_TICKS


def cpu_seconds_or_zero(pid: int) -> float:
    """`cpu_seconds`, or 0 for a process that is gone (its time is then counted elsewhere)."""
    try:
        return cpu_seconds(pid)
    except (OSError, IndexError):
        return 0.0


class CpuMeter:
    """CPU seconds that groups of processes, a load generator and the machine use from now on.

    A load generator runs to its end under `wait`, which reads its CPU time while it lives
    (once it is reaped its time is gone).
    """

    def __init__(self, groups: dict[str, Sequence[int]]) -> None:
        self.groups = {name: list(pids) for name, pids in groups.items()}
        self.before = {name: self._sum(pids) for name, pids in self.groups.items()}
        self.machine_before = machine_busy_seconds()
        self.started = time.monotonic()
        self.waited: dict[str, float] = {}

    @staticmethod
    def _sum(pids: Sequence[int]) -> float:
        return sum(cpu_seconds_or_zero(pid) for pid in pids)

    def wait(self, name: str, proc: subprocess.Popen[bytes], limit: float) -> bool:
        """Wait up to `limit` seconds for `proc` to end, recording its CPU; False if it did not."""
        deadline = time.monotonic() + limit
        self.waited.setdefault(name, 0.0)
        while proc.poll() is None:
            self.waited[name] = cpu_seconds_or_zero(proc.pid) or self.waited.get(name, 0.0)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        return True

    def read(self) -> dict[str, float]:
        """CPU seconds per group and waited process since the start; `wall` and `machine`
        (busy share of all cores) too."""
        used = {name: self._sum(pids) - self.before[name] for name, pids in self.groups.items()}
        used.update(self.waited)
        busy, total = machine_busy_seconds()
        busy_before, total_before = self.machine_before
        used["wall"] = time.monotonic() - self.started
        used["machine"] = (busy - busy_before) / max(1e-9, total - total_before)
        return used


def _raise_fd_limit() -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Procs:
    """The processes of one scenario; `stop_all` (or leaving the `with`) ends every one."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        log_dir.mkdir(parents=True, exist_ok=True)
        self.running: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        port: int | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start `argv`, its output to `<log_dir>/<name>.log`; wait for `port` if given."""
        log = (self.log_dir / f"{name}.log").open("ab")
        proc = subprocess.Popen(
            list(argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_raise_fd_limit,
            env={**os.environ, **(env or {})},
        )
        log.close()
        self.running.append(proc)
        if port is not None:
            try:
                wait_port(port, proc=proc)
            except BaseException:
                self.stop(proc)
                raise
        return proc

    def python(
        self, name: str, module: str, *args: str, port: int | None = None
    ) -> subprocess.Popen[bytes]:
        """Start `python -m module args...`."""
        return self.start(name, [PYTHON, "-m", module, *args], port=port)

    def stop(self, proc: subprocess.Popen[bytes], *, seconds: float = 5.0) -> None:
        """End one process: SIGTERM, and SIGKILL if it is still there after `seconds`."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(seconds)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc in self.running:
            self.running.remove(proc)

    def stop_all(self) -> None:
        """End every process still running, newest first."""
        for proc in reversed(list(self.running)):
            self.stop(proc)

    def __enter__(self) -> Procs:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()


def rower(*args: str) -> list[str]:
    """argv for the `rower` command of this interpreter's environment."""
    return [PYTHON, "-m", "rower", *args]
