"""example/compose.yaml: its flags exist, its ports agree, and its topology runs as processes.

No container engine runs here, so the file is checked twice over: statically against `rower`'s
own parser and the other services' flags, then by starting the same fleet (with `rower sim` in
place of the llama.cpp containers, each named as its container's `--alias`) on loopback, each
address rewritten to a free port. The fleet serves two models: each request goes to the one
it names.
"""

from __future__ import annotations

import json
import re
import socket
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import yaml

from rower.addresses import Address
from tests.deploy.rower_cli import check_command_line, compose_interpolate
from tests.processes import Process, free_port, rower, running

EXAMPLE = Path(__file__).parents[2] / "example"
LLAMACPP_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"


def load_compose() -> dict[str, Any]:
    document = yaml.safe_load((EXAMPLE / "compose.yaml").read_text())
    assert isinstance(document, dict)
    return document


def services() -> dict[str, dict[str, Any]]:
    found = load_compose()["services"]
    assert isinstance(found, dict)
    return found


def environment(service: dict[str, Any]) -> dict[str, str]:
    raw = service.get("environment") or {}
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {str(key): compose_interpolate(str(value)) for key, value in raw.items()}


def rower_services(role: str) -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services().items()
        if service.get("image") == "rower:local" and service["command"][0] == role
    }


def llamacpp_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services().items()
        if str(service.get("image", "")).startswith(LLAMACPP_IMAGE)
    }


def option(argv: list[str], flag: str) -> str:
    """The value after `flag` in `argv`, or after `flag=`."""
    for index, item in enumerate(argv):
        if item == flag:
            return argv[index + 1]
        if item.startswith(flag + "="):
            return item.split("=", 1)[1]
    raise AssertionError(f"{flag} not in {argv}")


def parsed(name: str) -> Any:
    service = services()[name]
    return check_command_line(service["command"], environment(service))


def llamacpp_port(service: dict[str, Any]) -> int:
    return int(option(service["command"], "--port"))


def test_the_topology_of_the_seed_readme() -> None:
    assert len(llamacpp_services()) == 2
    assert len(rower_services("agent")) == 2
    assert len(rower_services("balancer")) == 1
    images = {str(s.get("image")) for s in services().values()}
    assert any(image.startswith("prom/prometheus:v") for image in images)
    assert any(image.startswith("prom/statsd-exporter:v") for image in images)
    for name, service in services().items():
        image = str(service.get("image"))
        assert ":" in image, f"{name}: pin {image}"
        assert not image.endswith(":latest"), f"{name}: pin {image}"
    for service in llamacpp_services().values():
        assert "--slots" in service["command"], "agents read /slots"
        assert "-np" in service["command"]


def models() -> dict[str, str]:
    """llama.cpp service -> the model it serves (its `--alias`, what clients name)."""
    return {name: option(s["command"], "--alias") for name, s in llamacpp_services().items()}


def test_two_models_declared_in_the_balancer() -> None:
    served = models()
    assert len(set(served.values())) == len(served) == 2, served
    (balancer,) = rower_services("balancer")
    args = parsed(balancer)
    assert sorted(args.models) == sorted(served.values())
    assert args.default_model in served.values()


def test_every_rower_command_line_is_accepted_by_rower() -> None:
    names = [*rower_services("agent"), *rower_services("balancer")]
    for name in names:
        parsed(name)
    (balancer,) = rower_services("balancer")
    args = parsed(balancer)
    assert args.management_dashboard_enable
    assert args.metrics_endpoint_enable
    tokens = {parsed(name).management_token for name in names}
    assert len(tokens) == 1, "agents and balancer share one token"
    assert None not in tokens, "the management port is reachable: set a token"


def test_agents_point_at_their_llamacpp_and_the_balancer() -> None:
    (balancer,) = rower_services("balancer")
    management = parsed(balancer).management_addr
    llamacpp = llamacpp_services()
    served = set()
    for name in rower_services("agent"):
        args = parsed(name)
        assert [(a.host, a.port) for a in args.management_addr] == [(balancer, management.port)]
        local = args.local_llamacpp_addr
        assert local.host in llamacpp, f"{name}: {local} is no llama.cpp service"
        assert local.port == llamacpp_port(llamacpp[local.host])
        served.add(local.host)
    assert served == set(llamacpp), "one agent beside each llama.cpp server"


def test_ports_agree_between_flags_healthchecks_and_publishing() -> None:
    (name,) = rower_services("balancer")
    balancer = services()[name]
    args = parsed(name)
    listening = {args.management_addr.port, args.reverseproxy_addr.port}
    for mapping in balancer["ports"]:
        host_ip, _, container_port = str(mapping).rpartition(":")
        assert host_ip.startswith("127.0.0.1:"), f"{mapping}: publish on loopback"
        assert int(container_port) in listening
    health = environment(balancer)["HEALTHCHECK_URL"]
    assert health == f"http://127.0.0.1:{args.management_addr.port}/health"

    for service in llamacpp_services().values():
        test = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{llamacpp_port(service)}/health" in test

    exporter = services()["statsd-exporter"]["command"]
    statsd = args.statsd_addr
    assert statsd.host == "statsd-exporter"
    assert option(exporter, "--statsd.listen-udp") == f":{statsd.port}"

    prometheus = yaml.safe_load((EXAMPLE / "prometheus.yml").read_text())
    targets = {
        job["job_name"]: (job.get("metrics_path", "/metrics"), job["static_configs"][0]["targets"])
        for job in prometheus["scrape_configs"]
    }
    assert targets["rower-balancer"] == ("/metrics", [f"{name}:{args.management_addr.port}"])
    web = option(exporter, "--web.listen-address")
    assert targets["statsd-exporter"] == ("/metrics", [f"statsd-exporter{web}"])
    mounted = [v for v in services()["prometheus"]["volumes"] if "prometheus.yml" in v]
    assert mounted
    assert (EXAMPLE / mounted[0].split(":")[0]).is_file()


# --- the same fleet as plain processes -------------------------------------------------------

_ADDRESS = re.compile(r"^(?P<scheme>https?://)?(?P<host>[\w.-]+):(?P<port>\d+)(?P<path>/.*)?$")


class Loopback:
    """Maps each `(service, port)` of the compose file to a free port on 127.0.0.1."""

    def __init__(self) -> None:
        self.ports: dict[tuple[str, int], int] = {}

    def port(self, service: str, port: int) -> int:
        return self.ports.setdefault((service, port), free_port())

    def rewrite(self, value: str, *, service: str) -> str:
        """`0.0.0.0:P` (listen) and `name:P` (connect), bare or in a URL -> `127.0.0.1:FREE`."""
        match = _ADDRESS.match(value)
        if match is None:
            return value
        host, port = match["host"], int(match["port"])
        owner = service if host in {"0.0.0.0", "127.0.0.1"} else host
        address = f"127.0.0.1:{self.port(owner, port)}"
        return f"{match['scheme'] or ''}{address}{match['path'] or ''}"

    def command(self, name: str, service: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        argv = [self.rewrite(str(a), service=name) for a in service["command"]]
        env = {k: self.rewrite(v, service=name) for k, v in environment(service).items()}
        return argv, env


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as answer:
        assert answer.status == 200
        return bytes(answer.read())


def eventually_agents(management: str, count: int) -> list[dict[str, Any]]:
    deadline = time.monotonic() + 15
    agents: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        agents = json.loads(get(f"{management}/api/v1/agents"))["agents"]
        if len(agents) == count and all(a["status"]["slots_idle"] > 0 for a in agents):
            return agents
        time.sleep(0.05)
    raise AssertionError(f"expected {count} usable agents, got {agents}")


def test_the_compose_topology_runs_as_processes(statsd_socket: socket.socket) -> None:
    loopback = Loopback()
    exporter_port = int(option(services()["statsd-exporter"]["command"], "--statsd.listen-udp")[1:])
    loopback.ports[("statsd-exporter", exporter_port)] = statsd_socket.getsockname()[1]
    with ExitStack() as stack:

        def start(process: Process) -> Process:
            return stack.enter_context(running(process))

        sims = {}
        for name, service in llamacpp_services().items():
            port = loopback.port(name, llamacpp_port(service))
            slots = option(service["command"], "-np")
            model = ("--model", option(service["command"], "--alias"))
            sims[name] = start(
                rower("sim", "--addr", f"127.0.0.1:{port}", "--slots", slots, *model)
            )
        (balancer_name,) = rower_services("balancer")
        argv, env = loopback.command(balancer_name, services()[balancer_name])
        # The compose file keeps StatsD's 10 s default; the flag would win over this variable.
        balancer = start(rower(*argv, env={**env, "ROWER_STATSD_REPORTING_INTERVAL": "200"}))
        management = f"http://{option(argv, '--management-addr')}"
        proxy = f"http://{option(argv, '--reverseproxy-addr')}"
        for name, sim in sims.items():
            port = loopback.port(name, llamacpp_port(llamacpp_services()[name]))
            sim.wait_http(f"http://127.0.0.1:{port}/health")
        balancer.wait_http(env["HEALTHCHECK_URL"])
        for name, service in rower_services("agent").items():
            agent_argv, agent_env = loopback.command(name, service)
            start(rower(*agent_argv, env=agent_env))

        agents = eventually_agents(management, 2)
        served = models()
        assert {a["status"]["agent_name"]: a["status"]["model"] for a in agents} == served

        balancer_args = parsed(balancer_name)
        asked = [*served.values(), None]  # None: the default model's
        for model in asked:
            body: dict[str, Any] = {"messages": [{"role": "user", "content": "Hi"}]}
            if model is not None:
                body["model"] = model
            request = urllib.request.Request(
                f"{proxy}/v1/chat/completions",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=15) as answer:
                assert answer.status == 200
                assert json.load(answer)["choices"][0]["message"]["content"]
        listed = json.loads(get(f"{proxy}/v1/models"))
        assert sorted(entry["id"] for entry in listed["data"]) == sorted(served.values())

        metrics = get(f"{management}/metrics").decode()
        for name in ("rower_slots_idle", "rower_slots_processing", "rower_requests_buffered"):
            assert re.search(rf"^{name} ", metrics, re.MULTILINE), f"{name} not in /metrics"
        # Each model's requests went to its own servers (and the unnamed one to the default).
        for model in served.values():
            count = 1 + (model == balancer_args.default_model)
            line = rf'^rower_model_proxied_requests_total{{model="{model}",status="200"}} {count}'
            assert re.search(line, metrics, re.MULTILINE), f"{model}: {count} answers"
        assert get(f"{management}/dashboard")

        datagrams = b""
        for model in served.values():
            gauge = f"rower.model.{model.replace('.', '_')}.slots_idle:".encode()
            while gauge not in datagrams:
                datagrams += statsd_socket.recv(4096) + b"\n"
        assert b"rower.slots_idle:" in datagrams
        assert b"|g" in datagrams


def test_loopback_rewrites_listen_and_connect_addresses() -> None:
    loopback = Loopback()
    listen = loopback.rewrite("0.0.0.0:8085", service="balancer")
    connect = loopback.rewrite("balancer:8085", service="agent-1")
    assert listen == connect
    assert Address.parse(listen).host == "127.0.0.1"
    assert loopback.rewrite("--slots", service="x") == "--slots"
    health = loopback.rewrite("http://127.0.0.1:8085/health", service="balancer")
    assert health == f"http://{listen}/health"
