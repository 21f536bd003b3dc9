"""`HOST:PORT` addresses as operators write them on the command line and agents report them.

One strict parser for both: a host name, an IPv4 address or a bracketed IPv6 address, a colon,
and a port from 1 to 65535, nothing else (no scheme, path, query, user, zone id or spaces
inside). An agent's reported address becomes the URL the proxy connects to, so anything more
than `host:port` would let it choose the path too (`10.0.0.7:8080/slots?x=`), and spellings
that resolvers read as numbers (`127.1`, `0x7f000001`, `2130706433`) would slip past any check
of where the balancer itself listens.

The parsed address is canonical (host names lower case, IP literals in their standard form,
ports without leading zeros), so one server has one spelling and is never counted twice.
Hostnames are kept as given and resolved at connect time, so a server whose DNS name moves
keeps working (Paddler resolved them once at start).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

AWS_LOCAL_IPV4 = "aws:metadata:local-ipv4"
"""Host placeholder that the agent replaces with the EC2 instance's private IPv4 at start."""

MAX_HOST_NAME = 253
"""Longest DNS name, in characters, without the trailing dot."""

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
"""One DNS label: letters, digits, `-` (not at either end) and `_` (some internal names use it)."""
_NUMERIC_LABEL = re.compile(r"^(?:[0-9]+|0x[0-9a-f]*)$")
"""A last label that resolvers read as a number, which makes the whole name an IPv4 address."""
_PORT = re.compile(r"^[1-9][0-9]{0,4}$")


class AddressError(ValueError):
    """An address that is not `HOST:PORT`; the message says what to write instead."""


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint: host (name, IPv4 or IPv6 literal without brackets) and port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_aws_metadata: bool = False) -> Address:
        """Parse `HOST:PORT`, `[IPV6]:PORT`, or `aws:metadata:local-ipv4:PORT` when allowed.

        Raises:
            AddressError: `text` is anything else; the message names the part that is wrong.
        """
        text = text.strip()
        if text.startswith(("http://", "https://")):
            raise AddressError(
                f"{text!r} is a URL; give HOST:PORT without a scheme, e.g. 127.0.0.1:8080"
            )
        if not text.isascii() or not text.isprintable() or " " in text:
            raise AddressError(
                f"{text!r} has spaces or characters that are not plain ASCII; give HOST:PORT, "
                "e.g. 127.0.0.1:8080 (international names in their xn-- form)"
            )
        if any(mark in text for mark in "/?#@"):
            raise AddressError(
                f"{text!r} has a path, query or user part ('/', '?', '#' or '@'); give HOST:PORT "
                "only, e.g. 127.0.0.1:8080"
            )
        if allow_aws_metadata and text.startswith(AWS_LOCAL_IPV4 + ":"):
            host, port_text = AWS_LOCAL_IPV4, text[len(AWS_LOCAL_IPV4) + 1 :]
        elif text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise AddressError(f"{text!r} is not [IPV6]:PORT, e.g. [::1]:8080")
            host, port_text = _ipv6(text[1:end], text), text[end + 2 :]
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise AddressError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
            if ":" in host:
                raise AddressError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
            host = _host(host, text)
        if not _PORT.match(port_text) or int(port_text) > 65535:
            raise AddressError(f"port {port_text!r} in {text!r} must be a number from 1 to 65535")
        return cls(host, int(port_text))

    @property
    def is_aws_metadata(self) -> bool:
        """Whether the host is still the EC2 metadata placeholder."""
        return self.host == AWS_LOCAL_IPV4

    @property
    def ip(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The host as an IP address, or None for a name."""
        try:
            return ipaddress.ip_address(self.host)
        except ValueError:
            return None

    @property
    def is_unspecified(self) -> bool:
        """Whether the host is `0.0.0.0` or `::`: every address to listen on, none to reach."""
        ip = self.ip
        return ip is not None and ip.is_unspecified

    def url(self, path: str = "", *, scheme: str = "http") -> str:
        """`scheme://host:port/path`, with IPv6 hosts bracketed."""
        return f"{scheme}://{self}{path}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.is_aws_metadata else self.host
        return f"{host}:{self.port}"


def _ipv6(host: str, text: str) -> str:
    if "%" in host:
        raise AddressError(
            f"{text!r}: IPv6 zone ids (%...) are not supported; use a global address"
        )
    try:
        return str(ipaddress.IPv6Address(host))
    except ValueError:
        raise AddressError(f"{host!r} in {text!r} is not an IPv6 address") from None


def _host(host: str, text: str) -> str:
    """The canonical form of a host name or IPv4 address, or an error saying what is wrong."""
    name = host.lower()
    labels = (name[:-1] if name.endswith(".") else name).split(".")
    if _NUMERIC_LABEL.match(labels[-1]):
        # Resolvers read `127.1`, `0x7f.1` and `2130706433` as 127.0.0.1: only the dotted form
        # of four decimal numbers is accepted, so an address has one spelling.
        try:
            return str(ipaddress.IPv4Address(name))
        except ValueError:
            raise AddressError(
                f"{host!r} in {text!r} is neither a host name nor an IPv4 address in its "
                "dotted form (four numbers 0-255 without leading zeros, e.g. 10.0.0.7)"
            ) from None
    if len(name.rstrip(".")) > MAX_HOST_NAME or not all(_LABEL.match(label) for label in labels):
        raise AddressError(
            f"{host!r} in {text!r} is not a valid host name or address (letters, digits, '-' "
            "and '_' in dot-separated labels of at most 63 characters)"
        )
    return name
