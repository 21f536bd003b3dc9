"""`HOST:PORT` addresses as operators write them on the command line and agents report them.

Hostnames are kept as given and resolved at connect time, so a server whose DNS name moves keeps
working (Paddler resolved them once at start). IPv6 literals are written in brackets: `[::1]:8080`.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

AWS_LOCAL_IPV4 = "aws:metadata:local-ipv4"
"""Host placeholder that the agent replaces with the EC2 instance's private IPv4 at start."""

_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_])?$")


class AddressError(ValueError):
    """An address that is not `HOST:PORT`; the message says what to write instead."""


@dataclass(frozen=True, slots=True)
class Address:
    """A TCP endpoint: host (name, IPv4 or IPv6 literal without brackets) and port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, allow_aws_metadata: bool = False) -> Address:
        """Parse `HOST:PORT`, `[IPV6]:PORT`, or `aws:metadata:local-ipv4:PORT` when allowed."""
        text = text.strip()
        if text.startswith(("http://", "https://")):
            raise AddressError(
                f"{text!r} is a URL; give HOST:PORT without a scheme, e.g. 127.0.0.1:8080"
            )
        if allow_aws_metadata and text.startswith(AWS_LOCAL_IPV4 + ":"):
            host, port_text = AWS_LOCAL_IPV4, text[len(AWS_LOCAL_IPV4) + 1 :]
        elif text.startswith("["):
            end = text.find("]")
            if end < 0 or text[end + 1 : end + 2] != ":":
                raise AddressError(f"{text!r} is not [IPV6]:PORT, e.g. [::1]:8080")
            host, port_text = text[1:end], text[end + 2 :]
            try:
                ipaddress.IPv6Address(host)
            except ValueError:
                raise AddressError(f"{host!r} in {text!r} is not an IPv6 address") from None
        else:
            host, sep, port_text = text.rpartition(":")
            if not sep or not host:
                raise AddressError(f"{text!r} is not HOST:PORT, e.g. 127.0.0.1:8080")
            if ":" in host:
                raise AddressError(f"{text!r}: write IPv6 addresses in brackets, e.g. [::1]:8080")
            if not _HOSTNAME.match(host):
                raise AddressError(f"{host!r} in {text!r} is not a valid host name or address")
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise AddressError(f"port {port_text!r} in {text!r} must be a number from 1 to 65535")
        return cls(host, int(port_text))

    @property
    def is_aws_metadata(self) -> bool:
        """Whether the host is still the EC2 metadata placeholder."""
        return self.host == AWS_LOCAL_IPV4

    def url(self, path: str = "", *, scheme: str = "http") -> str:
        """`scheme://host:port/path`, with IPv6 hosts bracketed."""
        return f"{scheme}://{self}{path}"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host and not self.is_aws_metadata else self.host
        return f"{host}:{self.port}"
