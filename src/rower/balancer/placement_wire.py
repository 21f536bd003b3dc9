"""Placements on the wire between balancers: one JSON line each, checked before it is believed.

A balancer tells the others in front of the same llama-servers what it sent where
(`GET /api/v1/placements`, followed by `peers`), so that a conversation whose turns arrive
through several balancers finds one server. A line is
`{"server": "HOST:PORT", "prefix": "<base64>"}`: the server as the agents name it (a router's
model as `HOST:PORT/MODEL`), and the request's affinity key (`affinity.chain`), its block
hashes as unsigned 64-bit big-endian integers, base64-encoded (11 characters a block, a third of
what decimal JSON numbers take).

What a peer sends is checked as strictly as what an agent sends: a line that is not this shape
is refused with a message naming what is wrong (`BadPlacement`), and the follower drops the
stream rather than believe anything of it.
"""

from __future__ import annotations

import base64
import binascii
import struct

import msgspec

from rower.balancer.prefix_memory import Placement

MAX_BLOCKS = 16_384
"""Blocks of a prefix told to peers at most: 8 MiB of conversation head, some 2 million tokens,
beyond any llama-server's context. A longer one is told by its first `MAX_BLOCKS` (its next turn
still starts with them)."""

MAX_SERVER_CHARS = 512
"""A server's name (`HOST:PORT`, or `HOST:PORT/MODEL`) is at most this long."""

MAX_LINE_BYTES = 4 * MAX_BLOCKS * 8 // 3 + MAX_SERVER_CHARS + 64
"""The longest line a well-formed placement takes."""

_BLOCK = struct.Struct(">Q")


class BadPlacement(ValueError):
    """A peer's line is not a placement; the message says what is wrong with it."""


class _Line(msgspec.Struct, forbid_unknown_fields=True):
    server: str
    prefix: str


_decoder = msgspec.json.Decoder(_Line)
_encoder = msgspec.json.Encoder()


def encode(placement: Placement) -> bytes:
    """`placement` as one line, newline included."""
    prefix = placement.prefix[:MAX_BLOCKS]
    packed = struct.pack(f">{len(prefix)}Q", *prefix)
    line = _Line(placement.server, base64.b64encode(packed).decode("ascii"))
    return _encoder.encode(line) + b"\n"


def decode(line: bytes) -> Placement:
    """The placement a peer's line tells; raises `BadPlacement` saying what is wrong."""
    if len(line) > MAX_LINE_BYTES:
        raise BadPlacement(f"a line of {len(line)} bytes is longer than {MAX_LINE_BYTES}")
    try:
        parsed = _decoder.decode(line)
    except msgspec.DecodeError as error:
        raise BadPlacement(f'not a JSON object {{"server": ..., "prefix": ...}}: {error}') from None
    server = parsed.server
    if not server or len(server) > MAX_SERVER_CHARS or not server.isprintable():
        raise BadPlacement(
            f"server must be 1-{MAX_SERVER_CHARS} printable characters (HOST:PORT[/MODEL])"
        )
    try:
        packed = base64.b64decode(parsed.prefix, validate=True)
    except (binascii.Error, ValueError):
        raise BadPlacement("prefix is not base64") from None
    blocks, rest = divmod(len(packed), _BLOCK.size)
    if rest or not blocks or blocks > MAX_BLOCKS:
        raise BadPlacement(
            f"prefix must be 1-{MAX_BLOCKS} block hashes of 8 bytes each, not {len(packed)} bytes"
        )
    return Placement(server, struct.unpack(f">{blocks}Q", packed))
