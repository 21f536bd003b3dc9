"""Prometheus and StatsD from a real balancer process, after real traffic through the proxy."""

from __future__ import annotations

import concurrent.futures
import json
import signal
import socket
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.integration.fleet import OBSERVABILITY, Fleet, eventually

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(fleet: Fleet, path: str = "/api/v1/metrics") -> tuple[str, Samples]:
    with urllib.request.urlopen(fleet.management + path, timeout=5) as answer:
        content_type = answer.headers["Content-Type"]
        text = answer.read().decode()
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    return content_type, samples


def post(url: str, body: dict[str, object]) -> int:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_metrics_after_real_traffic(fleet: Fleet, statsd_socket: socket.socket) -> None:
    statsd_port = statsd_socket.getsockname()[1]
    fleet.balancer(
        *OBSERVABILITY,
        "--statsd-addr",
        f"127.0.0.1:{statsd_port}",
        "--statsd-prefix",
        "gpu",
        "--statsd-reporting-interval",
        "100",
    )
    fleet.sim_with_agent("alpha", slots=2, speed=1000)
    fleet.sim_with_agent("beta", slots=3, speed=1000)

    for _ in range(3):
        assert post(fleet.proxy + "/v1/completions", {"prompt": "hi", "max_tokens": 4}) == 200
    assert get(fleet.proxy + "/v1/models") == 200
    assert get(fleet.proxy + "/slots") == 403

    content_type, got = scrape(fleet)
    assert content_type.startswith("text/plain")
    assert got[("rower_slots_idle", ())] == 5
    assert got[("rower_slots_processing", ())] == 0
    assert got[("rower_requests_buffered", ())] == 0
    assert got[("rower_agents_registered", ())] == 2
    agents = fleet.agents_view()["agents"]
    ids = {agent["status"]["agent_name"]: agent["agent_id"] for agent in agents}
    beta = (("agent_id", ids["beta"]), ("agent_name", "beta"), ("model", "sim"))
    assert got[("rower_agent_slots_total", beta)] == 3
    assert got[("rower_agent_slots_idle", beta)] == 3
    assert got[("rower_agent_usable", beta)] == 1
    completions = (("path", "/v1/completions"), ("status", "200"))
    assert got[("rower_proxied_requests_total", completions)] == 3
    assert got[("rower_proxied_requests_total", (("path", "other"), ("status", "200")))] == 1
    assert got[("rower_buffer_wait_seconds_count", ())] == 3
    assert got[("rower_time_to_first_byte_seconds_count", (("path", "/v1/completions"),))] == 3
    assert got[("rower_request_duration_seconds_count", (("path", "/v1/completions"),))] == 3
    assert got[("rower_buffer_full_rejections_total", ())] == 0
    assert got[("rower_upstream_errors_total", ())] == 0
    assert got[("rower_upstream_quarantines_total", ())] == 0
    assert scrape(fleet, "/metrics")[1][("rower_agents_registered", ())] == 2

    # The socket holds older datagrams too (before the agents came): read until current.
    expected = {
        "gpu.slots_idle": "5|g",
        "gpu.slots_processing": "0|g",
        "gpu.requests_buffered": "0|g",
        "gpu.model.sim.slots_idle": "5|g",
        "gpu.model.sim.slots_processing": "0|g",
        "gpu.model.sim.requests_buffered": "0|g",
    }
    latest: dict[str, str] = {}

    def statsd_shows_the_fleet() -> bool:
        name, _, value = statsd_socket.recv(1024).decode().partition(":")
        latest[name] = value
        return latest == expected

    eventually(
        statsd_shows_the_fleet, timeout=15.0, what=f"StatsD gauges {expected}, last {latest}"
    )


def test_refused_connection_counts_a_quarantine(fleet: Fleet) -> None:
    fleet.balancer(*OBSERVABILITY, "--buffered-request-timeout", "500")
    # A long interval: the agent does not notice the dead server before the request does.
    sim, agent = fleet.sim_with_agent("solo", slots=1, interval_ms=5000)
    agent.signal(signal.SIGSTOP)
    sim.process.kill()
    status = post(fleet.proxy + "/v1/completions", {"prompt": "hi", "max_tokens": 1})
    assert status == 504
    _, got = scrape(fleet)
    assert got[("rower_upstream_quarantines_total", ())] == 1
    assert got[("rower_buffer_timeouts_total", ())] == 1
    assert (
        got[("rower_proxied_requests_total", (("path", "/v1/completions"), ("status", "504")))] == 1
    )


def test_metrics_endpoint_is_off_unless_enabled(fleet: Fleet) -> None:
    fleet.balancer()
    assert get(fleet.management + "/metrics") == 404
    assert get(fleet.management + "/dashboard") == 404


def test_metrics_per_model_in_a_two_model_fleet(fleet: Fleet) -> None:
    fleet.balancer(*OBSERVABILITY, "--model", "alpha", "--model", "beta", "--model", "embed")
    for model in ("alpha", "beta"):
        sim = fleet.sim(slots=1, speed=50, flags=("--model", model))
        fleet.agent(sim, name=model)
    fleet.wait_agents(2)

    def chat(model: str, tokens: int) -> int:
        messages = [{"role": "user", "content": "hi"}]
        body = {"model": model, "messages": messages, "max_tokens": tokens}
        return post(fleet.proxy + "/v1/chat/completions", body)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        # alpha's one slot busy for ~2 s, and one request in its buffer behind it.
        busy = [pool.submit(chat, "alpha", 100) for _ in range(2)]

        def alpha_is_full() -> bool:
            got = scrape(fleet)[1]
            return got.get(("rower_model_requests_buffered", (("model", "alpha"),))) == 1

        eventually(alpha_is_full, timeout=10.0, what="one alpha request buffered")
        got = scrape(fleet)[1]
        assert got[("rower_model_slots_processing", (("model", "alpha"),))] == 1
        assert got[("rower_model_slots_idle", (("model", "alpha"),))] == 0
        assert got[("rower_model_slots_idle", (("model", "beta"),))] == 1
        assert got[("rower_model_requests_buffered", (("model", "beta"),))] == 0
        # Declared, no server: 0, not missing (an autoscaler's query needs a value).
        assert got[("rower_model_requests_buffered", (("model", "embed"),))] == 0
        assert got[("rower_model_agents", (("model", "embed"),))] == 0
        assert chat("beta", 2) == 200  # not behind alpha's queue
        assert [future.result() for future in busy] == [200, 200]
    for name in ("gpt-4o", "llama-3-70b"):
        assert chat(name, 1) == 404

    got = scrape(fleet)[1]
    requests = {
        labels: value
        for (name, labels), value in got.items()
        if name == "rower_model_proxied_requests_total"
    }
    assert requests == {
        (("model", "alpha"), ("status", "200")): 2,
        (("model", "beta"), ("status", "200")): 1,
        (("model", "(unknown)"), ("status", "404")): 2,
    }
    assert got[("rower_model_buffer_wait_seconds_count", (("model", "alpha"),))] == 2
    assert got[("rower_model_buffer_wait_seconds_sum", (("model", "alpha"),))] > 1.0
    assert got[("rower_model_buffer_wait_seconds_sum", (("model", "beta"),))] < 0.5
    assert got[("rower_model_time_to_first_byte_seconds_count", (("model", "beta"),))] == 1
