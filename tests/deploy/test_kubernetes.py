"""deploy/kubernetes/: structure, ports, probes and flags, checked without a cluster.

Every `rower` container's arguments and `ROWER_*` variables go through `rower`'s own parser
(downward-API and Secret values replaced by examples); Services must select pods and reach a
declared port; KEDA must scale the llama-server Deployment on metrics a balancer serves.
"""

from __future__ import annotations

import re
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


def test_the_agent_sidecar_points_at_its_llama_server_and_the_balancer() -> None:
    ((name, agent),) = rower_containers("agent").items()
    deployment = name.split("/")[0]
    llama = containers()[f"{deployment}/llama-server"]
    llama_port = int(llama["args"][llama["args"].index("--port") + 1])
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

    (balancer,) = rower_containers("balancer").values()
    management_port = parsed(balancer).management_addr.port
    (target,) = args.management_addr
    service = of_kind("Service")[target.host]
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == target.port]
    assert named_ports(balancer)[port["targetPort"]] == management_port


def scaled_object() -> dict[str, Any]:
    (found,) = of_kind("ScaledObject").values()
    return found


def test_keda_scales_llama_server_from_zero() -> None:
    spec = scaled_object()["spec"]
    assert spec["scaleTargetRef"]["kind"] == "Deployment"
    assert spec["scaleTargetRef"]["name"] in of_kind("Deployment")
    target = of_kind("Deployment")[spec["scaleTargetRef"]["name"]]
    images = [c["image"] for c in target["spec"]["template"]["spec"]["containers"]]
    assert any(image.startswith("ghcr.io/ggml-org/llama.cpp:") for image in images)
    assert spec["minReplicaCount"] == 0
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus"
    assert float(trigger["metadata"]["activationThreshold"]) == 0
    llama = containers()[f"{spec['scaleTargetRef']['name']}/llama-server"]
    slots = llama["args"][llama["args"].index("-np") + 1]
    assert trigger["metadata"]["threshold"] == slots, "threshold = slots per pod"


@pytest.mark.timeout(60)
def test_the_keda_query_uses_metrics_a_balancer_serves() -> None:
    query = scaled_object()["spec"]["triggers"][0]["metadata"]["query"]
    names = set(re.findall(r"\brower_\w+", query))
    assert {"rower_requests_buffered", "rower_slots_processing"} <= names
    management = f"127.0.0.1:{free_port()}"
    with running(
        rower(
            "balancer",
            "--management-addr",
            management,
            "--reverseproxy-addr",
            f"127.0.0.1:{free_port()}",
            "--metrics-endpoint-enable",
        )
    ) as balancer:
        balancer.wait_http(f"http://{management}/health")
        with urllib.request.urlopen(f"http://{management}/metrics", timeout=5) as answer:
            served = answer.read().decode()
    for name in names:
        assert re.search(rf"^{name} ", served, re.MULTILINE), f"/metrics has no {name}"
