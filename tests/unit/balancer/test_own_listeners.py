"""Which reported addresses are the balancer's own listeners (loops and back doors refused)."""

from __future__ import annotations

import ipaddress
import socket

import pytest

from rower.addresses import Address
from rower.balancer.own_listeners import OwnListeners


def own(*listeners: str) -> OwnListeners:
    return OwnListeners({f"listener {i}": Address.parse(a) for i, a in enumerate(listeners)})


def owned(listeners: OwnListeners, address: str) -> bool:
    parsed = Address.parse(address)
    assert parsed.ip is not None
    return listeners.owner_of_ip(parsed.ip, parsed.port) is not None


def test_a_loopback_listener_owns_every_loopback_spelling_of_its_port() -> None:
    listeners = own("127.0.0.1:8080")
    for address in ("127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080", "[::ffff:127.0.0.1]:8080"):
        assert owned(listeners, address), address
    for address in ("127.0.0.1:8081", "10.0.0.7:8080", "[2001:db8::1]:8080"):
        assert not owned(listeners, address), address


def test_a_listener_on_one_address_owns_that_address() -> None:
    listeners = own("10.1.2.3:8080")
    assert owned(listeners, "10.1.2.3:8080")
    assert not owned(listeners, "10.1.2.4:8080")
    # llama-server may well listen on loopback at the same port on the balancer's host.
    assert not owned(listeners, "127.0.0.1:8080")


def test_a_wildcard_listener_owns_every_local_address_and_no_other() -> None:
    listeners = own("0.0.0.0:8080", "[::]:8085")
    assert owned(listeners, "127.0.0.1:8080")
    assert owned(listeners, "127.3.4.5:8080")
    assert owned(listeners, "[::1]:8085")
    assert owned(listeners, "0.0.0.0:8080")
    assert not owned(listeners, "192.0.2.1:8080")  # TEST-NET-1: never assigned to a host
    assert not owned(listeners, "127.0.0.1:9999")


def test_a_wildcard_listener_owns_this_machines_interface_addresses() -> None:
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.connect(("192.0.2.1", 9))  # no packet is sent: only the route is looked up
            mine = probe.getsockname()[0]
    except OSError:
        pytest.skip("no IPv4 route on this machine")
    assert owned(own("0.0.0.0:8080"), f"{ipaddress.IPv4Address(mine)}:8080")
    assert not owned(own("127.0.0.1:8080"), f"{mine}:8080") or mine.startswith("127.")


async def test_names_that_are_loopback_are_owned_without_dns() -> None:
    listeners = own("127.0.0.1:8080")
    for name in ("localhost:8080", "LOCALHOST.:8080", "api.localhost:8080"):
        assert await listeners.owner_of(Address.parse(name)) == "listener 0 127.0.0.1:8080"
    assert await listeners.owner_of(Address.parse("localhost:8081")) is None
    # A port no listener has is let through without asking DNS.
    assert await listeners.owner_of(Address.parse("gpu.invalid:8081")) is None
