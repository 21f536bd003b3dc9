"""The facts about llama-server that Rower depends on, checked against the real thing.

A llama.cpp upgrade that changes one of them fails here first, by name, instead of somewhere
deep in a balancer test. Plain standard-library HTTP on purpose: nothing of Rower's runs here.
"""

from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.real_llama_server import (
    LlamaCppArtifacts,
    LlamaRouter,
    LlamaServer,
    LlamaServerFactory,
    start_llama_router,
)

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

# 1.5 s (idle machine) to 8 s (busy) of generation: long enough to watch a busy slot.
LONG_GENERATION = {"n_predict": 1900, "ignore_eos": True}


def request(
    url: str, body: dict[str, Any] | None = None, *, timeout: float = 30
) -> tuple[int, Any]:
    """GET (or POST `body` as JSON); the status and the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def slots(server: LlamaServer) -> list[dict[str, Any]]:
    status, body = request(f"{server.url}/slots")
    assert status == 200, body
    assert isinstance(body, list)
    return body


def wait_until(condition: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> float:
    """Seconds until `condition()` held; fails after `timeout`."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(interval)
    return time.monotonic() - began


def open_stream(server: LlamaServer, body: dict[str, Any]) -> socket.socket:
    """Send a streaming POST /completion by hand and wait for its first bytes."""
    payload = json.dumps({**body, "stream": True}).encode()
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.sendall(
        b"POST /completion HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (server.addr.encode(), len(payload), payload)
    )
    first = sock.recv(4096)
    assert first.startswith(b"HTTP/1.1 200"), first
    return sock


def test_health_answers_ok(llama_server: LlamaServerFactory) -> None:
    server = llama_server()
    assert request(f"{server.url}/health") == (200, {"status": "ok"})


def test_props_report_total_slots_and_model(llama_server: LlamaServerFactory) -> None:
    server = llama_server(slots=3)
    status, props = request(f"{server.url}/props")
    assert status == 200
    assert props["total_slots"] == 3
    assert props["model_path"].endswith(".gguf")


def test_idle_slots_have_id_n_ctx_and_is_processing(llama_server: LlamaServerFactory) -> None:
    server = llama_server(slots=2, ctx=2048)
    idle = slots(server)
    assert [slot["id"] for slot in idle] == [0, 1]
    for slot in idle:
        assert slot["n_ctx"] == 2048
        assert slot["is_processing"] is False


def test_completion_reports_slot_and_timings(llama_server: LlamaServerFactory) -> None:
    server = llama_server()
    status, body = request(
        f"{server.url}/completion", {"prompt": "Hello", "n_predict": 8, "ignore_eos": True}
    )
    assert status == 200, body
    assert isinstance(body["content"], str)
    assert body["id_slot"] in (0, 1)
    assert body["timings"]["predicted_n"] == 8
    assert body["timings"]["prompt_n"] >= 1


def test_slot_is_processing_during_generation_and_freed_when_client_drops(
    llama_server: LlamaServerFactory,
) -> None:
    server = llama_server(slots=1)
    stream = open_stream(server, {"prompt": "Once upon a time", **LONG_GENERATION})
    try:
        assert [slot["is_processing"] for slot in slots(server)] == [True]
        status, body = request(f"{server.url}/slots?fail_on_no_slot=1")
        assert status == 503, body
    finally:
        stream.close()
    freed_after = wait_until(lambda: not slots(server)[0]["is_processing"], timeout=1.0)
    print(f"slot freed {freed_after:.3f} s after the client dropped the stream")


def test_no_slots_flag_makes_slots_endpoint_501(llama_server: LlamaServerFactory) -> None:
    server = llama_server(extra_args=["--no-slots"])
    status, body = request(f"{server.url}/slots")
    assert status == 501
    assert body["error"]["code"] == 501
    assert body["error"]["type"] == "not_supported_error"


def test_chat_completions_with_the_default_template(llama_server: LlamaServerFactory) -> None:
    server = llama_server()
    messages = [{"role": "user", "content": "Hi"}]
    status, body = request(
        f"{server.url}/v1/chat/completions", {"messages": messages, "max_tokens": 8}
    )
    assert status == 200, body
    assert isinstance(body["choices"][0]["message"]["content"], str)


def test_streamed_chat_completion_sends_data_chunks_then_done(
    llama_server: LlamaServerFactory,
) -> None:
    server = llama_server()
    body = {
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 16,
        "ignore_eos": True,
        "stream": True,
    }
    req = urllib.request.Request(
        f"{server.url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as answer:
        assert answer.status == 200
        assert answer.headers["Content-Type"].startswith("text/event-stream")
        events = [line for line in answer.read().decode().splitlines() if line]
    assert all(line.startswith("data: ") for line in events), events
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert len(chunks) >= 5
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)


def test_requests_beyond_the_slots_wait_and_all_succeed(
    llama_server: LlamaServerFactory,
) -> None:
    server = llama_server(slots=1)
    body = {"prompt": "Count with me", "n_predict": 400, "ignore_eos": True}
    with ThreadPoolExecutor(3) as pool:
        answers = list(
            pool.map(lambda _: request(f"{server.url}/completion", body, timeout=50), range(3))
        )
    for status, answer in answers:
        assert status == 200, answer
        assert answer["id_slot"] == 0
        assert answer["timings"]["predicted_n"] == 400


def test_slots_show_task_id_and_progress_as_the_agent_reads_them(
    llama_server: LlamaServerFactory,
) -> None:
    server = llama_server(slots=2)
    (never_used, *_) = slots(server)
    assert "id_task" not in never_used
    assert "next_token" not in never_used
    stream = open_stream(server, {"prompt": "Once upon a time", **LONG_GENERATION})
    try:
        busy = next(slot for slot in slots(server) if slot["is_processing"])
    finally:
        stream.close()
    assert isinstance(busy["id_task"], int)
    assert busy["id_task"] >= 0
    # This build: a one-element list (older builds sent the object itself).
    (progress,) = busy["next_token"]
    assert set(progress) >= {"has_next_token", "has_new_line", "n_remain", "n_decoded"}
    assert progress["has_next_token"] is True
    assert isinstance(progress["n_decoded"], int)
    assert isinstance(progress["n_remain"], int)
    assert progress["n_decoded"] + progress["n_remain"] == LONG_GENERATION["n_predict"]
    wait_until(lambda: not any(slot["is_processing"] for slot in slots(server)), timeout=5)

    # A finished task's id stays on its slot and task ids grow, but its progress is reset.
    status, body = request(f"{server.url}/completion", {"prompt": "Hi", "n_predict": 3})
    assert status == 200, body
    done = next(slot for slot in slots(server) if slot["id"] == body["id_slot"])
    assert done["is_processing"] is False
    assert done["id_task"] > busy["id_task"]
    assert done["next_token"][0]["has_next_token"] is False
    assert (done["next_token"][0]["n_decoded"], done["next_token"][0]["n_remain"]) == (0, -1)
    assert (done["n_prompt_tokens_processed"], done["n_prompt_tokens_cache"]) == (0, 0)
    # The prompt text is shown only with --slots-debug.
    assert "prompt" not in done
    assert "generated" not in done
    stream = open_stream(server, {"prompt": "Forever", "n_predict": -1, "ignore_eos": True})
    try:
        unlimited = next(slot for slot in slots(server) if slot["is_processing"])
    finally:
        stream.close()
    assert unlimited["next_token"][0]["n_remain"] == -1


ALPHA = "alpha bravo charlie delta " * 60
BRAVO = "xray yankee zulu whiskey " * 60


@pytest.mark.parametrize("cache_ram_mib", [0, 8])
def test_a_prompt_pushed_out_of_its_slot_comes_back_from_the_host_ram_cache(
    llama_server: LlamaServerFactory, cache_ram_mib: int
) -> None:
    # The rules `rower sim --cache-ram-tokens` models (docs/sim.md): a slot taken by a
    # dissimilar prompt first saves what it held to host RAM; a later prompt that shares most
    # of a saved state gets it restored into its slot.
    server = llama_server(slots=1, extra_args=["--cache-ram", str(cache_ram_mib)])

    def cached(prompt: str) -> tuple[int, int]:
        status, body = request(
            f"{server.url}/completion", {"prompt": prompt, "n_predict": 4, "ignore_eos": True}
        )
        assert status == 200, body
        return body["timings"]["cache_n"], body["timings"]["prompt_n"]

    assert cached(ALPHA)[0] == 0
    assert cached(BRAVO)[0] <= 1  # only BOS in common
    cache_n, prompt_n = cached(ALPHA + " echo foxtrot")
    if cache_ram_mib:
        assert cache_n >= 0.9 * (cache_n + prompt_n), (cache_n, prompt_n)
    else:
        assert cache_n <= 1, (cache_n, prompt_n)


# --- What a server serves: names, aliases, router mode ------------------------------------------


def test_alias_names_the_model_in_props_and_v1_models(llama_server: LlamaServerFactory) -> None:
    # The agent reports /v1/models' id as the model and the other aliases as model_aliases.
    server = llama_server(extra_args=["--alias", "tiny-chat,tiny-fast"])
    status, props = request(f"{server.url}/props")
    assert status == 200
    assert props["model_alias"] == "tiny-chat"
    assert props["model_path"].endswith(".gguf")
    status, models = request(f"{server.url}/v1/models")
    assert status == 200
    ((listed,),) = [models["data"]]
    assert (listed["id"], listed["aliases"]) == ("tiny-chat", ["tiny-chat", "tiny-fast"])
    assert "status" not in listed  # load states are a router's
    # A single-model server answers with its own name, whatever the request asked for.
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    status, answer = request(f"{server.url}/v1/chat/completions", body)
    assert (status, answer["model"]) == (200, "tiny-chat")


def test_without_alias_the_model_is_named_by_its_path(llama_server: LlamaServerFactory) -> None:
    server = llama_server()
    _, props = request(f"{server.url}/props")
    _, models = request(f"{server.url}/v1/models")
    ((listed,),) = [models["data"]]
    assert listed["id"] == props["model_alias"] == props["model_path"]
    assert listed["aliases"] == [listed["id"]]


def router_models(router: LlamaRouter) -> dict[str, dict[str, Any]]:
    status, body = request(f"{router.url}/v1/models")
    assert status == 200, body
    return {model["id"]: model for model in body["data"]}


def load_states(router: LlamaRouter) -> dict[str, str]:
    return {name: model["status"]["value"] for name, model in router_models(router).items()}


def test_router_props_v1_models_and_slots(llama_router: LlamaRouter) -> None:
    router = llama_router
    status, props = request(f"{router.url}/props")
    assert status == 200
    assert props["role"] == "router"
    assert "total_slots" not in props
    assert props["model_alias"] == "llama-server"  # a placeholder, not a model
    assert request(f"{router.url}/health") == (200, {"status": "ok"})

    models = router_models(router)
    assert sorted(models) == ["tiny-a", "tiny-b"]
    for model in models.values():
        assert model["aliases"] == []  # a router's aliases leave the id out
        assert model["status"]["value"] == "unloaded"
        assert "failed" not in model["status"]

    # Without a model, /slots and every POST are refused; an unknown model too.
    status, body = request(f"{router.url}/slots")
    assert (status, body["error"]["message"]) == (400, "model name is missing from the request")
    status, body = request(f"{router.url}/completion", {"prompt": "x", "n_predict": 1})
    assert status == 400, body
    status, body = request(f"{router.url}/slots?model=nope")
    assert (status, body["error"]["message"]) == (400, "model 'nope' not found")

    # autoload=false: a model that is not loaded is refused, and stays unloaded.
    status, body = request(f"{router.url}/slots?model=tiny-a&autoload=false")
    assert (status, body["error"]["message"]) == (400, "model is not loaded")
    assert load_states(router) == {"tiny-a": "unloaded", "tiny-b": "unloaded"}

    # A request naming a model loads it; then its /slots answers for it alone.
    status, body = request(
        f"{router.url}/completion", {"model": "tiny-a", "prompt": "Hi", "n_predict": 2}
    )
    assert (status, body["model"]) == (200, "tiny-a")
    assert load_states(router) == {"tiny-a": "loaded", "tiny-b": "unloaded"}
    status, slots = request(f"{router.url}/slots?model=tiny-a&autoload=false")
    assert status == 200, slots
    assert [slot["id"] for slot in slots] == list(range(router.slots))
    assert all(slot["n_ctx"] == router.ctx for slot in slots)
    assert sum("id_task" in slot for slot in slots) == 1
    # A loaded model's /v1/models entry carries its child's meta too.
    assert router_models(router)["tiny-a"]["meta"]["n_ctx"] == router.ctx


def test_router_slots_of_an_unloaded_model_load_it(llama_router: LlamaRouter) -> None:
    # Why the agent asks only for loaded models, and with autoload=false: a plain
    # /slots?model=X is a load.
    router = llama_router
    began = time.monotonic()
    status, slots = request(f"{router.url}/slots?model=tiny-b")
    took = time.monotonic() - began
    assert status == 200, slots
    assert len(slots) == router.slots
    assert load_states(router) == {"tiny-a": "unloaded", "tiny-b": "loaded"}
    print(f"/slots?model=tiny-b loaded it in {took:.2f} s")


def test_router_loading_beyond_models_max_unloads_another(
    llamacpp_artifacts: LlamaCppArtifacts, tmp_path: Path
) -> None:
    router = start_llama_router(llamacpp_artifacts, tmp_path / "models", models_max=1)
    try:
        status, _ = request(f"{router.url}/slots?model=tiny-a")
        assert status == 200
        assert load_states(router) == {"tiny-a": "loaded", "tiny-b": "unloaded"}
        status, _ = request(f"{router.url}/slots?model=tiny-b")
        assert status == 200
        wait_until(
            lambda: load_states(router) == {"tiny-a": "unloaded", "tiny-b": "loaded"}, timeout=10
        )
    finally:
        router.close()
