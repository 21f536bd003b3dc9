"""deploy/kubernetes/: structure, ports, probes and flags, checked without a cluster.

Every `rower` container's arguments and `ROWER_*` variables go through `rower`'s own parser
(downward-API and Secret values replaced by examples); Services must select pods and reach a
declared port; each model has its llama-server Deployment, declared in the balancer, and its
KEDA ScaledObject scaling that Deployment on that model's series, which a balancer serves.
"""

from __future__ import annotations

import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.rower_cli import check_command_line
from tests.processes import free_port, rower, running

MANIFESTS = Path(__file__).parents[2] / "deploy" / "kubernetes"
API_VERSIONS = {
    "Deployment": "apps/v1",
    "Service": "v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
# What the downward API and the Secret give at run time, for parsing.
EXAMPLE_VALUES = {"status.podIP": "10.1.2.3", "metadata.name": "llama-server-7d9f-x2x"}


def documents() -> list[dict[str, Any]]:
    found = []
    for path in sorted(MANIFESTS.glob("*.yaml")):
        found += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return found


def of_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in documents() if d["kind"] == kind}


def containers() -> dict[str, dict[str, Any]]:
    """`deployment/container` -> container."""
    return {
        f"{name}/{c['name']}": c
        for name, deployment in of_kind("Deployment").items()
        for c in deployment["spec"]["template"]["spec"]["containers"]
    }


def rower_containers(command: str) -> dict[str, dict[str, Any]]:
    return {
        name: c
        for name, c in containers().items()
        if c["image"].startswith("rower:") and c["args"][0] == command
    }


def environment(container: dict[str, Any]) -> dict[str, str]:
    """The container's variables as the kubelet sets them, `$(NAME)` expanded."""
    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], str(item["value"]))
        elif "fieldRef" in item["valueFrom"]:
            value = EXAMPLE_VALUES[item["valueFrom"]["fieldRef"]["fieldPath"]]
        else:
            assert "secretKeyRef" in item["valueFrom"], item
            value = "secret"
        env[item["name"]] = value
    return env


def parsed(container: dict[str, Any]) -> Any:
    return check_command_line(container["args"], environment(container))


def named_ports(container: dict[str, Any]) -> dict[str | int, int]:
    ports: dict[str | int, int] = {}
    for port in container.get("ports", []):
        ports[port["containerPort"]] = port["containerPort"]
        if "name" in port:
            ports[port["name"]] = port["containerPort"]
    return ports


def test_kinds_and_api_versions() -> None:
    kinds = [d["kind"] for d in documents()]
    assert sorted(set(kinds)) == sorted(API_VERSIONS)
    for document in documents():
        assert document["apiVersion"] == API_VERSIONS[document["kind"]]
    (kustomization,) = [d for d in documents() if d["kind"] == "Kustomization"]
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_deployment_selectors_match_their_pods() -> None:
    for name, deployment in of_kind("Deployment").items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= labels.items(), name


def test_services_select_a_pod_and_reach_a_declared_port() -> None:
    deployments = of_kind("Deployment")
    assert {"rower-proxy", "rower-management"} <= set(of_kind("Service"))
    for name, service in of_kind("Service").items():
        selector = service["spec"]["selector"]
        chosen = [
            d
            for d in deployments.values()
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(chosen) == 1, f"{name} selects {len(chosen)} Deployments"
        ports: dict[str | int, int] = {}
        for container in chosen[0]["spec"]["template"]["spec"]["containers"]:
            ports |= named_ports(container)
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"{name}: {port}"


def test_rower_command_lines_are_accepted_by_rower() -> None:
    assert rower_containers("balancer")
    assert rower_containers("agent")
    for container in [*rower_containers("balancer").values(), *rower_containers("agent").values()]:
        parsed(container)


def test_the_balancer_listens_on_its_container_ports_and_probes_health() -> None:
    (balancer,) = rower_containers("balancer").values()
    args = parsed(balancer)
    ports = named_ports(balancer)
    assert ports["management"] == args.management_addr.port
    assert ports["proxy"] == args.reverseproxy_addr.port
    assert args.metrics_endpoint_enable
    assert args.management_token == "secret"
    for probe in ("readinessProbe", "livenessProbe"):
        check = balancer[probe]["httpGet"]
        assert check["path"] == "/health"
        assert ports[check["port"]] == args.management_addr.port
    (deployment,) = [d for n, d in of_kind("Deployment").items() if n == "rower-balancer"]
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == args.management_addr.port
    assert annotations["prometheus.io/path"] == "/metrics"


def test_each_agent_sidecar_points_at_its_llama_server_and_the_balancer() -> None:
    agents = rower_containers("agent")
    assert len(agents) == len(llama_deployments())
    (balancer,) = rower_containers("balancer").values()
    management_port = parsed(balancer).management_addr.port
    for name, agent in agents.items():
        deployment = name.split("/")[0]
        llama = containers()[f"{deployment}/llama-server"]
        llama_port = int(option(llama["args"], "--port"))
        assert "--slots" in llama["args"]
        assert named_ports(llama)["http"] == llama_port
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            check = llama[probe]["httpGet"]
            assert check["path"] == "/health"
            assert named_ports(llama)[check["port"]] == llama_port

        args = parsed(agent)
        assert (args.local_llamacpp_addr.host, args.local_llamacpp_addr.port) == (
            "127.0.0.1",
            llama_port,
        )
        external = args.external_llamacpp_addr
        assert (external.host, external.port) == (EXAMPLE_VALUES["status.podIP"], llama_port)
        assert args.name == EXAMPLE_VALUES["metadata.name"]

        (target,) = args.management_addr
        service = of_kind("Service")[target.host]
        (port,) = [p for p in service["spec"]["ports"] if p["port"] == target.port]
        assert named_ports(balancer)[port["targetPort"]] == management_port


def option(argv: list[str], flag: str) -> str:
    assert flag in argv, f"{flag} not in {argv}"
    return str(argv[argv.index(flag) + 1])


def llama_deployments() -> dict[str, str]:
    """Deployments running llama-server -> the model they serve (its `--alias`)."""
    found = {}
    for name, deployment in of_kind("Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["image"].startswith("ghcr.io/ggml-org/llama.cpp:"):
                found[name] = option(container["args"], "--alias")
    return found


def test_two_models_each_with_its_own_deployment_declared_in_the_balancer() -> None:
    models = llama_deployments()
    assert len(set(models.values())) == len(models) >= 2, models
    (balancer,) = rower_containers("balancer").values()
    args = parsed(balancer)
    # Declared: each model buffers (and is exported) before its first pod is up.
    assert sorted(args.models) == sorted(models.values())
    assert args.default_model in models.values()
    # No Deployment's selector takes another's pods (each scales on its own model).
    deployments = of_kind("Deployment")
    for name, deployment in deployments.items():
        selector = deployment["spec"]["selector"]["matchLabels"]
        for other, pod in deployments.items():
            labels = pod["spec"]["template"]["metadata"]["labels"]
            assert (other == name) == (selector.items() <= labels.items()), (name, other)


MODEL_SERIES = re.compile(r'\b(rower_\w+)\{model="([^"]+)"\}')
"""A per-model series in a PromQL query: its name and its model."""


def test_keda_scales_each_models_deployment_from_zero_on_that_models_demand() -> None:
    models = llama_deployments()
    scaled = of_kind("ScaledObject")
    targets = [o["spec"]["scaleTargetRef"]["name"] for o in scaled.values()]
    assert sorted(targets) == sorted(models), "one ScaledObject per model's Deployment"
    for name, scaled_object in scaled.items():
        spec = scaled_object["spec"]
        assert spec["scaleTargetRef"]["kind"] == "Deployment"
        deployment = spec["scaleTargetRef"]["name"]
        assert spec["minReplicaCount"] == 0
        (trigger,) = spec["triggers"]
        assert trigger["type"] == "prometheus"
        assert float(trigger["metadata"]["activationThreshold"]) == 0
        llama = containers()[f"{deployment}/llama-server"]
        slots = option(llama["args"], "-np")
        assert trigger["metadata"]["threshold"] == slots, "threshold = slots per pod"
        series = MODEL_SERIES.findall(trigger["metadata"]["query"])
        assert {n for n, _ in series} == {
            "rower_model_requests_buffered",
            "rower_model_slots_processing",
        }, name
        assert {m for _, m in series} == {models[deployment]}, f"{name}: another model's demand"


def keda_series() -> set[tuple[str, str]]:
    return {
        found
        for scaled_object in of_kind("ScaledObject").values()
        for trigger in scaled_object["spec"]["triggers"]
        for found in MODEL_SERIES.findall(trigger["metadata"]["query"])
    }


@pytest.mark.timeout(60)
def test_the_keda_queries_use_series_the_manifests_balancer_serves_with_no_pod_up() -> None:
    series = keda_series()
    assert series
    (balancer,) = rower_containers("balancer").values()
    env = {k: v for k, v in environment(balancer).items() if k in ("ROWER_MODEL",)}
    helped = subprocess.run(
        [sys.executable, "-m", "rower", "balancer", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for flag in ("--model", "--default-model", "--metrics-endpoint-enable"):
        assert re.search(rf"^\s+{flag}\b", helped, re.MULTILINE), f"rower balancer has no {flag}"
    management = f"127.0.0.1:{free_port()}"
    with running(
        rower(
            "balancer",
            "--management-addr",
            management,
            "--reverseproxy-addr",
            f"127.0.0.1:{free_port()}",
            "--metrics-endpoint-enable",
            env=env,
        )
    ) as process:
        process.wait_http(f"http://{management}/health")
        with urllib.request.urlopen(f"http://{management}/metrics", timeout=5) as answer:
            served = answer.read().decode()
    # No agent yet: every model's series is there at 0, so KEDA reads 0, not "no data".
    for name, model in series:
        line = rf'^{name}\{{model="{re.escape(model)}"\}} 0\.0$'
        assert re.search(line, served, re.MULTILINE), f"/metrics has no {name} for {model}"
