"""Reading a client's request head and chunked body, for the public listener. Sans-I/O.

The reverse-proxy listener (`client_connection`) hands this module the bytes it received and
gets back decisions: where the head ends, what it says (`RequestHead`), or why it is refused
(`HeadRefused`, with the status to answer). The rules are llhttp's strict ones, which the
listener followed when it was aiohttp's (the chaos tests pin them): CRLF line ends only, no
obs-fold, header names that are tokens with no space before the colon, no control characters
in values, a method llhttp knows (`METHODS`), a request target of visible ASCII only (no
spaces, control characters or bytes over 0x7f: percent-encode them), HTTP/1.0 or 1.1 (2.0
gets 505 from `request_framing`, any other version 400), exactly one `Host` in
HTTP/1.1, `Content-Length` as digits only, `chunked` only as the last coding and once. Sizes:
a request line or header field over the listener's `max_header_bytes`, or more than
`MAX_HEADERS` fields, is 431. What a proxy must refuse beyond these is `request_framing`'s
business.

A bad head is found as early as the bytes show it: a method that is not a token (TLS on the
plain port, binary junk) or a bare LF is refused before the head is complete, so such a client
gets its 400 at once rather than at the header deadline.

`ChunkedBody` decodes a chunked request body read by read, strictly (hex sizes of up to 15
digits, extensions allowed, trailers read and dropped), and says where the body ended so that
a pipelined request after it is kept.
"""

from __future__ import annotations

import re

import msgspec
from multidict import CIMultiDict

MAX_HEADERS = 128
"""Most header fields in one request (aiohttp's and llhttp's usual limit)."""

MAX_SIZE_LINE = 1024
"""Longest chunk-size line (size and extensions) or trailer line accepted in a request body."""

_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21-\x7e]+)(?: (.*))?")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])")
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_METHOD_PREFIX = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]*")
_FIELD_VALUE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")
_FIELDS = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_FRAMING_FIELDS = frozenset(
    {b"content-length", b"transfer-encoding", b"connection", b"host", b"expect"}
)
"""The fields the parser reads, beside passing them on."""
_CHUNK_SIZE = re.compile(rb"([0-9A-Fa-f]{1,15})(?:;[\t\x20-\x7e\x80-\xff]*)?")
METHODS = frozenset(
    {
        *("DELETE", "GET", "HEAD", "POST", "PUT", "CONNECT", "OPTIONS", "TRACE", "PATCH"),
        *("COPY", "LOCK", "MKCOL", "MOVE", "PROPFIND", "PROPPATCH", "SEARCH", "UNLOCK"),
        *("BIND", "REBIND", "UNBIND", "ACL", "REPORT", "MKACTIVITY", "CHECKOUT", "MERGE"),
        *("M-SEARCH", "NOTIFY", "SUBSCRIBE", "UNSUBSCRIBE", "PURGE", "MKCALENDAR", "LINK"),
        *("UNLINK", "SOURCE", "QUERY"),
    }
)
"""The methods llhttp knows (case matters); any other is refused, as it was and as llama-server
and aiohttp's servers refuse it."""
_SERVED_VERSIONS = frozenset({(1, 0), (1, 1), (2, 0)})
"""Versions parsed as such; 2.0 only to be answered 505 (`request_framing`), as llhttp does."""


class HeadRefused(Exception):
    """A request head (or chunked body) that is not served.

    Attributes:
        status: the status to answer (400, 431).
        message: what to tell the client.
        reason: how the listener counts it: `malformed` or `header_too_large`.
    """

    def __init__(self, status: int, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.reason = reason


class RequestHead(msgspec.Struct, frozen=True):
    """A request line and its headers, as parsed.

    Attributes:
        method: the method (case kept).
        target: the request target exactly as sent.
        version: `(major, minor)`; `(0, 9)` for a request line without a version.
        headers: every header field in order, names as sent, values without surrounding
            whitespace (UTF-8 with surrogate escapes: any bytes pass through unchanged).
        length: the `Content-Length`, if given (else None).
        chunked: whether the body is chunked (`Transfer-Encoding` ends with `chunked`).
        keep_alive: whether the client keeps the connection for another request.
        expects_continue: whether it sent `Expect: 100-continue`.
    """

    method: str
    target: str
    version: tuple[int, int]
    headers: CIMultiDict[str]
    length: int | None = None
    chunked: bool = False
    keep_alive: bool = True
    expects_continue: bool = False

    @property
    def has_body(self) -> bool:
        """Whether a body follows the head."""
        return self.chunked or bool(self.length)


def head_end(buffer: bytes | bytearray, max_header_bytes: int) -> int:
    """Where the head in `buffer` ends (just past its empty line), or -1 if it is not all in.

    Raises:
        HeadRefused: what has arrived already cannot start a served request, or is too long.
    """
    at = buffer.find(b"\r\n\r\n")
    if at >= 0:
        return at + 4
    first = buffer.find(b" ")
    method = buffer if first < 0 else buffer[:first]
    if _METHOD_PREFIX.fullmatch(method) is None or len(method) > max_header_bytes:
        raise HeadRefused(400, "Malformed request: the method is not a token")
    if buffer.count(b"\n") != buffer.count(b"\r\n"):
        raise HeadRefused(400, "Malformed request: lines must end with CRLF")
    last_line = len(buffer) - (buffer.rfind(b"\n") + 1)
    if last_line > max_header_bytes + 1:
        raise _too_large(max_header_bytes)
    if len(buffer) > (MAX_HEADERS + 2) * (max_header_bytes + 2):
        raise HeadRefused(
            431, f"The request has more than {MAX_HEADERS} header fields", "header_too_large"
        )
    return -1


def parse_head(head: bytes, max_header_bytes: int) -> RequestHead:
    """The request line and headers of `head` (up to and with its empty line).

    Raises:
        HeadRefused: it is malformed or too large.
    """
    line_end = head.find(b"\r\n")
    # Each field line with its CRLF: checked whole by one expression.
    block = head[line_end + 2 : -2]
    if len(head) > max_header_bytes and any(
        len(line) > max_header_bytes for line in head[:-4].split(b"\r\n")
    ):
        raise _too_large(max_header_bytes)
    if _FIELDS.fullmatch(block) is None:
        raise _bad_field(block)
    # Checked: every line is `name:value`, so a split is all the reading left.
    fields = [line.partition(b":") for line in block[:-2].split(b"\r\n")] if block else []
    if len(fields) > MAX_HEADERS:
        raise HeadRefused(
            431, f"The request has more than {MAX_HEADERS} header fields", "header_too_large"
        )
    request_line = _REQUEST_LINE.fullmatch(head, 0, line_end)
    if request_line is None:
        raise HeadRefused(400, "Malformed request: bad request line")
    method = request_line.group(1).decode("ascii")
    if method not in METHODS and method != "PRI":
        raise HeadRefused(400, f"Malformed request: unknown method {method[:20]!r}")
    if method == "PRI":
        raise HeadRefused(400, "Malformed request: HTTP/2 is not served here; send HTTP/1.1")
    version = _version(request_line.group(3))
    headers: CIMultiDict[str] = CIMultiDict()
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    hosts = 0
    expects_continue = False
    for name, _, value in fields:
        value = value.strip(b" \t")
        lowered = name.lower()
        if lowered in _FRAMING_FIELDS:
            if lowered == b"content-length":
                lengths.append(value)
            elif lowered == b"transfer-encoding":
                codings.extend(c.strip(b" \t").lower() for c in value.split(b","))
            elif lowered == b"connection":
                connection.extend(c.strip(b" \t").lower() for c in value.split(b","))
            elif lowered == b"host":
                hosts += 1
            else:
                expects_continue = value.lower() == b"100-continue"
        headers.add(name.decode("ascii"), value.decode("utf-8", "surrogateescape"))
    if version == (1, 1) and hosts != 1:
        said = "no Host header" if not hosts else "Host more than once"
        raise HeadRefused(400, f"Malformed request: {said}; send one Host header")
    length = None
    if lengths:
        if any(not value.isdigit() or len(value) > 15 for value in lengths):
            raise HeadRefused(
                400, f"Malformed request: bad Content-Length {_excerpt(b', '.join(lengths))}"
            )
        length = int(lengths[0])
    chunked = bool(codings) and codings[-1] == b"chunked"
    if b"chunked" in codings[:-1]:
        raise HeadRefused(
            400, "Malformed request: chunked must be the last transfer coding, and given once"
        )
    if version >= (1, 1):
        keep_alive = b"close" not in connection
    else:
        keep_alive = b"keep-alive" in connection and b"close" not in connection
    return RequestHead(
        method,
        request_line.group(2).decode("utf-8", "surrogateescape"),
        version,
        headers,
        length,
        chunked,
        keep_alive,
        expects_continue,
    )


def _bad_field(block: bytes) -> HeadRefused:
    """What is wrong with the first bad line of a header block."""
    for line in block[:-2].split(b"\r\n"):
        if b"\r" in line or b"\n" in line:
            return HeadRefused(400, "Malformed request: lines must end with CRLF")
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            return HeadRefused(400, f"Malformed request: bad header line {_excerpt(line)}")
        if _FIELD_VALUE.fullmatch(value.strip(b" \t")) is None:
            return HeadRefused(
                400, f"Malformed request: control characters in header {_excerpt(name)}"
            )
    return HeadRefused(400, "Malformed request: bad header block")


def _version(said: bytes | None) -> tuple[int, int]:
    if said is None:
        return (0, 9)
    version = _VERSION.fullmatch(said)
    if version is None:
        raise HeadRefused(400, f"Malformed request: bad HTTP version {_excerpt(said)}")
    parsed = (int(version.group(1)), int(version.group(2)))
    if parsed not in _SERVED_VERSIONS:
        raise HeadRefused(400, f"Malformed request: bad HTTP version {_excerpt(said)}")
    return parsed


def _too_large(max_header_bytes: int) -> HeadRefused:
    return HeadRefused(
        431,
        f"The request line or a header field is over {max_header_bytes} bytes (--max-header-bytes)",
        "header_too_large",
    )


def _excerpt(data: bytes) -> str:
    return repr(data[:40].decode("latin-1"))


class ChunkedBody:
    """Decodes a chunked request body read by read.

    Attributes:
        ended: whether the last chunk and the trailers (dropped) are in.
        size: data bytes decoded so far.
    """

    __slots__ = ("_carry", "_crlf", "_left", "_trailers", "ended", "size")

    def __init__(self) -> None:
        self._carry = b""
        self._left = 0
        self._crlf = False
        self._trailers = False
        self.ended = False
        self.size = 0

    def feed(self, data: bytes) -> tuple[list[bytes], bytes]:
        """The data that `data` carries, and what follows the body's end (empty until it ends:
        the next request's bytes, if the client pipelined one).

        Raises:
            HeadRefused: the body is malformed (400).
        """
        if self._carry:
            data, self._carry = self._carry + data, b""
        out: list[bytes] = []
        pos, end = 0, len(data)
        while pos < end and not self.ended:
            if self._left:
                step = min(self._left, end - pos)
                out.append(data[pos : pos + step])
                pos += step
                self._left -= step
                continue
            if self._crlf:
                if end - pos < 2:
                    break
                if data[pos : pos + 2] != b"\r\n":
                    raise HeadRefused(400, "Malformed request: chunk data not followed by CRLF")
                pos += 2
                self._crlf = False
                continue
            line_end = data.find(b"\r\n", pos, pos + MAX_SIZE_LINE + 2)
            if line_end < 0:
                if end - pos > MAX_SIZE_LINE or b"\n" in data[pos:]:
                    raise HeadRefused(400, "Malformed request: bad chunk-size line")
                break
            line = data[pos:line_end]
            pos = line_end + 2
            if self._trailers:
                if not line:
                    self.ended = True
                elif b":" not in line or b"\n" in line or b"\r" in line:
                    raise HeadRefused(400, "Malformed request: bad trailer line")
                continue
            size = _CHUNK_SIZE.fullmatch(line)
            if size is None:
                raise HeadRefused(400, f"Malformed request: bad chunk size {_excerpt(line)}")
            length = int(size.group(1), 16)
            if length == 0:
                self._trailers = True
                continue
            self.size += length
            self._left, self._crlf = length, True
        if not self.ended:
            self._carry = data[pos:]
            return out, b""
        return out, data[pos:]
