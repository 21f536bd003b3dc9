// Rower's web dashboard: one EventSource on /api/v1/agents/stream, a redraw per snapshot.
// No framework and no build step: the balancer serves this file as it is.

const STREAM_URL = "/api/v1/agents/stream";
const HISTORY_SECONDS = 300;
const RETRY_MS = 2000;

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

function totals(fleet) {
  let idle = 0;
  let processing = 0;
  let total = 0;
  for (const agent of fleet.agents) {
    idle += agent.status.slots_idle;
    processing += agent.status.slots_processing;
    total += slotsTotal(agent.status);
  }
  return { idle, processing, total, buffered: fleet.requests_buffered ?? 0 };
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
    const total = slotsTotal(s);
    const busyShare = total > 0 ? (100 * s.slots_processing) / total : 0;
    const issueCell = el("td", { class: "issues" });
    if (issues.length === 0) issueCell.append(el("span", { class: "ok" }, "none"));
    for (const issue of issues) issueCell.append(el("span", { class: "issue" }, issue));
    const bar = el(
      "div",
      { class: "bar", title: `${s.slots_processing} busy of ${total}` },
      el("span", { class: "bar-busy", style: `width: ${busyShare.toFixed(1)}%` }),
    );
    const slots = el(
      "td",
      { class: "slots" },
      bar,
      el(
        "span",
        { class: "slot-counts" },
        el("b", { class: "idle" }, String(s.slots_idle)),
        " idle · ",
        el("b", { class: "processing" }, String(s.slots_processing)),
        ` busy / ${total}`,
      ),
    );
    const row = el(
      "tr",
      { "data-agent-id": agent.agent_id, class: agent.is_usable ? "usable" : "unusable" },
      el("td", { class: "name" }, s.agent_name || agent.agent_id.slice(0, 8)),
      el("td", { class: "address" }, s.external_llamacpp_addr),
      issueCell,
      slots,
      el("td", { class: "updated" }, ago(agent.last_update.secs_since_epoch, nowMs)),
    );
    return row;
  });
  body.replaceChildren(...rows);
  $("empty").hidden = fleet.agents.length > 0;
  $("agents").hidden = fleet.agents.length === 0;
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
    renderAgents(state.fleet, nowMs);
  }
  renderChart(nowMs);
}

function connect() {
  const source = new EventSource(STREAM_URL);
  source.onopen = () => setConnection("live", "Live");
  source.onmessage = (event) => {
    state.fleet = JSON.parse(event.data);
    setConnection("live", "Live");
    record(Date.now());
    render();
  };
  source.onerror = () => {
    setConnection("lost", "Connection to the balancer lost — retrying…");
    // The browser retries by itself unless the answer was an error; then we start over.
    if (source.readyState === EventSource.CLOSED) {
      source.close();
      setTimeout(connect, RETRY_MS);
    }
  };
}

function start() {
  $("empty-addr").textContent = window.location.host;
  $("agents").hidden = true;
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
