"""The Dockerfile: pinned multi-stage build, non-root user, and a HEALTHCHECK that works.

No container engine runs here, so the instructions are parsed and checked, and the
HEALTHCHECK command itself is run (with this interpreter) against a real balancer.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.deploy.rower_cli import check_command_line
from tests.processes import free_port, rower, running

ROOT = Path(__file__).parents[2]


def instructions() -> list[tuple[str, str]]:
    """`(INSTRUCTION, arguments)` pairs, continuation lines joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.lstrip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, rest = pending.strip().partition(" ")
        found.append((keyword.upper(), " ".join(rest.split())))
        pending = ""
    return found


def arguments(keyword: str) -> list[str]:
    return [rest for name, rest in instructions() if name == keyword]


def healthcheck_argv() -> list[str]:
    (healthcheck,) = arguments("HEALTHCHECK")
    _, _, exec_form = healthcheck.partition(" CMD ")
    argv = json.loads(exec_form)
    assert isinstance(argv, list)
    return [str(a) for a in argv]


def test_a_pinned_multi_stage_build() -> None:
    (default_image,) = [a for a in arguments("ARG") if a.startswith("PYTHON_IMAGE=")]
    assert re.fullmatch(
        r"PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", default_image
    )
    stages = arguments("FROM")
    assert stages == ["${PYTHON_IMAGE} AS wheel", "${PYTHON_IMAGE}"]
    runtime = " ".join(
        rest for _, rest in instructions()[[k for k, _ in instructions()].index("FROM", 2) :]
    )
    assert "from=wheel" in runtime, "the runtime stage installs the wheel built in stage one"
    assert "build-essential" not in runtime


def test_the_build_tool_is_pinned_as_in_the_dev_extra() -> None:
    dev = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    pins = {re.split("==", p)[0].lower(): p for p in dev["dev"] if "==" in p}
    installs = " ".join(a for a in arguments("RUN") if "pip install" in a)
    for requirement in re.findall(r"\b([a-z][\w.-]*==[\w.]+)", installs):
        assert pins[requirement.split("==")[0].lower()] == requirement


def test_runs_as_a_non_root_user() -> None:
    keywords = [k for k, _ in instructions()]
    last_from = len(keywords) - 1 - keywords[::-1].index("FROM")
    users = [rest for k, rest in instructions()[last_from:] if k == "USER"]
    assert users, "the runtime stage sets USER"
    user, _, group = users[-1].partition(":")
    assert user.isdigit(), "numeric, so Kubernetes' runAsNonRoot can check it"
    assert int(user) != 0
    assert group != "0"
    assert f"--uid {user}" in " ".join(arguments("RUN"))


def test_entrypoint_is_rower() -> None:
    (entrypoint,) = arguments("ENTRYPOINT")
    assert json.loads(entrypoint) == ["rower"]


def test_the_build_context_keeps_what_copy_needs() -> None:
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore, "send only what the build uses"
    let_through = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    for copy in arguments("COPY"):
        if copy.startswith("--from"):
            continue
        *sources, _ = copy.split()
        for source in sources:
            assert source.rstrip("/") in let_through, f"{source} is excluded by .dockerignore"
            assert (ROOT / source).exists()


def usage_example() -> list[str]:
    """The words of the `docker run ... rower balancer ...` example in the header comment."""
    lines = iter((ROOT / "Dockerfile").read_text().splitlines())
    header = [line.lstrip("#").strip() for line in lines if line.startswith("#")]
    text = ""
    for line in header:
        if text or (line.startswith("docker run") and line.endswith("\\")):
            text += line.rstrip("\\") + " "
            if not line.endswith("\\"):
                break
    return shlex.split(text)


def test_the_usage_example_is_a_valid_command_line() -> None:
    words = usage_example()
    balancer = words[words.index("balancer") :]
    assert words[words.index("balancer") - 1] == "rower", "the image name, then the command"
    args = check_command_line(balancer, {})
    health = next(w for w in words if w.startswith("HEALTHCHECK_URL="))
    assert health.endswith(f":{args.management_addr.port}/health")


def run_healthcheck(url: str) -> int:
    argv = healthcheck_argv()
    assert argv[0] == "python", "the image's interpreter; no curl in slim images"
    return subprocess.run(
        [sys.executable, *argv[1:]],
        env={"HEALTHCHECK_URL": url},
        timeout=30,
        capture_output=True,
        check=False,
    ).returncode


@pytest.mark.timeout(60)
def test_the_healthcheck_passes_on_a_live_balancer_and_fails_without_one() -> None:
    management, proxy = free_port(), free_port()
    health = f"http://127.0.0.1:{management}/health"
    with running(
        rower(
            "balancer",
            "--management-addr",
            f"127.0.0.1:{management}",
            "--reverseproxy-addr",
            f"127.0.0.1:{proxy}",
        )
    ) as balancer:
        balancer.wait_http(health)
        assert run_healthcheck(health) == 0
        assert run_healthcheck(f"http://127.0.0.1:{management}/no-such-page") != 0
    assert run_healthcheck(health) != 0, "the balancer is gone"
    assert run_healthcheck("") == 0, "no URL (an agent): healthy while the process runs"
