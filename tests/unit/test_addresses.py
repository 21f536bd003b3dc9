"""`HOST:PORT` parsing: what operators write, and clear errors for what they get wrong."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from rower.addresses import Address, AddressError


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("127.0.0.1:8080", "127.0.0.1", 8080),
        ("localhost:1", "localhost", 1),
        ("llama-0.llama.svc.cluster.local:65535", "llama-0.llama.svc.cluster.local", 65535),
        ("[::1]:8080", "::1", 8080),
        (" 10.0.0.5:80 ", "10.0.0.5", 80),
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
        ("127.0.0.1:http", "1 to 65535"),
        ("::1:8080", "brackets"),
        ("[::1]8080", "[IPV6]:PORT"),
        ("[nope]:8080", "not an IPv6"),
        ("bad host:80", "not a valid host"),
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


@given(st.text(max_size=60))
def test_any_text_parses_or_raises_address_error(text: str) -> None:
    try:
        address = Address.parse(text)
    except AddressError as error:
        message = str(error)
        assert message
        return
    assert 0 < address.port < 65536
    assert Address.parse(str(address)) == address
