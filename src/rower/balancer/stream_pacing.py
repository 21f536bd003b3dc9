"""Reading a token stream from llama-server in batches, without delaying its end.

llama-server writes one small chunk per token, and relaying each costs the balancer a `recv`
and a `send` (docs/performance.md): the system calls are most of its CPU per token. A paced
stream is read at most once per interval: after each read, the socket's `SO_RCVLOWAT` is raised
so that the kernel does not wake the event loop for the next few tokens, and at the `Pacer`'s
next tick it is lowered again, which wakes the loop at once if tokens are waiting (Linux
signals readiness when the mark is lowered). The tokens that came meanwhile are read and
written to the client together. One tick serves every stream, so their reads land in one turn
of the loop: with a timer per stream, the relay cost half as much again (docs/performance.md).

What is never delayed: the first token after a quiet interval (the mark is low then), and the
end of the answer: llama-server closes the connection after a stream (`upstream_client`), and a
closed connection wakes the loop whatever the mark. A stream that sends more than
`HOLD_BYTES` within an interval wakes it too.

`reads_can_wait()` checks once, on a pair of loopback sockets, that this kernel behaves so; where
it does not (another OS, an old kernel), streams are relayed read by read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import select
import socket
import sys

HOLD_BYTES = 64 * 1024
"""The mark while a stream's reads wait: more than an interval's tokens."""

_PROBE_SECONDS = 0.05


def hold(sock: socket.socket) -> None:
    """Let `sock`'s arriving bytes wait in the kernel (its end still wakes the loop)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, HOLD_BYTES)


def let_go(sock: socket.socket) -> None:
    """Wake the loop for what waits on `sock`, and for every byte from now on."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)


class Pacer:
    """One tick every `interval` lets go of every stream held since the last one.

    Streams held together are let go together: their reads land in one turn of the event loop,
    and one timer serves them all. A stream read at a tick is held again at once, so in a
    steady stream each is read once per tick; the first hold after a quiet time lasts until
    the next tick (less than `interval`).
    """

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._held: dict[int, socket.socket] = {}
        self._tick: asyncio.TimerHandle | None = None

    def hold(self, sock: socket.socket) -> bool:
        """Hold `sock`'s reads until the next tick; False if it cannot be (closing)."""
        try:
            hold(sock)
        except OSError:
            return False
        self._held[id(sock)] = sock
        if self._tick is None:
            self._tick = asyncio.get_running_loop().call_later(self.interval, self._let_all_go)
        return True

    def forget(self, sock: socket.socket) -> None:
        """`sock` is done: the tick leaves it alone."""
        self._held.pop(id(sock), None)

    def _let_all_go(self) -> None:
        self._tick = None
        held, self._held = self._held, {}
        for sock in held.values():
            # One that closed meanwhile has nothing to read; its end was relayed already.
            with contextlib.suppress(OSError):
                let_go(sock)


@functools.cache
def reads_can_wait() -> bool:
    """Whether this kernel holds bytes under the mark, wakes on lowering it, and on a close."""
    if not sys.platform.startswith("linux") or not hasattr(select, "epoll"):
        return False
    try:
        with (
            socket.create_server(("127.0.0.1", 0)) as server,
            socket.create_connection(server.getsockname()) as sender,
        ):
            receiver, _ = server.accept()
            with receiver, select.epoll() as poller:
                receiver.setblocking(False)
                poller.register(receiver.fileno(), select.EPOLLIN)
                hold(receiver)
                sender.sendall(b"x")
                held = not poller.poll(_PROBE_SECONDS)
                let_go(receiver)
                woken = bool(poller.poll(_PROBE_SECONDS))
                receiver.recv(16)
                hold(receiver)
                sender.close()
                closed = bool(poller.poll(_PROBE_SECONDS))
                return held and woken and closed
    except OSError:
        return False
