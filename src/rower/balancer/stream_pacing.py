"""Reading a token stream from llama-server in batches, without delaying its end.

llama-server writes one small chunk per token, and relaying each costs the balancer a `recv`
and a `send` (docs/performance.md): the system calls are most of its CPU per token. A paced
stream is read at most once per interval: after each read, the socket's `SO_RCVLOWAT` is raised
so that the kernel does not wake the event loop for the next few tokens, and when the interval
is over it is lowered again, which wakes the loop at once if tokens are waiting (Linux signals
readiness when the mark is lowered). The tokens that came meanwhile are read and written to the
client together.

What is never delayed: the first token after a quiet interval (the mark is low then), and the
end of the answer: llama-server closes the connection after a stream (`upstream_client`), and a
closed connection wakes the loop whatever the mark. A stream that sends more than
`HOLD_BYTES` within an interval wakes it too.

`reads_can_wait()` checks once, on a pair of loopback sockets, that this kernel behaves so; where
it does not (another OS, an old kernel), streams are relayed read by read.
"""

from __future__ import annotations

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
