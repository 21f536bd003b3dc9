"""The balancer's own listening addresses, so that no agent can point the proxy at them.

An agent reports where its llama-server is and the proxy connects there. If that is one of the
balancer's own listeners, every proxied request comes back in as a new one (a loop that ends
only when a header outgrows its limit, opening a connection and a file per turn), or reaches
the management API from the public side. Such a report is refused.

For a listener on port P, a reported address with port P is the balancer's own when:

- the listener is bound to every address (`0.0.0.0`, `::`) and the reported host is an address
  of this machine: loopback (`127.0.0.0/8`, `::1`), the unspecified ones, or any address of
  an interface (checked by binding a socket to it, which only a local address allows);
- the listener is bound to one address and the reported host is that address, or both are
  loopback addresses (a socket on `127.0.0.1` does not answer on `127.0.0.2`, but no
  llama-server runs on a loopback alias at the balancer's own port, and refusing all loopback
  spellings leaves nothing to find);
- the reported host is a name that resolves to such an address: `localhost` and `*.localhost`
  are loopback without asking (RFC 6761); other names are resolved when the agent registers or
  changes its address. A name that does not resolve is let through: the proxy cannot connect
  to it either.

IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) count as the IPv4 address they carry. What a
name resolves to later is not checked again (DNS that changes on purpose is out of reach here).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from rower.addresses import Address

IP = ipaddress.IPv4Address | ipaddress.IPv6Address

RESOLVE_TIMEOUT = 2.0
"""Longest wait for DNS when an agent reports a host name, in seconds."""


@dataclass(frozen=True, slots=True)
class _Listener:
    name: str
    address: Address
    ips: frozenset[IP]
    """What the listener is bound to (a name resolved at start)."""

    @property
    def binds_every_address(self) -> bool:
        return any(ip.is_unspecified for ip in self.ips)


class OwnListeners:
    """Tells whether a reported address is one of the balancer's listeners.

    Args:
        listeners: each listener's address by what it is (e.g. "reverse-proxy"), as the
            balancer was told to bind them; host names among them are resolved here, once.
    """

    def __init__(self, listeners: Mapping[str, Address]) -> None:
        self._listeners = [
            _Listener(name, address, _bound_ips(address)) for name, address in listeners.items()
        ]

    def owner_of_ip(self, ip: IP, port: int) -> str | None:
        """Which listener (`name address`) `ip:port` reaches, or None."""
        ip = _unmapped(ip)
        for listener in self._listeners:
            if listener.address.port != port:
                continue
            if listener.binds_every_address:
                if ip.is_loopback or ip.is_unspecified or _is_local(ip):
                    return f"{listener.name} {listener.address}"
            elif ip in listener.ips or (
                ip.is_loopback and any(own.is_loopback for own in listener.ips)
            ):
                return f"{listener.name} {listener.address}"
        return None

    async def owner_of(self, address: Address) -> str | None:
        """Which listener `address` reaches, resolving a host name if it has to, or None."""
        if not any(listener.address.port == address.port for listener in self._listeners):
            return None
        ip = address.ip
        if ip is not None:
            return self.owner_of_ip(ip, address.port)
        name = address.host.rstrip(".")
        if name == "localhost" or name.endswith(".localhost"):
            return self.owner_of_ip(ipaddress.IPv4Address("127.0.0.1"), address.port)
        for resolved in await _resolve(address):
            owner = self.owner_of_ip(resolved, address.port)
            if owner is not None:
                return owner
        return None


def _unmapped(ip: IP) -> IP:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _bound_ips(address: Address) -> frozenset[IP]:
    ip = address.ip
    if ip is not None:
        return frozenset({_unmapped(ip)})
    try:
        infos = socket.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
    except OSError:
        return frozenset()
    return frozenset(_unmapped(ipaddress.ip_address(info[4][0])) for info in infos)


def _is_local(ip: IP) -> bool:
    """Whether `ip` is an address of this machine: only those can be bound to."""
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.bind((str(ip), 0))
    except OSError:
        return False
    return True


async def _resolve(address: Address) -> list[IP]:
    loop = asyncio.get_running_loop()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(RESOLVE_TIMEOUT):
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_STREAM)
        return [_unmapped(ipaddress.ip_address(info[4][0])) for info in infos]
    return []
