"""The pacer's tick, on real loopback sockets: what it holds waits in the kernel until the
tick, everything held goes at the tick, and a forgotten socket is left alone."""

from __future__ import annotations

import asyncio
import select
import socket
from collections.abc import Iterator

import pytest

from rower.balancer import stream_pacing

pytestmark = pytest.mark.skipif(
    not stream_pacing.reads_can_wait(), reason="needs Linux's SO_RCVLOWAT wake-up"
)


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    """Three connected (sender, receiver) pairs over loopback."""
    made = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        for _ in range(3):
            sender = socket.create_connection(server.getsockname())
            receiver, _ = server.accept()
            receiver.setblocking(False)
            made.append((sender, receiver))
    yield made
    for sender, receiver in made:
        sender.close()
        receiver.close()


def readable(receivers: list[socket.socket]) -> set[int]:
    with select.epoll() as poller:
        for receiver in receivers:
            poller.register(receiver.fileno(), select.EPOLLIN)
        return {fd for fd, _ in poller.poll(0.05)}


async def test_held_sockets_wait_for_the_tick_then_go_together(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    pacer = stream_pacing.Pacer(0.2)
    receivers = [receiver for _, receiver in pairs]
    for receiver in receivers:
        assert pacer.hold(receiver)
    pacer.forget(receivers[2])
    for sender, _ in pairs:
        sender.sendall(b"token")
    assert readable(receivers) == set(), "held bytes woke the reader before the tick"
    await asyncio.sleep(0.3)
    # The forgotten one is not the pacer's any more: still held.
    assert readable(receivers) == {receivers[0].fileno(), receivers[1].fileno()}


async def test_a_close_is_never_held(pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    sender, receiver = pairs[0]
    assert stream_pacing.Pacer(60.0).hold(receiver)
    sender.sendall(b"the last token")
    sender.close()
    assert readable([receiver]) == {receiver.fileno()}
    assert receiver.recv(100) == b"the last token"


async def test_a_closed_socket_is_not_held() -> None:
    # The relay then reads as it comes (`UpstreamConnection`).
    closed = socket.socket()
    closed.close()
    assert not stream_pacing.Pacer(0.05).hold(closed)
