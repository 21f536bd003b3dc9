// Rower's web dashboard: one stream of /api/v1/agents/stream (server-sent events), a redraw
// per snapshot. No framework and no build step: the balancer serves this file as it is.
//
// The stream is read with fetch, not EventSource, because a balancer started with
// --management-token-guards-reads wants "Authorization: Bearer TOKEN", which EventSource cannot
// send. The page asks for the token when the balancer answers 401 and keeps it for this tab only
// (sessionStorage), never in the URL.

const STREAM_URL = "/api/v1/agents/stream";
const HISTORY_SECONDS = 300;
const RETRY_MS = 2000;
const TOKEN_KEY = "rower.managementToken";

const $ = (id) => document.getElementById(id);

const state = {
  fleet: null, // the latest FleetView
  history: [], // {t (ms), busy, buffered}
};

// The issues of one agent in plain words, from the status flags the agent reported and what
// the balancer knows (stale, quarantined). Same rules as rower.dashboard.issues in Python.
export function agentIssues(agent, nowMs = Date.now()) {
  const s = agent.status;
  const issues = [];
  if (s.is_connect_error) issues.push("unreachable");
  else if (s.is_authorized === false) issues.push("unauthorized (check the API key)");
  else if (s.is_slots_endpoint_enabled === false) issues.push("slots endpoint disabled");
  else if (s.error && /loading/i.test(s.error)) issues.push("loading the model");
  else if (s.is_deserialize_error || s.is_decode_error) issues.push("unreadable /slots answer");
  else if (s.is_unexpected_response_status) issues.push("unexpected response status");
  else if (s.is_request_error) issues.push("request to llama.cpp failed");
  else if (s.error) issues.push(s.error);
  if (agent.is_stale) issues.push("stale (reports stopped)");
  if (agent.quarantined_until) issues.push("quarantined (refused a connection)");
  if (s.is_draining) issues.push("draining");
  return issues;
}

function slotsTotal(status) {
  return status.slots_total || status.slots_idle + status.slots_processing;
}

// The fleet's sums. Each model's totals (fleet.models) already leave out what is no capacity
// (a router's model that is not loaded offers one slot only to the request that loads it);
// a balancer without them gets the agents' sums.
function totals(fleet) {
  let idle = 0;
  let processing = 0;
  let total = 0;
  const parts = fleet.models?.length ? fleet.models : fleet.agents.map((a) => a.status);
  for (const part of parts) {
    idle += part.slots_idle;
    processing += part.slots_processing;
    total += slotsTotal(part);
  }
  return { idle, processing, total, buffered: fleet.requests_buffered ?? 0 };
}

function modelName(model) {
  return model || "(unnamed)";
}

// A usage bar and "N idle · M busy / T" counts, for an agent or a model.
function slotsCell(idle, processing, total) {
  const busyShare = total > 0 ? (100 * processing) / total : 0;
  return el(
    "td",
    { class: "slots" },
    el(
      "div",
      { class: "bar", title: `${processing} busy of ${total}` },
      el("span", { class: "bar-busy", style: `width: ${busyShare.toFixed(1)}%` }),
    ),
    el(
      "span",
      { class: "slot-counts" },
      el("b", { class: "idle" }, String(idle)),
      " idle · ",
      el("b", { class: "processing" }, String(processing)),
      ` busy / ${total}`,
    ),
  );
}

function renderModels(fleet) {
  const models = fleet.models ?? [];
  const rows = models.map((m) =>
    el(
      "tr",
      { "data-model": m.model, class: m.agents > 0 ? "usable" : "unusable" },
      el("td", { class: "name" }, modelName(m.model)),
      el("td", { class: "agents" }, String(m.agents)),
      slotsCell(m.slots_idle, m.slots_processing, m.slots_total),
      el(
        "td",
        { class: m.requests_buffered > 0 ? "buffered warn" : "buffered" },
        String(m.requests_buffered),
      ),
    ),
  );
  $("models").querySelector("tbody").replaceChildren(...rows);
  $("models-panel").hidden = models.length === 0;
}

function ago(secondsSinceEpoch, nowMs) {
  const seconds = Math.max(0, Math.round(nowMs / 1000 - secondsSinceEpoch));
  if (seconds < 2) return "just now";
  if (seconds < 120) return `${seconds} s ago`;
  if (seconds < 7200) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function setConnection(kind, text) {
  const badge = $("connection");
  badge.className = `connection ${kind}`;
  badge.dataset.state = kind;
  badge.textContent = text;
  document.body.classList.toggle("disconnected", kind === "lost");
}

function renderAgents(fleet, nowMs) {
  const body = $("agents").querySelector("tbody");
  const rows = fleet.agents.map((agent) => {
    const s = agent.status;
    const issues = agentIssues(agent, nowMs);
    const issueCell = el("td", { class: "issues" });
    if (issues.length === 0) issueCell.append(el("span", { class: "ok" }, "none"));
    for (const issue of issues) issueCell.append(el("span", { class: "issue" }, issue));
    const aliases = (s.model_aliases ?? []).join(", ");
    const model = el(
      "td",
      { class: "model", title: aliases ? `also: ${aliases}` : "" },
      modelName(s.model),
    );
    if (s.is_router) model.append(el("span", { class: "router" }, "router"));
    // A router's models share its agent id: one row each.
    const row = el(
      "tr",
      {
        "data-agent-id": agent.agent_id,
        "data-model": s.model ?? "",
        class: agent.is_usable ? "usable" : "unusable",
      },
      el("td", { class: "name" }, s.agent_name || agent.agent_id.slice(0, 8)),
      model,
      el("td", { class: "address" }, s.external_llamacpp_addr),
      issueCell,
      slotsCell(s.slots_idle, s.slots_processing, slotsTotal(s)),
      el("td", { class: "reuse" }, cacheReuse(agent)),
      el("td", { class: "updated" }, ago(agent.last_update.secs_since_epoch, nowMs)),
    );
    return row;
  });
  body.replaceChildren(...rows);
  $("empty").hidden = fleet.agents.length > 0;
  $("agents").hidden = fleet.agents.length === 0;
}

// Share of prompt tokens the server found in its prompt cache, from its answers' timings.
function cacheReuse(agent) {
  const cached = agent.prompt_tokens_cached || 0;
  const all = cached + (agent.prompt_tokens_evaluated || 0);
  return all > 0 ? `${Math.round((100 * cached) / all)}%` : "–";
}

function renderTotals(fleet) {
  const t = totals(fleet);
  $("total-agents").textContent = String(fleet.agents.length);
  $("total-idle").textContent = String(t.idle);
  $("total-processing").textContent = `${t.processing} / ${t.total}`;
  $("total-buffered").textContent = String(t.buffered);
  $("total-buffered").classList.toggle("warn", t.buffered > 0);
}

function record(nowMs) {
  if (!state.fleet) return;
  const t = totals(state.fleet);
  state.history.push({ t: nowMs, busy: t.processing, buffered: t.buffered, slots: t.total });
  const oldest = nowMs - HISTORY_SECONDS * 1000;
  while (state.history.length > 0 && state.history[0].t < oldest) state.history.shift();
}

function svg(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) node.setAttribute(key, String(value));
  return node;
}

function renderChart(nowMs) {
  const chart = $("chart");
  // Drawn in the element's own pixels, so text is never stretched.
  const width = Math.max(300, Math.round(chart.getBoundingClientRect().width) || 800);
  const height = 160;
  chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
  const top = 8;
  const bottom = 20;
  const left = 34;
  const start = nowMs - HISTORY_SECONDS * 1000;
  const points = state.history;
  const peak = Math.max(1, ...points.map((p) => Math.max(p.busy, p.buffered, p.slots)));
  const x = (t) => left + ((t - start) / (HISTORY_SECONDS * 1000)) * (width - left);
  const y = (v) => top + (1 - v / peak) * (height - top - bottom);
  const nodes = [];
  for (const value of [0, Math.round(peak / 2), peak]) {
    nodes.push(svg("line", { x1: left, x2: width, y1: y(value), y2: y(value), class: "grid" }));
    const label = svg("text", { x: left - 6, y: y(value) + 4, class: "axis", "text-anchor": "end" });
    label.textContent = String(value);
    nodes.push(label);
  }
  for (const minutes of [5, 4, 3, 2, 1, 0]) {
    const label = svg("text", {
      x: x(nowMs - minutes * 60000),
      y: height - 4,
      class: "axis",
      "text-anchor": minutes === 5 ? "start" : minutes === 0 ? "end" : "middle",
    });
    label.textContent = minutes === 0 ? "now" : `-${minutes} min`;
    nodes.push(label);
  }
  for (const key of ["buffered", "busy"]) {
    if (points.length === 0) break;
    // Step lines: a count holds its value until the next sample.
    let d = `M ${x(points[0].t).toFixed(1)} ${y(points[0][key]).toFixed(1)}`;
    for (let i = 1; i < points.length; i++) {
      d += ` H ${x(points[i].t).toFixed(1)} V ${y(points[i][key]).toFixed(1)}`;
    }
    d += ` H ${x(nowMs).toFixed(1)}`;
    nodes.push(svg("path", { d, class: `series ${key}` }));
  }
  chart.replaceChildren(...nodes);
}

function render() {
  const nowMs = Date.now();
  if (state.fleet) {
    renderTotals(state.fleet);
    renderModels(state.fleet);
    renderAgents(state.fleet, nowMs);
  }
  renderChart(nowMs);
}

function onSnapshot(data) {
  state.fleet = JSON.parse(data);
  setConnection("live", "Live");
  record(Date.now());
  render();
}

// Feeds `text` (the stream's next piece) to the event parser; calls onSnapshot per event.
function sseParser() {
  let buffer = "";
  let data = [];
  return (text) => {
    buffer += text;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      let line = buffer.slice(0, end);
      buffer = buffer.slice(end + 1);
      if (line.endsWith("\r")) line = line.slice(0, -1);
      if (line === "") {
        if (data.length > 0) onSnapshot(data.join("\n"));
        data = [];
      } else if (line.startsWith("data:")) {
        data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
      }
      // Comments (keep-alives), "event:", "id:" and "retry:" lines carry nothing for us.
    }
  };
}

function askForToken(refused) {
  setConnection("lost", "The balancer wants its management token");
  $("token-message").textContent = refused
    ? "The balancer refused that token. Enter its --management-token again."
    : "This balancer lets only holders of its management token read the fleet " +
      "(--management-token-guards-reads). Enter the token to see it.";
  $("token-form").hidden = false;
  $("token-input").focus();
}

async function connect() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const headers = { Accept: "text/event-stream" };
  if (token) headers.Authorization = `Bearer ${token}`;
  try {
    const response = await fetch(STREAM_URL, { headers, cache: "no-store" });
    if (response.status === 401) {
      sessionStorage.removeItem(TOKEN_KEY);
      askForToken(Boolean(token));
      return; // the form's submit connects again
    }
    if (!response.ok || !response.body) {
      setConnection("lost", `The balancer answered HTTP ${response.status} — retrying…`);
    } else {
      setConnection("live", "Live");
      const feed = sseParser();
      const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        feed(value);
      }
      setConnection("lost", "Connection to the balancer lost — retrying…");
    }
  } catch {
    setConnection("lost", "Connection to the balancer lost — retrying…");
  }
  setTimeout(connect, RETRY_MS);
}

function onTokenSubmit(event) {
  event.preventDefault();
  const token = $("token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("token-input").value = "";
  $("token-form").hidden = true;
  setConnection("connecting", "Connecting to the balancer…");
  connect();
}

function start() {
  $("empty-addr").textContent = window.location.host;
  $("agents").hidden = true;
  $("token-form").addEventListener("submit", onTokenSubmit);
  setConnection("connecting", "Connecting to the balancer…");
  connect();
  // Keep "last update" ages and the chart's time axis moving between snapshots.
  setInterval(() => {
    record(Date.now());
    render();
  }, 1000);
  render();
}

start();
