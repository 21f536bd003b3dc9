"""deploy/systemd/: units that systemd accepts, hardened, whose EnvironmentFile examples work.

`systemd-analyze verify` and `systemd-analyze security --offline` check the units as systemd
reads them (no running systemd needed); the example environment files go through `rower`'s
own parser, and then configure a real balancer and agent (addresses moved to loopback).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.deploy.rower_cli import check_command_line
from tests.processes import free_port, rower, running

UNITS = Path(__file__).parents[2] / "deploy" / "systemd"
ROLES = ("agent", "balancer")
HARDENING = {
    "DynamicUser": "yes",
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "RestrictAddressFamilies": "AF_INET AF_INET6 AF_UNIX",
    "CapabilityBoundingSet": "",
    "SystemCallFilter": "@system-service",
    "Restart": "on-failure",
}
systemd_analyze = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    systemd_analyze is None, reason="systemd-analyze is not installed"
)


def unit(role: str) -> dict[str, list[str]]:
    """`Section.Key` -> every value given, in order."""
    entries: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / f"rower-{role}.service").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        entries.setdefault(f"{section}.{key}", []).append(value)
    return entries


def environment_file(role: str) -> dict[str, str]:
    lines = (UNITS / f"{role}.env.example").read_text().splitlines()
    pairs = [line.split("=", 1) for line in lines if line.strip() and not line.startswith("#")]
    return {key: value for key, value in pairs}


def exec_start(role: str) -> list[str]:
    (command,) = unit(role)["Service.ExecStart"]
    return command.split()


def test_units_are_hardened() -> None:
    for role in ROLES:
        service = unit(role)
        for key, value in HARDENING.items():
            assert value in service[f"Service.{key}"], f"rower-{role}: {key}={value}"
        assert service["Install.WantedBy"] == ["multi-user.target"]


def test_exec_start_and_environment_file_are_accepted_by_rower() -> None:
    for role in ROLES:
        (env_file,) = unit(role)["Service.EnvironmentFile"]
        assert env_file == f"/etc/rower/{role}.env"
        program, *argv = exec_start(role)
        assert program == "/opt/rower/bin/rower"
        assert argv == [role], "every flag comes from the EnvironmentFile"
        check_command_line(argv, environment_file(role))


def test_the_agent_example_reports_to_the_balancer_example() -> None:
    agent = check_command_line(["agent"], environment_file("agent"))
    balancer = check_command_line(["balancer"], environment_file("balancer"))
    assert [str(a) for a in agent.management_addr] == [str(balancer.management_addr)]
    assert agent.management_token == balancer.management_token


def installed_copy(role: str, directory: Path) -> Path:
    """The unit as installed: ExecStart at this environment's rower, the example env file."""
    rower_program = Path(sys.executable).with_name("rower")
    env_file = directory / f"{role}.env"
    env_file.write_text((UNITS / f"{role}.env.example").read_text())
    text = (UNITS / f"rower-{role}.service").read_text()
    text = text.replace("/opt/rower/bin/rower", str(rower_program))
    text = text.replace(f"/etc/rower/{role}.env", str(env_file))
    path = directory / f"rower-{role}.service"
    path.write_text(text)
    return path


@needs_systemd_analyze
@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_verify_finds_nothing(role: str, tmp_path: Path) -> None:
    path = installed_copy(role, tmp_path)
    answer = subprocess.run(
        [str(systemd_analyze), "verify", str(path)], capture_output=True, text=True, timeout=60
    )
    # verify exits 0 on unknown keys and bad values, but says so: any word is a finding.
    assert answer.returncode == 0, answer.stderr
    findings = [line for line in answer.stderr.splitlines() if path.name in line]
    assert not findings, "\n".join(findings)


@needs_systemd_analyze
@pytest.mark.parametrize("role", ROLES)
def test_systemd_analyze_security_rates_the_unit_ok(role: str, tmp_path: Path) -> None:
    path = installed_copy(role, tmp_path)
    answer = subprocess.run(
        [str(systemd_analyze), "security", "--offline=true", "--threshold=20", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert answer.returncode == 0, answer.stdout + answer.stderr
    assert "Overall exposure level" in answer.stdout


@pytest.mark.timeout(60)
def test_the_example_environment_files_configure_a_working_pair() -> None:
    management, proxy, sim_port = free_port(), free_port(), free_port()
    balancer_env = environment_file("balancer") | {
        "ROWER_MANAGEMENT_ADDR": f"127.0.0.1:{management}",
        "ROWER_REVERSEPROXY_ADDR": f"127.0.0.1:{proxy}",
        "ROWER_STATSD_ADDR": f"127.0.0.1:{free_port()}",
    }
    agent_env = environment_file("agent") | {
        "ROWER_MANAGEMENT_ADDR": f"127.0.0.1:{management}",
        "ROWER_LOCAL_LLAMACPP_ADDR": f"127.0.0.1:{sim_port}",
        "ROWER_EXTERNAL_LLAMACPP_ADDR": f"127.0.0.1:{sim_port}",
    }
    with (
        running(rower("sim", "--addr", f"127.0.0.1:{sim_port}", "--slots", "2")) as sim,
        running(rower("balancer", env=balancer_env)) as balancer,
    ):
        sim.wait_http(f"http://127.0.0.1:{sim_port}/health")
        balancer.wait_http(f"http://127.0.0.1:{management}/health")
        with running(rower("agent", env=agent_env)):
            deadline = time.monotonic() + 15
            names: list[str] = []
            while time.monotonic() < deadline and not names:
                url = f"http://127.0.0.1:{management}/api/v1/agents"
                with urllib.request.urlopen(url, timeout=5) as answer:
                    agents = json.load(answer)["agents"]
                names = [a["status"]["agent_name"] for a in agents if a["status"]["slots_idle"]]
                time.sleep(0.05)
            assert names == [agent_env["ROWER_NAME"]]
