"""The terminal dashboard: a live table of a balancer's agents, drawn with Textual.

It follows `/api/v1/agents/stream` (see `stream.py`) and redraws the table at each snapshot,
keeping the cursor on the same agent. A status line always says what the dashboard is doing:
connecting, unreachable and retrying, or how many agents it sees. Above the agents, a table
of the fleet's models (the snapshot's per-model totals) says how each model is doing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from rich.text import Text
from textual import on
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Static
from textual.widgets.data_table import CellDoesNotExist

from rower.dashboard.issues import agent_issues
from rower.dashboard.stream import Connecting, Unreachable, fleet_events
from rower.status import AgentView, FleetView, ModelSummary

COLUMNS = (
    "Name",
    "Model",
    "Issues",
    "llama.cpp address",
    "Last update",
    "Idle",
    "Processing",
    "Reuse",
)
MODEL_COLUMNS = ("Model", "Agents", "Idle", "Processing", "Slots", "Buffered")


@dataclass(frozen=True, slots=True)
class SortOrder:
    """One way to order the table's rows."""

    label: str
    key: Callable[[AgentView], tuple[object, ...]] | None
    """None keeps the balancer's order: usable first, then most idle."""


SORT_ORDERS = (
    SortOrder("balancer order", None),
    SortOrder("name", lambda a: (display_name(a).lower(),)),
    SortOrder("model", lambda a: (model_name(a.status.model), display_name(a).lower())),
    SortOrder("issues", lambda a: (not agent_issues(a), display_name(a).lower())),
    SortOrder("idle slots", lambda a: (-a.status.slots_idle, display_name(a).lower())),
    SortOrder("processing", lambda a: (-a.status.slots_processing, display_name(a).lower())),
    SortOrder("last update", lambda a: (a.last_update.timestamp(),)),
)


def display_name(agent: AgentView) -> str:
    """The agent's name, or the start of its id when it has none."""
    return agent.status.agent_name or agent.agent_id[:8]


def model_name(model: str | None) -> str:
    """A model as the tables show it: `(unnamed)` for servers that name none."""
    return model or "(unnamed)"


def entry_key(agent: AgentView) -> str:
    """Which entry of `/api/v1/agents` this is: a router-mode server's models share its agent
    id, one entry each."""
    return f"{agent.agent_id}/{agent.status.model}" if agent.status.is_router else agent.agent_id


def model_cells(model: ModelSummary) -> tuple[str | Text, ...]:
    """One row of the models table."""
    buffered = str(model.requests_buffered)
    return (
        model_name(model.model),
        str(model.agents),
        str(model.slots_idle),
        str(model.slots_processing),
        str(model.slots_total),
        Text(buffered, style="bold red") if model.requests_buffered else buffered,
    )


def ago(seconds_since_epoch: float, now: float) -> str:
    """`3 s ago`, `2 min ago`: how long ago a wall-clock instant was."""
    seconds = max(0, round(now - seconds_since_epoch))
    if seconds < 2:
        return "just now"
    if seconds < 120:
        return f"{seconds} s ago"
    if seconds < 7200:
        return f"{seconds // 60} min ago"
    return f"{seconds // 3600} h ago"


def agent_details(agent: AgentView, now: float) -> str:
    """Everything the balancer knows about one agent, as lines of text."""
    status = agent.status
    issues = agent_issues(agent)
    slots = ", ".join(
        f"{slot.id}: {'busy' if slot.is_processing else 'idle'}" for slot in status.slots
    )
    quarantined = (
        time.strftime("%H:%M:%S", time.localtime(agent.quarantined_until.timestamp()))
        if agent.quarantined_until is not None
        else "no"
    )
    lines = [
        f"Name:              {status.agent_name or '(none)'}",
        f"Agent id:          {agent.agent_id}",
        f"llama.cpp address: {status.external_llamacpp_addr}",
        f"Model:             {status.model or '(unnamed)'}"
        + (f" (also {', '.join(status.model_aliases)})" if status.model_aliases else "")
        + (" of a router-mode llama-server" if status.is_router else ""),
        f"Issues:            {', '.join(issues) if issues else 'none'}",
        f"Error:             {status.error or '(none)'}",
        f"Usable:            {'yes' if agent.is_usable else 'no'}",
        f"Slots:             {status.slots_idle} idle, {status.slots_processing} processing, "
        f"{status.slots_total} total, {agent.slots_free} free for new requests",
        f"Cache reuse:       {cache_reuse(agent)} of the prompt tokens of this balancer's requests",
        f"Taken by balancer: {agent.slots_taken} now, "
        f"{agent.slots_taken_since_last_status_update} since the last report",
        f"Slot states:       {slots or '(not reported)'}",
        f"Last update:       {ago(agent.last_update.timestamp(), now)}"
        f" (every {status.monitoring_interval_ms} ms)",
        f"Stale:             {'yes' if agent.is_stale else 'no'}",
        f"Quarantined until: {quarantined}",
    ]
    return "\n".join(lines)


def cache_reuse(agent: AgentView) -> str:
    """The share of prompt tokens the server found in its prompt cache, or `-` before any."""
    cached = agent.prompt_tokens_cached
    total = cached + agent.prompt_tokens_evaluated
    return f"{round(100 * cached / total)}%" if total else "-"


class AgentDetails(ModalScreen[None]):
    """One agent's details over the table; Esc, Enter or q goes back."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape,enter,q", "dismiss", "Back"),
    ]
    DEFAULT_CSS = """
    AgentDetails { align: center middle; }
    AgentDetails > VerticalScroll {
        width: 90; max-width: 100%; height: auto; max-height: 90%;
        border: round $accent; padding: 1 2; background: $surface;
    }
    """

    def __init__(self, agent: AgentView) -> None:
        super().__init__()
        self.key = entry_key(agent)
        self._agent = agent

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(id="details-title")
            yield Static(id="details")

    def on_mount(self) -> None:
        self.show(self._agent, gone=False)

    def show(self, agent: AgentView, *, gone: bool) -> None:
        """Redraw with the agent's latest view; `gone` when it left the fleet."""
        self._agent = agent
        title = f"Agent {display_name(agent)}" + (" (left the fleet)" if gone else "")
        self.query_one("#details-title", Static).update(Text(title, style="bold"))
        self.query_one("#details", Static).update(Text(agent_details(agent, time.time())))


class DashboardApp(App[None]):
    """Live table of the agents of the balancer whose management address is `management`.

    Args:
        management: `host:port` of the balancer's management listener.
        token: the balancer's management token, for a balancer that guards reads with it.
    """

    TITLE = "Rower"
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("q,escape", "quit", "Quit"),
        Binding("j", "cursor_down", "Down", show=False),
        Binding("k", "cursor_up", "Up", show=False),
        Binding("s", "cycle_sort", "Sort"),
        Binding("enter", "details", "Details"),
    ]
    DEFAULT_CSS = """
    #status { height: auto; padding: 0 1; background: $boost; }
    #status.problem { background: $error 30%; }
    #models { height: auto; max-height: 40%; margin-bottom: 1; }
    #agents { height: 1fr; }
    """

    def __init__(self, management: str, *, token: str | None = None) -> None:
        super().__init__()
        self.management = management
        self.token = token
        self.url = f"http://{management}/api/v1/agents/stream"
        self.fleet: FleetView | None = None
        self.sort_index = 0
        self.sub_title = management

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"Connecting to the balancer at {self.management}…", id="status")
        models: DataTable[str | Text] = DataTable(id="models", cursor_type="none")
        models.can_focus = False  # the keys move through the agents
        models.display = False
        yield models
        table: DataTable[str | Text] = DataTable(id="agents", cursor_type="row", zebra_stripes=True)
        yield table
        yield Footer()

    def on_mount(self) -> None:
        table = self.query_one("#agents", DataTable)
        for column in COLUMNS:
            table.add_column(column, key=column)
        models = self.query_one("#models", DataTable)
        for column in MODEL_COLUMNS:
            models.add_column(column, key=column)
        self.run_worker(self._follow(), exclusive=True, name="fleet stream")
        self.set_interval(1.0, self._redraw)

    async def _follow(self) -> None:
        async for event in fleet_events(self.url, token=self.token):
            if isinstance(event, Connecting):
                if self.fleet is None:
                    self._say(f"Connecting to the balancer at {self.management}…")
            elif isinstance(event, Unreachable):
                self._say(
                    f"Balancer at {self.management} unreachable ({event.reason}); "
                    f"retrying in {event.retry_in:g} s",
                    problem=True,
                )
                self.fleet = None
                self._redraw_table()
            else:
                self.fleet = event
                self._redraw()

    def _say(self, message: str, *, problem: bool = False) -> None:
        status = self.query_one("#status", Static)
        status.update(message)
        status.set_class(problem, "problem")

    def _redraw(self) -> None:
        if self.fleet is None:
            return
        fleet = self.fleet
        if not fleet.agents:
            self._say(
                f"Connected to {self.management}. No agent is registered yet: start "
                f"`rower agent --management-addr {self.management} "
                "--local-llamacpp-addr HOST:PORT` next to each llama-server."
            )
        else:
            # The models' sums: a router's model that is not loaded has no idle slot. (A
            # balancer older than per-model totals sends none: then the agents' sums.)
            if fleet.models:
                idle = sum(m.slots_idle for m in fleet.models)
            else:
                idle = sum(a.status.slots_idle for a in fleet.agents)
            busy = sum(a.status.slots_processing for a in fleet.agents)
            served = [m for m in fleet.models if m.model]
            models = f"{len(served)} models · " if len(served) > 1 else ""
            self._say(
                f"{len(fleet.agents)} agent{'s' if len(fleet.agents) != 1 else ''} · {models}"
                f"{idle} idle · {busy} processing · {fleet.requests_buffered} buffered · "
                f"sorted by {SORT_ORDERS[self.sort_index].label}"
            )
        self._redraw_table()
        self._redraw_details()

    def sorted_agents(self) -> list[AgentView]:
        """The agents in the current sort order."""
        agents = list(self.fleet.agents) if self.fleet is not None else []
        key = SORT_ORDERS[self.sort_index].key
        return agents if key is None else sorted(agents, key=key)

    def _redraw_table(self) -> None:
        self._redraw_models()
        table: DataTable[str | Text] = self.query_one("#agents", DataTable)
        selected = self._selected_id()
        table.clear()
        now = time.time()
        for agent in self.sorted_agents():
            issues = agent_issues(agent)
            table.add_row(
                display_name(agent),
                model_name(agent.status.model),
                Text(", ".join(issues), style="bold red") if issues else Text("none", "dim"),
                agent.status.external_llamacpp_addr,
                ago(agent.last_update.timestamp(), now),
                str(agent.status.slots_idle),
                str(agent.status.slots_processing),
                cache_reuse(agent),
                key=entry_key(agent),
            )
        if selected is not None and selected in table.rows:
            table.move_cursor(row=table.get_row_index(selected), animate=False)

    def _redraw_models(self) -> None:
        models: DataTable[str | Text] = self.query_one("#models", DataTable)
        models.clear()
        summaries = self.fleet.models if self.fleet is not None else []
        for model in summaries:
            models.add_row(*model_cells(model), key=model.model)
        models.display = bool(summaries)

    def _selected_id(self) -> str | None:
        table = self.query_one("#agents", DataTable)
        if table.row_count == 0:
            return None
        try:
            row_key, _ = table.coordinate_to_cell_key(table.cursor_coordinate)
        except CellDoesNotExist:
            return None
        return row_key.value

    def _redraw_details(self) -> None:
        screen = self.screen
        if not isinstance(screen, AgentDetails) or self.fleet is None:
            return
        for agent in self.fleet.agents:
            if entry_key(agent) == screen.key:
                screen.show(agent, gone=False)
                return
        screen.show(screen._agent, gone=True)

    def action_cursor_down(self) -> None:
        """Move the cursor one agent down."""
        self.query_one("#agents", DataTable).action_cursor_down()

    def action_cursor_up(self) -> None:
        """Move the cursor one agent up."""
        self.query_one("#agents", DataTable).action_cursor_up()

    def action_cycle_sort(self) -> None:
        """Sort by the next column."""
        self.sort_index = (self.sort_index + 1) % len(SORT_ORDERS)
        self._redraw()

    def action_details(self) -> None:
        """Show the selected agent's details."""
        key = self._selected_id()
        if key is None or self.fleet is None:
            return
        for agent in self.fleet.agents:
            if entry_key(agent) == key:
                self.push_screen(AgentDetails(agent))
                return

    @on(DataTable.RowSelected)
    def _row_selected(self, event: DataTable.RowSelected) -> None:
        self.action_details()
