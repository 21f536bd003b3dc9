"""Reading a llama-server's answer head and following its chunked body, for the relay.

The upstream connection (`upstream_connection`) passes a streamed answer's bytes from
llama-server's socket to the client's as they are: llama-server frames an event stream with
chunked transfer coding, one chunk per event, and the balancer's answer to an HTTP/1.1 client
is chunked too, so the bytes need no re-encoding (an HTTP/1.0 client gets the data alone).
What the relay must know is where the answer ends (to give its slot back and end the client's
answer), that every chunk is well formed (what it forwards, the client
parses: a bogus size would desynchronise the client's kept-alive connection), and how many body
bytes went by. `ChunkedBody` follows the chunks with a few `find` calls per read and hands back
the bytes to forward; the final `0` chunk is not forwarded, the balancer's own end of the answer
replaces it (trailers, which llama-server never sends, are dropped).

The head is parsed strictly: anything a proxy could pass on wrongly (a header line with a bare
CR or LF, obs-fold, a `Content-Length` given twice or not a number, any transfer coding but
`chunked`, both framings at once, a head over 64 KiB) is a `BadAnswer`, answered 502. Pure: bytes
in, decisions out.
"""

from __future__ import annotations

import enum
import re

import msgspec

MAX_HEAD = 64 * 1024
"""Largest answer head accepted: llama-server's are a few hundred bytes."""

MAX_SIZE_LINE = 1024
"""Longest chunk-size line accepted (size, extensions, CRLF)."""

_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*))?")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_DIGITS = re.compile(r"[0-9]{1,15}")
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})[ \t]*(?:;[^\r\n]*)?")
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
"""Every field line of a head with its CRLF, checked whole by one expression (the per-line
checks run only to say what is wrong with a bad one)."""


class BadAnswer(Exception):
    """An upstream answer the relay will not pass on; the message says what was wrong."""


class Framing(enum.Enum):
    """How the answer's body ends."""

    EMPTY = "empty"
    """No body (1xx, 204, 304)."""
    LENGTH = "length"
    """`Content-Length` bytes."""
    CHUNKED = "chunked"
    """Chunked transfer coding: at the `0` chunk."""
    CLOSE = "close"
    """Neither: when the server closes the connection."""


class AnswerHead(msgspec.Struct, frozen=True):
    """An answer's status line and headers.

    Attributes:
        status: the status code.
        reason: the reason phrase (may be empty).
        headers: every header field, in order, names as sent.
        framing: how the body ends.
        length: the `Content-Length`, for `Framing.LENGTH`.
        closes: whether the server closes the connection after it (`Connection: close`, or
            HTTP/1.0 without `keep-alive`).
    """

    status: int
    reason: str
    headers: list[tuple[str, str]]
    framing: Framing
    length: int = 0
    closes: bool = False

    def without_body(self) -> AnswerHead:
        """The head as the answer to a HEAD request: no body, whatever its headers say."""
        return AnswerHead(self.status, self.reason, self.headers, Framing.EMPTY, 0, self.closes)


def head_end(buffer: bytes | bytearray) -> int:
    """Where the head in `buffer` ends (just past its empty line), or -1 if not yet in."""
    at = buffer.find(b"\r\n\r\n")
    if at < 0:
        if len(buffer) > MAX_HEAD:
            raise BadAnswer(f"answer head over {MAX_HEAD} bytes")
        return -1
    if at + 4 > MAX_HEAD:
        raise BadAnswer(f"answer head over {MAX_HEAD} bytes")
    return at + 4


def parse_head(head: bytes) -> AnswerHead:
    """The status and headers of `head` (up to and with its empty line)."""
    line_end = head.find(b"\r\n")
    status_line = _STATUS_LINE.fullmatch(head, 0, line_end)
    if status_line is None:
        raise BadAnswer(f"not an HTTP/1.x status line: {head[:line_end][:80]!r}")
    status = int(status_line.group(2))
    block = head[line_end + 2 : -2]
    if _FIELDS.fullmatch(block) is None:
        _refuse_fields(block)
    headers: list[tuple[str, str]] = []
    lengths: list[str] = []
    codings: list[str] = []
    connection: list[str] = []
    # Checked: every line is `name:value` of allowed bytes, so a split is all the reading left.
    for line in block[:-2].decode("latin-1").split("\r\n") if block else ():
        name, _, value = line.partition(":")
        value = value.strip(" \t")
        lowered = name.lower()
        if lowered == "content-length":
            lengths.append(value)
        elif lowered == "transfer-encoding":
            codings.extend(c.strip(" \t").lower() for c in value.split(","))
        elif lowered == "connection":
            connection.extend(c.strip(" \t").lower() for c in value.split(","))
        headers.append((name, value))
    reason = (status_line.group(3) or b"").decode("latin-1")
    closes = "close" in connection or (
        status_line.group(1) == b"0" and "keep-alive" not in connection
    )
    if status < 200 or status in (204, 304):
        return AnswerHead(status, reason, headers, Framing.EMPTY, 0, closes)
    if codings:
        if lengths:
            raise BadAnswer("both Transfer-Encoding and Content-Length")
        if codings != ["chunked"]:
            raise BadAnswer(f"transfer coding {', '.join(codings)!r} is not chunked alone")
        return AnswerHead(status, reason, headers, Framing.CHUNKED, 0, closes)
    if lengths:
        if len(lengths) > 1 or not _DIGITS.fullmatch(lengths[0]):
            raise BadAnswer(f"bad Content-Length {', '.join(lengths)[:40]!r}")
        return AnswerHead(status, reason, headers, Framing.LENGTH, int(lengths[0]), closes)
    return AnswerHead(status, reason, headers, Framing.CLOSE, 0, True)


def _refuse_fields(block: bytes) -> None:
    """Say what is wrong with a header block that `_FIELDS` refused."""
    for line in block[:-2].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise BadAnswer(f"bad header line: {line[:80]!r}")
        if _FIELD_VALUE.fullmatch(value) is None:
            raise BadAnswer(f"control characters in header {name[:40]!r}")
    raise BadAnswer(f"bad header block: {block[:80]!r}")


class ChunkedBody:
    """Follows a chunked body read by read: which bytes to forward, and where it ends.

    With `dechunk`, `feed` hands back the chunks' data alone (for a client whose answer is not
    chunked: HTTP/1.0).

    Attributes:
        payload_bytes: the chunks' data bytes seen so far (the body, without its framing).
        ended: whether the `0` chunk arrived.
    """

    __slots__ = ("_carry", "_crlf", "_data", "_left", "ended", "payload_bytes")

    def __init__(self, *, dechunk: bool = False) -> None:
        self._carry = b""
        self._left = 0
        self._crlf = False
        self._data: list[bytes] | None = [] if dechunk else None
        self.payload_bytes = 0
        self.ended = False

    def feed(self, data: bytes) -> bytes:
        """The complete chunks (size line, data, CRLF) that `data` ends, to forward verbatim.

        A chunk split across reads is forwarded as far as it is known to be good: data bytes
        as they come, a size line or the CRLF after the data once whole. Bytes after the `0`
        chunk are dropped.
        """
        if self._carry:
            data, self._carry = self._carry + data, b""
        pos, end = 0, len(data)
        while pos < end:
            if self._left:
                step = min(self._left, end - pos)
                if self._data is not None:
                    self._data.append(data[pos : pos + step])
                pos += step
                self._left -= step
                continue
            if self._crlf:
                if end - pos < 2:
                    self._carry = data[pos:]
                    return self._out(data, pos)
                if data[pos : pos + 2] != b"\r\n":
                    raise BadAnswer("chunk data not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            line_end = data.find(b"\r\n", pos, pos + MAX_SIZE_LINE)
            if line_end < 0:
                if end - pos >= MAX_SIZE_LINE:
                    raise BadAnswer("chunk-size line too long")
                self._carry = data[pos:]
                return self._out(data, pos)
            size = _CHUNK_SIZE.fullmatch(data, pos, line_end)
            if size is None:
                raise BadAnswer(f"bad chunk-size line {data[pos:line_end][:40]!r}")
            length = int(size.group(1), 16)
            if length == 0:
                self.ended = True
                return self._out(data, pos)
            self.payload_bytes += length
            self._left, self._crlf = length, True
            pos = line_end + 2
        return self._out(data, end)

    def _out(self, data: bytes, end: int) -> bytes:
        if self._data is None:
            return data[:end] if end < len(data) else data
        out = b"".join(self._data)
        self._data.clear()
        return out
