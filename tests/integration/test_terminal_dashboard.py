"""`rower dashboard` driven headless with Textual's Pilot against real balancer processes."""

from __future__ import annotations

import asyncio

from textual.widgets import DataTable, Static

from rower.dashboard.app import AgentDetails, DashboardApp
from tests.integration.agent.peers import FakeLlama, LlamaState
from tests.integration.fleet import OBSERVABILITY, Fleet, until
from tests.processes import free_port

PATIENCE = 15.0
"""Seconds the dashboard may take to show a change (it polls; the machine may be busy)."""


def status_text(app: DashboardApp) -> str:
    return str(app.query_one("#status", Static).render())


def rows(app: DashboardApp, table_id: str = "agents") -> list[list[str]]:
    table = app.query_one(f"#{table_id}", DataTable)
    return [[str(cell) for cell in table.get_row_at(i)] for i in range(table.row_count)]


async def test_table_follows_the_fleet(fleet: Fleet) -> None:
    fleet.balancer(*OBSERVABILITY)
    app = DashboardApp(fleet.management_addr)
    async with app.run_test(size=(140, 30)) as pilot:
        await until(
            lambda: "No agent is registered" in status_text(app),
            within=PATIENCE,
            what="no-agent message",
        )
        assert rows(app) == []

        alpha, _ = await asyncio.to_thread(fleet.sim_with_agent, "alpha", slots=2)
        beta, beta_agent = await asyncio.to_thread(fleet.sim_with_agent, "beta", slots=3)
        await until(lambda: len(rows(app)) == 2, within=PATIENCE, what="two rows")
        table = rows(app)
        by_name = {row[0]: row for row in table}
        assert by_name["beta"][1] == "sim"  # the model its server serves
        assert by_name["beta"][2] == "none"
        assert by_name["beta"][3] == beta.addr
        assert by_name["beta"][5:] == ["3", "0", "-"]  # idle, processing, no reuse yet
        assert "2 agents" in status_text(app)

        # s cycles the sort: balancer order -> name.
        await pilot.press("s")
        assert "sorted by name" in status_text(app)
        assert [row[0] for row in rows(app)] == ["alpha", "beta"]

        # Arrows and j/k move; Enter shows the agent under the cursor.
        await pilot.press("j")
        await pilot.press("enter")
        await until(
            lambda: isinstance(app.screen, AgentDetails), within=PATIENCE, what="details screen"
        )
        assert isinstance(app.screen, AgentDetails)
        details = str(app.screen.query_one("#details", Static).render())
        assert "beta" in details
        assert "3 total" in details
        await pilot.press("escape")
        await until(
            lambda: not isinstance(app.screen, AgentDetails), within=PATIENCE, what="details closed"
        )
        await pilot.press("k")

        # A broken server shows its issue in words; an agent that leaves leaves the table.
        alpha.process.kill()
        await until(
            lambda: any(row[0] == "alpha" and "unreachable" in row[2] for row in rows(app)),
            within=PATIENCE,
            what="alpha unreachable",
        )
        beta_agent.stop()
        await until(
            lambda: [row[0] for row in rows(app)] == ["alpha"], within=PATIENCE, what="beta gone"
        )

        await pilot.press("q")
    assert app.return_code == 0


async def test_says_when_the_balancer_is_unreachable_and_keeps_retrying(fleet: Fleet) -> None:
    app = DashboardApp(fleet.management_addr)
    async with app.run_test(size=(140, 30)) as pilot:
        await until(
            lambda: "unreachable" in status_text(app), within=PATIENCE, what="unreachable message"
        )
        assert "retrying" in status_text(app)
        await asyncio.to_thread(fleet.balancer, *OBSERVABILITY)
        await until(
            lambda: "No agent is registered" in status_text(app),
            within=PATIENCE,
            what="reconnected",
        )
        await pilot.press("escape")


async def test_connecting_message_before_the_first_snapshot() -> None:
    port = free_port()
    app = DashboardApp(f"127.0.0.1:{port}")
    async with app.run_test(size=(120, 20)) as pilot:
        assert "Connecting to the balancer" in status_text(app) or "unreachable" in status_text(app)
        await pilot.press("q")


async def test_sends_the_token_when_reads_are_guarded(fleet: Fleet) -> None:
    await asyncio.to_thread(
        fleet.balancer,
        *OBSERVABILITY,
        "--management-token",
        "dash-token",
        "--management-token-guards-reads",
    )
    without = DashboardApp(fleet.management_addr)
    async with without.run_test(size=(140, 30)) as pilot:
        await until(
            lambda: "--management-token" in status_text(without),
            within=PATIENCE,
            what="a message asking for the token",
        )
        await pilot.press("q")
    with_token = DashboardApp(fleet.management_addr, token="dash-token")
    async with with_token.run_test(size=(140, 30)) as pilot:
        await until(
            lambda: "No agent is registered" in status_text(with_token),
            within=PATIENCE,
            what="the fleet, read with the token",
        )
        await pilot.press("q")


async def test_each_agents_model_and_the_totals_per_model(fleet: Fleet) -> None:
    await asyncio.to_thread(fleet.balancer, *OBSERVABILITY, "--model", "embed")

    def start(name: str, model: str, slots: int) -> None:
        sim = fleet.sim(slots=slots, flags=("--model", model, "--alias", f"{model}-latest"))
        fleet.agent(sim, name=name)

    app = DashboardApp(fleet.management_addr)
    async with app.run_test(size=(140, 30)) as pilot:
        for name, model, slots in (("a1", "alpha", 2), ("a2", "alpha", 1), ("b1", "beta", 3)):
            await asyncio.to_thread(start, name, model, slots)
        await until(lambda: len(rows(app)) == 3, within=PATIENCE, what="three agents")
        assert {row[0]: row[1] for row in rows(app)} == {"a1": "alpha", "a2": "alpha", "b1": "beta"}
        # Model, agents, idle, processing, slots, buffered; the declared one with no server.
        await until(
            lambda: (
                rows(app, "models")
                == [
                    ["alpha", "2", "3", "0", "3", "0"],
                    ["beta", "1", "3", "0", "3", "0"],
                    ["embed", "0", "0", "0", "0", "0"],
                ]
            ),
            within=PATIENCE,
            what=f"the models table, now {rows(app, 'models')}",
        )
        assert "3 models" in status_text(app)
        await pilot.press("s", "s")
        assert "sorted by model" in status_text(app)
        assert [row[1] for row in rows(app)] == ["alpha", "alpha", "beta"]
        await pilot.press("enter")
        await until(
            lambda: isinstance(app.screen, AgentDetails), within=PATIENCE, what="details screen"
        )
        details = str(app.screen.query_one("#details", Static).render())
        assert "alpha (also alpha-latest)" in details
        await pilot.press("escape", "q")


async def test_a_routers_models_are_rows_of_their_own(fleet: Fleet) -> None:
    router = FakeLlama(LlamaState(router={"alpha": "loaded", "beta": "loaded", "gamma": "x"}))
    await router.start()
    try:
        await asyncio.to_thread(fleet.balancer, *OBSERVABILITY)
        app = DashboardApp(fleet.management_addr)
        async with app.run_test(size=(140, 30)) as pilot:
            await asyncio.to_thread(fleet.agent, router, name="router")  # type: ignore[arg-type]
            # One row per model of the one agent (gamma: the one request that may load it).
            await until(
                lambda: sorted(row[1] for row in rows(app)) == ["alpha", "beta", "gamma"],
                within=PATIENCE,
                what=f"a row per model, now {rows(app)}",
            )
            assert {row[0] for row in rows(app)} == {"router"}
            # gamma is not loaded: no idle capacity, no server of its own.
            by_model = {row[0]: row[1:] for row in rows(app, "models")}
            assert by_model == {
                "alpha": ["1", "2", "0", "2", "0"],
                "beta": ["1", "2", "0", "2", "0"],
                "gamma": ["0", "0", "0", "0", "0"],
            }
            assert "4 idle" in status_text(app)
            await pilot.press("s", "s")  # by model: alpha, beta, gamma
            await pilot.press("j", "enter")
            await until(
                lambda: isinstance(app.screen, AgentDetails), within=PATIENCE, what="details"
            )
            details = str(app.screen.query_one("#details", Static).render())
            assert "beta of a router-mode llama-server" in details
            await pilot.press("escape", "q")
    finally:
        await router.stop()
