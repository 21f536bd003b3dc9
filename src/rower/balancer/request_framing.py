"""Which request heads the balancer's listeners refuse before any handler sees them.

aiohttp's parser (llhttp) already refuses what RFC 9112 calls malformed: obs-fold, bare CR or
LF line ends, a `Content-Length` given twice or with a sign, `Transfer-Encoding` together with
`Content-Length`, bad chunk sizes, control characters. These rules add what it lets through
and a proxy must not: anything whose framing two HTTP implementations could read differently,
so that bytes the balancer took for a body reach llama-server as a request of their own.

- HTTP/0.9 (a request line without a version) and versions other than 1.0 and 1.1: refused.
- `Transfer-Encoding` with `Content-Length`, and `Content-Length` twice (llhttp refuses them
  too; aiohttp's pure-Python parser, used without its C extension, is laxer).
- `Transfer-Encoding` in an HTTP/1.0 request: RFC 9112 section 6.1 says to treat the framing
  as faulty and close the connection. In HTTP/1.1, only `chunked` alone is served: any other
  coding (`gzip, chunked`) would reach llama-server undecoded, as if it were the body (501).
- a header name that is a framing header with `_` for `-` (`Transfer_Encoding`): relayed as
  it is, a server that folds `_` into `-` would frame the body differently.
- `CONNECT`, and request targets that are neither a path (`/v1/models`) nor an absolute URL
  (`http://host/v1/models`, whose path alone is used): `*`, `host:port`, and any target with a
  fragment (`#`), which a client never sends.

Every refusal closes the connection: what follows the head on it cannot be trusted to be a
new request. Pure functions of the head, no I/O.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

FRAMING = frozenset({"content-length", "transfer-encoding"})
"""The header fields that say where a body ends."""


@dataclass(frozen=True, slots=True)
class Refusal:
    """The answer to a request head the listeners do not serve."""

    status: int
    message: str


def refusal(
    method: str, version: tuple[int, int], target: str, headers: Iterable[tuple[str, str]]
) -> Refusal | None:
    """What to answer instead of handling this request head, or None to handle it.

    Args:
        method: the request method, as parsed.
        version: `(major, minor)` from the request line (`(0, 9)` when it had none).
        target: the request target exactly as sent (origin-form path or absolute URL).
        headers: every header field, repeated names included, in order.
    """
    if version == (0, 9):
        return Refusal(400, "HTTP/0.9 requests are not served; send HTTP/1.1")
    if version not in ((1, 0), (1, 1)):
        major, minor = version
        return Refusal(505, f"HTTP/{major}.{minor} is not supported; send HTTP/1.1")
    if method == "CONNECT":
        return Refusal(405, "CONNECT is not supported: the balancer is a reverse proxy")
    if "#" in target or (
        not target.startswith("/") and not target[:8].lower().startswith(("http://", "https://"))
    ):
        return Refusal(
            400,
            f"The request target must be a path such as /v1/models, not {target[:100]!r}",
        )
    codings: list[str] = []
    lengths: list[str] = []
    for name, value in headers:
        lowered = name.lower()
        if "_" in lowered and lowered.replace("_", "-") in FRAMING:
            return Refusal(
                400,
                f"Header {name[:40]!r} looks like {lowered.replace('_', '-').title()!r}; some "
                "servers read it as that: send the real name or none",
            )
        if lowered == "transfer-encoding":
            codings.extend(coding.strip().lower() for coding in value.split(","))
        elif lowered == "content-length":
            lengths.append(value)
    # llhttp refuses these two itself; aiohttp's pure-Python parser (no C extension) may not.
    if len(lengths) > 1:
        return Refusal(400, "Content-Length is given more than once; send it once")
    if codings and lengths:
        return Refusal(
            400,
            "Transfer-Encoding and Content-Length together make the length ambiguous "
            "(RFC 9112 section 6.1); send one of them",
        )
    if codings:
        if version == (1, 0):
            return Refusal(
                400,
                "Transfer-Encoding in an HTTP/1.0 request makes its length ambiguous "
                "(RFC 9112 section 6.1); send Content-Length, or use HTTP/1.1",
            )
        if codings != ["chunked"]:
            return Refusal(
                501,
                f"Transfer-Encoding {', '.join(codings)[:100]!r} is not supported; send the "
                "body with Content-Length or with Transfer-Encoding: chunked alone",
            )
    return None
