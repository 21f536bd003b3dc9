"""The web dashboard in a real headless Chromium, against real balancer, sim and agent processes.

Chromium comes from Debian's package (scripts/setup.sh installs it) and is driven with
Playwright; no browser is downloaded. Where a browser is required (CI, scripts/test.sh), a
missing Chromium fails the test instead of skipping it.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.fleet import OBSERVABILITY, Fleet, stream_completion

CHROMIUM = os.environ.get("ROWER_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = os.environ.get("ROWER_DASHBOARD_SCREENSHOT")
"""Where to save a screenshot of the dashboard under load (docs/dashboard.png is made so)."""


def browser_required() -> bool:
    return any(
        os.environ.get(name)
        for name in ("CI", "ROWER_REQUIRE_BROWSER", "ROWER_REQUIRE_LLAMA_SERVER")
    )


@pytest.fixture
def page() -> Iterator[object]:
    missing = None
    if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
        missing = f"no Chromium at {CHROMIUM} (scripts/setup.sh installs Debian's chromium)"
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[dev]')"
    if missing is not None:
        if browser_required():
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 820})
        finally:
            browser.close()


def test_dashboard_follows_the_fleet_live(fleet: Fleet, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    balancer = fleet.balancer(*OBSERVABILITY)
    page.goto(fleet.management + "/dashboard")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#empty")).to_be_visible()
    expect(page.locator("#empty")).to_contain_text("No agent is registered")

    # Agents appear without a reload.
    alpha_sim, _ = fleet.sim_with_agent("alpha", slots=2, speed=20)
    _, beta_agent = fleet.sim_with_agent("beta", slots=4, speed=20)
    rows = page.locator("#agents tbody tr")
    expect(rows).to_have_count(2)
    expect(page.locator("#empty")).to_be_hidden()
    alpha = page.locator("#agents tbody tr", has_text="alpha")
    expect(alpha.locator(".address")).to_have_text(alpha_sim.addr)
    expect(alpha.locator(".issues")).to_have_text("none")
    expect(page.locator("#total-agents")).to_have_text("2")
    expect(page.locator("#total-idle")).to_have_text("6")
    expect(page.locator("#agents td.reuse", has_text="%")).to_have_count(0)

    # The same long prompt twice: the second finds its prefix in the cache of the server that
    # served the first (cache-aware routing), and that row shows the reuse.
    prompt = json.dumps({"prompt": "A long shared prefix. " * 60, "n_predict": 2}).encode()
    for _ in range(2):
        urllib.request.urlopen(
            urllib.request.Request(f"{fleet.proxy}/completion", data=prompt), timeout=15
        ).read()
    expect(page.locator("#agents td.reuse", has_text="%")).to_have_count(1)

    # A long streaming request through the proxy makes a slot busy.
    first_chunk = threading.Event()
    cut: list[BaseException] = []

    def stream() -> None:
        # The stream is cut when the balancer stops at the end of the test; a cut before the
        # first chunk is kept for the failure message.
        try:
            for _ in stream_completion(fleet.proxy, tokens=200):
                first_chunk.set()
        except (OSError, http.client.HTTPException) as error:
            cut.append(error)

    streamer = threading.Thread(target=stream, daemon=True)
    streamer.start()
    assert first_chunk.wait(15), f"no chunk of the stream within 15 s: {cut or 'no error'}"
    expect(page.locator("#total-processing")).to_have_text("1 / 6")
    expect(page.locator("#agents tbody tr .processing", has_text="1")).to_have_count(1)
    expect(page.locator("#chart path.series.busy")).to_have_count(1)
    if SCREENSHOT:
        for _ in range(2):
            threading.Thread(target=stream, daemon=True).start()
        page.wait_for_timeout(4000)  # a few seconds of history in the chart
        page.screenshot(path=SCREENSHOT, full_page=True)

    # A server that breaks shows its issue in words.
    alpha_sim.process.kill()
    expect(alpha.locator(".issues")).to_contain_text("unreachable")

    # An agent that leaves leaves the table.
    beta_agent.stop()
    expect(rows).to_have_count(1)
    expect(page.locator("#agents tbody tr", has_text="beta")).to_have_count(0)

    # The balancer goes away: the page says so, and comes back by itself.
    balancer.stop()
    expect(page.locator("#connection")).to_have_attribute("data-state", "lost")
    expect(page.locator("#connection")).to_contain_text("retrying")
    fleet.balancer(*OBSERVABILITY)
    expect(page.locator("#connection")).to_have_attribute("data-state", "live", timeout=20000)
    streamer.join(timeout=1)


def test_dashboard_asks_for_the_token_when_reads_are_guarded(fleet: Fleet, page: object) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    token = "web-token"
    fleet.balancer(*OBSERVABILITY, "--management-token", token, "--management-token-guards-reads")
    sim = fleet.sim(slots=2)
    fleet.agent(sim, name="alpha", flags=["--management-token", token])
    page.goto(fleet.management + "/dashboard")
    expect(page.locator("#token-form")).to_be_visible()
    expect(page.locator("#token-message")).to_contain_text("--management-token-guards-reads")
    expect(page.locator("#agents tbody tr")).to_have_count(0)

    page.fill("#token-input", "not-the-token")
    page.click("#token-form button[type=submit]")
    expect(page.locator("#token-message")).to_contain_text("refused that token")

    page.fill("#token-input", token)
    page.click("#token-form button[type=submit]")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#token-form")).to_be_hidden()
    expect(page.locator("#agents tbody tr", has_text="alpha")).to_have_count(1)
    # The token lives in this tab's session: a reload needs no prompt.
    page.reload()
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    expect(page.locator("#token-form")).to_be_hidden()


def test_dashboard_shows_each_agents_model_and_the_totals_per_model(
    fleet: Fleet, page: object
) -> None:
    from playwright.sync_api import Page, expect

    assert isinstance(page, Page)
    fleet.balancer(*OBSERVABILITY, "--model", "embed")
    for name, model, slots in (("a1", "alpha", 2), ("b1", "beta", 3)):
        sim = fleet.sim(slots=slots, speed=20, flags=("--model", model, "--alias", f"{model}-x"))
        fleet.agent(sim, name=name)
    page.goto(fleet.management + "/dashboard")
    expect(page.locator("#agents tbody tr")).to_have_count(2)
    a1 = page.locator('#agents tr[data-model="alpha"]')
    expect(a1.locator("td.name")).to_have_text("a1")
    expect(a1.locator("td.model")).to_have_text("alpha")
    expect(a1.locator("td.model")).to_have_attribute("title", "also: alpha-x")
    expect(page.locator("#models-panel")).to_be_visible()
    models = page.locator("#models tbody tr")
    expect(models).to_have_count(3)
    expect(models.locator("td.name")).to_have_text(["alpha", "beta", "embed"])
    expect(models.locator("td.agents")).to_have_text(["1", "1", "0"])
    beta = page.locator('#models tr[data-model="beta"]')
    expect(beta.locator(".slot-counts")).to_have_text("3 idle · 0 busy / 3")

    # alpha's two slots busy and one request in alpha's own buffer; beta untouched.
    first_chunks = threading.Semaphore(0)
    cut: list[BaseException] = []

    def stream() -> None:
        body = {"model": "alpha", "prompt": "Tell me a story", "n_predict": 300, "stream": True}
        request = urllib.request.Request(
            f"{fleet.proxy}/completion",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                answer.read1(1)
                first_chunks.release()
                while answer.read1(4096):
                    pass
        except (OSError, http.client.HTTPException) as error:
            cut.append(error)

    for _ in range(3):
        threading.Thread(target=stream, daemon=True).start()
    for _ in range(2):
        assert first_chunks.acquire(timeout=15), f"alpha's streams did not start: {cut}"
    alpha = page.locator('#models tr[data-model="alpha"]')
    expect(alpha.locator("td.buffered")).to_have_text("1")
    expect(alpha.locator("td.buffered")).to_have_class("buffered warn")
    expect(alpha.locator(".slot-counts")).to_have_text("0 idle · 2 busy / 2")
    expect(beta.locator("td.buffered")).to_have_text("0")
    expect(page.locator("#total-buffered")).to_have_text("1")
    expect(page.locator("#total-idle")).to_have_text("3")
