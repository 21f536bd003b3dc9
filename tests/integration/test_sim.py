"""`rower sim` as a real process over loopback: llama-server's JSON, slots, cache, deferral,
cancellation and fault switches."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import pytest

from tests.processes import free_port, rower, running

FAST = ("--decode-tokens-per-second", "1000", "--prefill-tokens-per-second", "100000")


def start_sim(*args: str, ready: tuple[int, ...] = (200,)) -> Iterator[str]:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with running(rower("sim", "--addr", f"127.0.0.1:{port}", *args)) as process:
        process.wait_http(f"{base}/health", statuses=ready)
        yield base


@pytest.fixture(scope="module")
def sim() -> Iterator[str]:
    """A healthy sim with 2 slots at 1000 tokens/s."""
    yield from start_sim("--slots", "2", *FAST)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        yield session


async def get_json(http: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with http.get(url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def post_json(
    http: aiohttp.ClientSession, url: str, body: Any, **kwargs: Any
) -> tuple[int, Any]:
    async with http.post(url, json=body, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    """The `data:` payloads of a whole SSE body, checking llama-server's framing on the way."""
    body = (await response.read()).decode()
    assert body.endswith("\n\n")
    events = body.split("\n\n")[:-1]
    assert all(event.startswith("data: ") and "\n" not in event for event in events), body
    return [event.removeprefix("data: ") for event in events]


async def wait_slots(
    http: aiohttp.ClientSession, base: str, processing: int, within: float = 2.0
) -> float:
    """Seconds until `processing` slots are busy; fails after `within` seconds."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        _, slots = await get_json(http, f"{base}/slots")
        if sum(slot["is_processing"] for slot in slots) == processing:
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise AssertionError(f"not {processing} busy slots after {within}s: {slots}")


async def counters(http: aiohttp.ClientSession, base: str) -> dict[str, int]:
    _, props = await get_json(http, f"{base}/props")
    return dict(props["rower_sim"])


# --- state endpoints --------------------------------------------------------------------------


async def test_idle_slots_and_props_look_like_llama_server(
    sim: str, http: aiohttp.ClientSession
) -> None:
    status, slots = await get_json(http, f"{sim}/slots")
    assert status == 200
    assert [slot["id"] for slot in slots] == [0, 1]
    for slot in slots:
        assert slot["is_processing"] is False
        assert slot["speculative"] is False
        assert slot["n_ctx"] == 4096
    status, props = await get_json(http, f"{sim}/props")
    assert status == 200
    assert props["total_slots"] == 2
    assert props["model_alias"] == "sim"
    assert props["model_path"]
    assert props["build_info"]
    assert props["is_sleeping"] is False
    assert set(props["rower_sim"]) >= {"requests_total", "requests_deferred"}


async def test_models_list(sim: str, http: aiohttp.ClientSession) -> None:
    status, models = await get_json(http, f"{sim}/v1/models")
    assert status == 200
    assert models["object"] == "list"
    assert [model["id"] for model in models["data"]] == ["sim"]
    assert models["data"][0]["owned_by"] == "llamacpp"
    # As llama-server's: the id is one of the aliases.
    assert models["data"][0]["aliases"] == ["sim"]


async def test_model_and_aliases_are_named_as_llama_server_names_them(
    http: aiohttp.ClientSession,
) -> None:
    # llama-server -m x.gguf --alias chat,chat-fast: the first alias is the id, all are aliases.
    for base in start_sim("--model", "chat", "--alias", "chat-fast", "--alias", "c", *FAST):
        _, models = await get_json(http, f"{base}/v1/models")
        ((listed,),) = [models["data"]]
        assert (listed["id"], listed["aliases"]) == ("chat", ["chat", "chat-fast", "c"])
        assert [model["name"] for model in models["models"]] == ["chat"]
        _, props = await get_json(http, f"{base}/props")
        assert props["model_alias"] == "chat"
        # A single-model server answers with its own name whatever the request asked for...
        body = {"model": "c", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        _, answer = await post_json(http, f"{base}/v1/chat/completions", body)
        assert answer["model"] == "chat"
        _, answer = await post_json(http, f"{base}/v1/completions", {**body, "prompt": "x"})
        assert answer["model"] == "chat"
        # ...but embeddings echo the requested model.
        _, answer = await post_json(http, f"{base}/v1/embeddings", {"model": "c", "input": "x"})
        assert answer["model"] == "c"


# --- completions ------------------------------------------------------------------------------


async def test_completion_answer_shape_and_timings(sim: str, http: aiohttp.ClientSession) -> None:
    status, answer = await post_json(
        http, f"{sim}/completion", {"prompt": "shape test prompt", "n_predict": 7}
    )
    assert status == 200
    assert answer["stop"] is True
    assert answer["stop_type"] == "limit"
    assert answer["tokens_predicted"] == 7
    assert answer["id_slot"] in (0, 1)
    assert isinstance(answer["content"], str)
    assert answer["content"].count(" ") == 7
    timings = answer["timings"]
    assert timings["predicted_n"] == 7
    assert timings["cache_n"] + timings["prompt_n"] == answer["tokens_evaluated"]
    assert timings["predicted_ms"] > 0


async def test_repeated_prompt_hits_the_prompt_cache(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "a long shared system prompt about caching " * 5, "n_predict": 2}
    _, first = await post_json(http, f"{sim}/completion", body)
    _, second = await post_json(http, f"{sim}/completion", body)
    assert first["timings"]["cache_n"] == 0
    assert second["id_slot"] == first["id_slot"]
    assert second["timings"]["cache_n"] == first["tokens_evaluated"] - 1
    assert second["timings"]["prompt_n"] == 1


async def test_id_slot_pins_the_slot(sim: str, http: aiohttp.ClientSession) -> None:
    for id_slot in (1, 0, 1):
        _, answer = await post_json(
            http, f"{sim}/completion", {"prompt": "pin", "n_predict": 1, "id_slot": id_slot}
        )
        assert answer["id_slot"] == id_slot


async def test_completion_stream_framing(sim: str, http: aiohttp.ClientSession) -> None:
    async with http.post(
        f"{sim}/completion", json={"prompt": "stream me", "n_predict": 5, "stream": True}
    ) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(event) for event in await sse_events(response)]
    assert len(events) == 6
    assert all(event["stop"] is False and event["content"] for event in events[:5])
    assert [event["tokens_predicted"] for event in events[:5]] == [1, 2, 3, 4, 5]
    final = events[-1]
    assert final["stop"] is True
    assert final["content"] == ""
    assert final["timings"]["predicted_n"] == 5


async def test_openai_completion(sim: str, http: aiohttp.ClientSession) -> None:
    status, answer = await post_json(
        http, f"{sim}/v1/completions", {"prompt": "openai", "max_tokens": 3}
    )
    assert status == 200
    assert answer["object"] == "text_completion"
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["usage"]["completion_tokens"] == 3


async def test_chat_completion(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}
    status, answer = await post_json(http, f"{sim}/v1/chat/completions", body)
    assert status == 200
    assert answer["object"] == "chat.completion"
    assert answer["id"].startswith("chatcmpl-")
    message = answer["choices"][0]["message"]
    assert message["role"] == "assistant"
    assert message["content"].count(" ") == 4
    assert answer["usage"]["completion_tokens"] == 4
    assert answer["timings"]["predicted_n"] == 4


async def test_chat_history_hits_the_cache_for_the_previous_reply(
    sim: str, http: aiohttp.ClientSession
) -> None:
    turns: list[dict[str, str]] = [{"role": "user", "content": "tell me about slots " * 4}]
    body = {"messages": turns, "max_tokens": 8, "id_slot": 0}
    _, first = await post_json(http, f"{sim}/v1/chat/completions", body)
    reply = first["choices"][0]["message"]["content"]
    turns += [{"role": "assistant", "content": reply}, {"role": "user", "content": "more"}]
    _, second = await post_json(http, f"{sim}/v1/chat/completions", body)
    # the whole first prompt and the whole reply come from the slot's cache
    assert second["timings"]["cache_n"] >= first["usage"]["prompt_tokens"] + 8
    assert (
        second["usage"]["prompt_tokens_details"]["cached_tokens"] == (second["timings"]["cache_n"])
    )


async def test_chat_stream_framing(sim: str, http: aiohttp.ClientSession) -> None:
    body = {
        "messages": [{"role": "user", "content": "stream a chat"}],
        "max_tokens": 3,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with http.post(f"{sim}/chat/completions", json=body) as response:
        assert response.status == 200
        events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": None}
    contents = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:4]]
    assert all(isinstance(content, str) and content for content in contents)
    assert chunks[4]["choices"][0] == {"finish_reason": "length", "index": 0, "delta": {}}
    assert chunks[5]["choices"] == []
    assert chunks[5]["usage"]["completion_tokens"] == 3
    assert chunks[5]["timings"]["predicted_n"] == 3


async def test_embeddings(sim: str, http: aiohttp.ClientSession) -> None:
    status, answer = await post_json(http, f"{sim}/v1/embeddings", {"input": ["one", "two"]})
    assert status == 200
    assert answer["object"] == "list"
    assert [item["index"] for item in answer["data"]] == [0, 1]
    assert answer["data"][0]["embedding"] != answer["data"][1]["embedding"]


async def test_decode_speed(sim: str, http: aiohttp.ClientSession) -> None:
    started = time.monotonic()
    _, answer = await post_json(http, f"{sim}/completion", {"prompt": "speed", "n_predict": 200})
    elapsed = time.monotonic() - started
    assert answer["tokens_predicted"] == 200
    assert 0.19 <= elapsed < 0.6  # 200 tokens at 1000 tokens/s
    assert answer["timings"]["predicted_per_second"] == pytest.approx(1000, rel=0.25)


# --- slots under load -------------------------------------------------------------------------


async def test_slots_show_a_running_generation(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "busy", "n_predict": 3000, "stream": True, "id_slot": 1}
    async with http.post(f"{sim}/completion", json=body) as response:
        await response.content.readuntil(b"\n\n")
        _, slots = await get_json(http, f"{sim}/slots")
        busy = slots[1]
        assert busy["is_processing"] is True
        assert slots[0]["is_processing"] is False
        assert isinstance(busy["id_task"], int)
        assert busy["params"]["n_predict"] == 3000
        [next_token] = busy["next_token"]
        assert next_token["has_next_token"] is True
        assert next_token["n_decoded"] >= 1
        assert next_token["n_remain"] == 3000 - next_token["n_decoded"]
        status, _ = await get_json(http, f"{sim}/slots?fail_on_no_slot=1")
        assert status == 200  # slot 0 is idle
    await wait_slots(http, sim, 0)


async def test_finished_slot_keeps_its_task_id_and_resets_its_progress(
    sim: str, http: aiohttp.ClientSession
) -> None:
    # As llama-server (tests/e2e/test_llama_server_facts.py).
    status, answer = await post_json(
        http, f"{sim}/completion", {"prompt": "Hi", "n_predict": 3, "id_slot": 0}
    )
    assert status == 200, answer
    _, slots = await get_json(http, f"{sim}/slots")
    done = slots[0]
    assert done["is_processing"] is False
    assert isinstance(done["id_task"], int)
    assert done["next_token"] == [
        {"has_next_token": False, "has_new_line": False, "n_remain": -1, "n_decoded": 0}
    ]
    assert (done["n_prompt_tokens_processed"], done["n_prompt_tokens_cache"]) == (0, 0)
    assert done["n_prompt_tokens"] == answer["tokens_evaluated"] + 3
    assert "prompt" not in done  # llama-server shows it only with --slots-debug
    body = {"prompt": "Forever", "n_predict": -1, "stream": True, "id_slot": 0}
    async with http.post(f"{sim}/completion", json=body) as response:
        await response.content.readuntil(b"\n\n")
        _, slots = await get_json(http, f"{sim}/slots")
    assert slots[0]["id_task"] > done["id_task"]
    assert slots[0]["next_token"][0]["n_remain"] == -1
    await wait_slots(http, sim, 0)


ALPHA = "alpha bravo charlie delta " * 60
BRAVO = "xray yankee zulu whiskey " * 60


async def completion_timings(http: aiohttp.ClientSession, base: str, prompt: str) -> dict[str, int]:
    status, answer = await post_json(http, f"{base}/completion", {"prompt": prompt, "n_predict": 4})
    assert status == 200, answer
    return dict(answer["timings"])


@pytest.mark.parametrize("cache_ram_tokens", [0, 10_000])
async def test_host_ram_cache_brings_back_a_prompt_pushed_out_of_its_slot(
    http: aiohttp.ClientSession, cache_ram_tokens: int
) -> None:
    # The sequence tests/e2e/test_llama_server_facts.py runs on llama-server --cache-ram.
    flags = ("--slots", "1", "--cache-ram-tokens", str(cache_ram_tokens), *FAST)
    for base in start_sim(*flags):
        assert (await completion_timings(http, base, ALPHA))["cache_n"] == 0
        assert (await completion_timings(http, base, BRAVO))["cache_n"] <= 1
        again = await completion_timings(http, base, ALPHA + " echo foxtrot")
        sim_counters = await counters(http, base)
    if cache_ram_tokens:
        assert again["cache_n"] >= 0.9 * (again["cache_n"] + again["prompt_n"]), again
        assert sim_counters["cache_restores"] == 1
        assert 0 < sim_counters["cache_tokens"] <= cache_ram_tokens
    else:
        assert again["cache_n"] <= 1, again
        assert (sim_counters["cache_saves"], sim_counters["cache_tokens"]) == (0, 0)


async def test_fail_on_no_slot(sim: str, http: aiohttp.ClientSession) -> None:
    body = {"prompt": "fill", "n_predict": 100_000, "stream": True}
    async with (
        http.post(f"{sim}/completion", json=body) as a,
        http.post(f"{sim}/completion", json=body) as b,
    ):
        await a.content.readuntil(b"\n\n")
        await b.content.readuntil(b"\n\n")
        status, error = await get_json(http, f"{sim}/slots?fail_on_no_slot=1")
    assert status == 503
    assert error == {
        "error": {"code": 503, "message": "no slot available", "type": "unavailable_error"}
    }
    await wait_slots(http, sim, 0)


async def test_requests_beyond_the_slots_wait_and_are_counted(
    sim: str, http: aiohttp.ClientSession
) -> None:
    before = await counters(http, sim)
    body = {"prompt": "deferral", "n_predict": 100}  # 0.1 s each at 1000 tokens/s
    started = time.monotonic()
    answers = await asyncio.gather(*(post_json(http, f"{sim}/completion", body) for _ in range(4)))
    elapsed = time.monotonic() - started
    assert [status for status, _ in answers] == [200] * 4
    assert 0.19 <= elapsed < 0.8  # two rounds of two slots
    after = await counters(http, sim)
    assert after["requests_total"] - before["requests_total"] == 4
    assert after["requests_deferred"] - before["requests_deferred"] == 2
    assert after["requests_waiting"] == 0


async def test_client_leaving_mid_stream_frees_the_slot(
    sim: str, http: aiohttp.ClientSession
) -> None:
    before = await counters(http, sim)
    body = {"messages": [{"role": "user", "content": "long"}], "max_tokens": 100_000}
    response = await http.post(f"{sim}/v1/chat/completions", json={**body, "stream": True})
    await response.content.readuntil(b"\n\n")
    await wait_slots(http, sim, 1)
    response.close()
    assert await wait_slots(http, sim, 0, within=0.2) < 0.2
    after = await counters(http, sim)
    assert after["requests_cancelled"] - before["requests_cancelled"] == 1


async def test_client_leaving_a_non_streaming_request_frees_the_slot(
    sim: str, http: aiohttp.ClientSession
) -> None:
    body = {"prompt": "long", "n_predict": 100_000}
    with pytest.raises(asyncio.TimeoutError):
        await post_json(http, f"{sim}/completion", body, timeout=aiohttp.ClientTimeout(total=0.2))
    await wait_slots(http, sim, 0, within=0.2)


# --- bad input --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "data"),
    [
        ("/completion", b"{not json"),
        ("/completion", b'{"prompt": 12}'),
        ("/completion", b'{"prompt": "x", "n_predict": "lots"}'),
        ("/v1/chat/completions", b'{"messages": "hi"}'),
        ("/v1/completions", b"[]"),
        ("/v1/embeddings", b"{}"),
    ],
)
async def test_bad_input_gets_400(
    sim: str, http: aiohttp.ClientSession, path: str, data: bytes
) -> None:
    async with http.post(f"{sim}{path}", data=data) as response:
        assert response.status == 400
        error = (await response.json(content_type=None))["error"]
    assert error["code"] == 400
    assert error["type"] == "invalid_request_error"
    assert error["message"]
    status, _ = await get_json(http, f"{sim}/health")
    assert status == 200


async def test_prompt_beyond_the_context_gets_400(sim: str, http: aiohttp.ClientSession) -> None:
    status, answer = await post_json(http, f"{sim}/completion", {"prompt": "word " * 5000})
    assert status == 400
    assert "exceeds the available context size" in answer["error"]["message"]


async def test_unknown_path_gets_404(sim: str, http: aiohttp.ClientSession) -> None:
    status, answer = await get_json(http, f"{sim}/nope")
    assert status == 404
    assert answer["error"]["code"] == 404


# --- loading, authorization and faults --------------------------------------------------------


async def test_loading_then_healthy_and_fail_rate(http: aiohttp.ClientSession) -> None:
    for base in start_sim("--loading-ms", "800", "--fail-rate", "1", ready=(503,)):
        status, answer = await get_json(http, f"{base}/health")
        assert status == 503
        assert answer == {
            "error": {"code": 503, "message": "Loading model", "type": "unavailable_error"}
        }
        status, _ = await get_json(http, f"{base}/slots")
        assert status == 503
        deadline = time.monotonic() + 3
        while (await get_json(http, f"{base}/health"))[0] != 200:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        status, answer = await get_json(http, f"{base}/health")
        assert answer == {"status": "ok"}
        status, answer = await post_json(http, f"{base}/completion", {"prompt": "x"})
        assert status == 500
        assert answer["error"]["type"] == "server_error"


async def test_api_key_and_no_slots(http: aiohttp.ClientSession) -> None:
    for base in start_sim("--api-key", "s3cret", "--no-slots", *FAST):
        status, answer = await get_json(http, f"{base}/health")
        assert (status, answer) == (200, {"status": "ok"})
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            status, answer = await get_json(http, f"{base}/props", headers=headers)
            assert status == 401
            assert answer == {
                "error": {"code": 401, "message": "Invalid API Key", "type": "authentication_error"}
            }
        status, _ = await post_json(http, f"{base}/completion", {"prompt": "x"})
        assert status == 401
        good = {"Authorization": "Bearer s3cret"}
        status, _ = await post_json(
            http, f"{base}/completion", {"prompt": "x", "n_predict": 1}, headers=good
        )
        assert status == 200
        status, answer = await get_json(http, f"{base}/slots", headers=good)
        assert status == 501
        assert answer == {
            "error": {
                "code": 501,
                "message": "This server does not support slots endpoint. Start it with `--slots`",
                "type": "not_supported_error",
            }
        }


async def test_hang_holds_the_slot_without_answering(http: aiohttp.ClientSession) -> None:
    for base in start_sim("--hang", "--slots", "1", "--slots-delay-ms", "100", "--metrics"):
        request = asyncio.create_task(
            post_json(http, f"{base}/completion", {"prompt": "x", "stream": True})
        )
        started = time.monotonic()
        await wait_slots(http, base, 1)
        assert time.monotonic() - started >= 0.1  # /slots answers late
        await asyncio.sleep(0.2)
        assert not request.done()
        async with http.get(f"{base}/metrics") as response:
            metrics = await response.text()
        assert "llamacpp:requests_processing 1\n" in metrics
        assert "rower_sim_requests_total 1\n" in metrics
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await request
        await wait_slots(http, base, 0, within=0.5)
