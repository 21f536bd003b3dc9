"""`HOST:PORT` parsing: what operators write, and clear errors for what they get wrong."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from rower.addresses import Address, AddressError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:1", "localhost", 1),
        ("llama-0.llama.svc.cluster.local:65535", "llama-0.llama.svc.cluster.local", 65535),
        ("llama-0.llama.svc.cluster.local.:80", "llama-0.llama.svc.cluster.local.", 80),
        ("compose_llama_1:8080", "compose_llama_1", 8080),
        ("[::1]:8080", "::1", 8080),
        (" 10.0.0.5:80 ", "10.0.0.5", 80),
        # One spelling per server: names in lower case, IP literals in their standard form.
        ("GPU-7.Example.COM:80", "gpu-7.example.com", 80),
        ("[0:0:0:0:0:0:0:1]:80", "::1", 80),
        ("[2001:DB8::1]:80", "2001:db8::1", 80),
        ("0.0.0.0:80", "0.0.0.0", 80),
    ],
)
def test_parses(text: str, host: str, port: int) -> None:
    address = Address.parse(text)
    assert (address.host, address.port) == (host, port)
    assert Address.parse(str(address)) == address


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("http://127.0.0.1:8080", "without a scheme"),
        ("127.0.0.1", "HOST:PORT"),
        (":8080", "HOST:PORT"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:70000", "1 to 65535"),
        ("127.0.0.1:99999", "1 to 65535"),
        ("127.0.0.1:http", "1 to 65535"),
        ("127.0.0.1:08080", "1 to 65535"),
        ("127.0.0.1:+80", "1 to 65535"),
        ("127.0.0.1:", "1 to 65535"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "[IPV6]:PORT"),
        ("[nope]:8080", "not an IPv6"),
        ("[fe80::1%eth0]:8080", "zone ids"),
        ("bad host:80", "spaces"),
        ("not a host:80", "spaces"),
        ("tab\there:80", "spaces"),
        ("gpu\u00e9:80", "ASCII"),
        ("127.0.0.1:\u0668\u0660", "ASCII"),
        ("127.0.0.1:\u00b2", "ASCII"),
        # Anything past HOST:PORT would become part of the proxy's upstream URL.
        ("127.0.0.1:8088/slots?x=", "path, query or user"),
        ("127.0.0.1:8088/", "path, query or user"),
        ("127.0.0.1:8088#x", "path, query or user"),
        ("user@127.0.0.1:8088", "path, query or user"),
        ("127.0.0.1:8088?a", "path, query or user"),
        # Resolvers read these as 127.0.0.1: one spelling only.
        ("127.1:80", "dotted form"),
        ("0x7f000001:80", "dotted form"),
        ("0x7f.0.0.1:80", "dotted form"),
        ("2130706433:80", "dotted form"),
        ("127.000.000.001:80", "dotted form"),
        ("0177.0.0.1:80", "dotted form"),
        ("127.0.0.1.:80", "dotted form"),
        ("256.0.0.1:80", "dotted form"),
        ("a..b:80", "not a valid host"),
        ("-gpu:80", "not a valid host"),
        ("gpu-:80", "not a valid host"),
        ("." + "x" * 10 + ":80", "not a valid host"),
        ("x" * 64 + ":80", "not a valid host"),
        (".".join(["x" * 60] * 5) + ":80", "not a valid host"),
    ],
)
def test_rejects_with_a_hint(text: str, hint: str) -> None:
    with pytest.raises(AddressError, match=hint.replace("[", r"\[")):
        Address.parse(text)


def test_aws_metadata_host_only_where_allowed() -> None:
    address = Address.parse("aws:metadata:local-ipv4:8080", allow_aws_metadata=True)
    assert address.is_aws_metadata
    assert address.port == 8080
    assert str(address) == "aws:metadata:local-ipv4:8080"
    with pytest.raises(AddressError):
        Address.parse("aws:metadata:local-ipv4:8080")


def test_url_brackets_ipv6() -> None:
    assert Address.parse("[::1]:80").url("/health") == "http://[::1]:80/health"


def test_unspecified_hosts_are_told_apart() -> None:
    assert Address.parse("0.0.0.0:80").is_unspecified
    assert Address.parse("[::]:80").is_unspecified
    assert not Address.parse("127.0.0.1:80").is_unspecified
    assert not Address.parse("localhost:80").is_unspecified


@given(st.text(max_size=60))
@example("127.0.0.1:\u00b2")
@example("[::ffff:127.0.0.1]:80")
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    try:
        address = Address.parse(text)
    except AddressError as error:
        message = str(error)
        assert message
        return
    assert 0 < address.port < 65536
    assert Address.parse(str(address)) == address
    # Nothing but host and port: the proxy's URL `http://{address}/path` has exactly that host.
    url = address.url("/v1/models")
    assert url == f"http://{address}/v1/models"
    assert not any(mark in str(address) for mark in "/?#@ ")


@given(st.ip_addresses())
def test_every_ip_address_has_one_spelling(
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    text = f"[{ip.exploded}]:80" if ip.version == 6 else f"{ip}:80"
    address = Address.parse(text)
    assert address.ip == ip
    assert str(address) == (f"[{ip.compressed}]:80" if ip.version == 6 else f"{ip}:80")
