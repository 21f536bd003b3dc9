"""The EC2 instance's private IPv4, from the instance metadata service (IMDSv2), for
`--external-llamacpp-addr aws:metadata:local-ipv4:PORT`.

IMDSv2 wants a session token first (`PUT /latest/api/token`), then the token on every read.
`AWS_EC2_METADATA_SERVICE_ENDPOINT` moves the service, as it does for the AWS SDKs and CLI.
"""

from __future__ import annotations

import ipaddress
import os

import aiohttp

DEFAULT_ENDPOINT = "http://169.254.169.254"
ENDPOINT_VARIABLE = "AWS_EC2_METADATA_SERVICE_ENDPOINT"
TOKEN_TTL_SECONDS = 60


class AwsMetadataError(Exception):
    """The metadata service could not be reached or gave no usable IPv4; says which."""


def metadata_endpoint(environ: dict[str, str] | None = None) -> str:
    """The metadata service's base URL, without a trailing slash."""
    environ = dict(os.environ) if environ is None else environ
    return (environ.get(ENDPOINT_VARIABLE) or DEFAULT_ENDPOINT).rstrip("/")


async def fetch_local_ipv4(endpoint: str | None = None, *, seconds: float = 2.0) -> str:
    """The instance's private IPv4 address, as text; each request may take `seconds`."""
    base = metadata_endpoint() if endpoint is None else endpoint.rstrip("/")
    limits = aiohttp.ClientTimeout(total=seconds)
    try:
        async with aiohttp.ClientSession(timeout=limits) as session:
            async with session.put(
                f"{base}/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)},
            ) as answer:
                if answer.status != 200:
                    raise AwsMetadataError(
                        f"the EC2 metadata service at {base} refused a session token "
                        f"(status {answer.status})"
                    )
                token = (await answer.text()).strip()
            async with session.get(
                f"{base}/latest/meta-data/local-ipv4",
                headers={"X-aws-ec2-metadata-token": token},
            ) as answer:
                if answer.status != 200:
                    raise AwsMetadataError(
                        f"the EC2 metadata service at {base} did not give local-ipv4 "
                        f"(status {answer.status})"
                    )
                text = (await answer.text()).strip()
    except (aiohttp.ClientError, TimeoutError, UnicodeDecodeError) as error:
        reason = str(error) or type(error).__name__
        raise AwsMetadataError(
            f"cannot reach the EC2 metadata service at {base} ({reason}); "
            f"is this an EC2 instance with IMDSv2 enabled? Set {ENDPOINT_VARIABLE} to move it, "
            "or give --external-llamacpp-addr as HOST:PORT"
        ) from None
    try:
        return str(ipaddress.IPv4Address(text))
    except ValueError:
        raise AwsMetadataError(
            f"the EC2 metadata service at {base} answered {text[:100]!r}, not an IPv4 address"
        ) from None
