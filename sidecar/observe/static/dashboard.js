// The pool dashboard: polls the JSON endpoints of the server that served this page and redraws.
// No build step, no library: tables are DOM, charts are hand-drawn SVG.
"use strict";

const POLL_MS = 1000;
const MAX_CALL_ROWS = 60;
const MAX_EVENTS = 300;
const MAX_CHART_POINTS = 300;  // per worker line: the newest ones
const COLORS = ["#3366cc", "#dc3912", "#109618", "#990099", "#ff9900", "#0099c6", "#dd4477", "#66aa00"];
const SVG_NS = "http://www.w3.org/2000/svg";

const state = { callsSeq: 0, eventsSeq: 0, calls: [], events: [], failures: 0 };

function el(tag, attrs = {}, text) {
  const node = tag.startsWith("svg:") ? document.createElementNS(SVG_NS, tag.slice(4)) : document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function bytes(n) {
  if (n === undefined || n === null) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(1)) + " " + units[i];
}

function ms(v) { return v === undefined || v === null ? "–" : v < 1 ? v.toFixed(3) : v.toFixed(2); }
function clock(ns) { return new Date(ns / 1e6).toLocaleTimeString([], { hour12: false }); }

async function getJSON(path) {
  const r = await fetch(path, { cache: "no-store" });
  if (!r.ok) throw new Error(path + ": HTTP " + r.status);
  return r.json();
}

// -- workers -------------------------------------------------------------------------------------

function renderStatus(s) {
  document.getElementById("run-id").textContent = "run " + s.run_id;
  const b = document.getElementById("breaker");
  b.textContent = "breaker: " + s.breaker.state + (s.breaker.state !== "closed" ? " (" + s.breaker.recent_failures + " crashes)" : "");
  b.className = "badge " + s.breaker.state;
  const ready = s.workers.filter((w) => w.state === "ready").length;
  document.getElementById("ready").textContent = "workers: " + ready + "/" + s.workers.length + " ready";
  const body = document.querySelector("#workers tbody");
  body.replaceChildren();
  for (const w of s.workers) {
    const m = w.memory || {};
    const gpus = Object.entries(w.gpu_memory || {})
      .map(([d, g]) => d + " " + bytes(g.allocated_bytes) + " / " + bytes(g.reserved_bytes)).join(", ");
    const exit = w.last_exit ? w.last_exit.classification + (w.last_exit.signal ? " (sig " + w.last_exit.signal + ")" : "") : "";
    const row = el("tr", { "data-slot": w.slot, "data-pid": w.pid ?? "", "data-state": w.state });
    const cells = [w.slot < 0 ? "spare" : w.slot, w.pid ?? "–", w.device + (w.gpu !== null ? " (GPU " + w.gpu + ")" : ""),
      w.state, w.calls, w.inflight, w.crashes, w.restarts, bytes(m.rss_bytes),
      m.rss_bytes === undefined ? "–" : bytes(m.arena_in_use_bytes) + " / " + bytes(m.arena_reserved_bytes),
      m.leases ?? "–", gpus || "–", exit];
    cells.forEach((c, i) => {
      const td = el("td", i === 2 || i === 3 || i === 12 ? { class: "text" } : {}, String(c));
      if (i === 3) td.classList.add("state-" + w.state);
      row.appendChild(td);
    });
    body.appendChild(row);
  }
}

// -- memory charts (one per device, one line per worker) -----------------------------------------

function renderMemory(doc) {
  const box = document.getElementById("charts");
  document.getElementById("memory-note").textContent =
    doc.interval_s ? "(a sample every " + doc.interval_s + " s; CPU: RSS, GPU: allocated)" : "(profiler off)";
  const byDevice = new Map();
  for (const s of doc.series) {
    if (!byDevice.has(s.device)) byDevice.set(s.device, []);
    byDevice.get(s.device).push(s);
  }
  box.replaceChildren();
  for (const [device, series] of [...byDevice.entries()].sort()) box.appendChild(chart(device, series));
}

function chart(device, series) {
  const W = 560, H = 200, L = 58, R = 8, T = 8, B = 22;
  const all = series.flatMap((s) => s.points);
  const wrap = el("div", { class: "chart", "data-device": device });
  wrap.appendChild(el("h3", {}, device === "cpu" ? "cpu — worker RSS" : device + " — allocated by torch"));
  const svg = el("svg:svg", { viewBox: "0 0 " + W + " " + H, class: "memory-chart", "data-device": device,
    "data-points": String(all.length) });
  wrap.appendChild(svg);
  if (all.length === 0) return wrap;
  const t0 = Math.min(...all.map((p) => p[0])), t1 = Math.max(...all.map((p) => p[0]));
  const vmax = Math.max(...all.map((p) => p[1])) * 1.1 || 1;
  const x = (t) => L + ((t - t0) / Math.max(1, t1 - t0)) * (W - L - R);
  const y = (v) => H - B - (v / vmax) * (H - T - B);
  svg.appendChild(el("svg:line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }));
  svg.appendChild(el("svg:line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }));
  for (const f of [0, 0.5, 1]) {
    svg.appendChild(el("svg:text", { x: L - 4, y: y(vmax * f / 1.1) + 3, "text-anchor": "end" }, bytes(vmax * f / 1.1)));
  }
  svg.appendChild(el("svg:text", { x: L, y: H - 6 }, clock(t0 * 1e6)));
  svg.appendChild(el("svg:text", { x: W - R, y: H - 6, "text-anchor": "end" }, clock(t1 * 1e6)));
  const legend = el("div", { class: "legend" });
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    const pts = s.points.map((p) => x(p[0]).toFixed(1) + "," + y(p[1]).toFixed(1)).join(" ");
    svg.appendChild(el("svg:polyline", { points: pts, fill: "none", stroke: color, "stroke-width": 1.6,
      "stroke-dasharray": s.alive ? "" : "4 3", "data-pid": s.pid }));
    const last = s.points[s.points.length - 1];
    if (last) svg.appendChild(el("svg:circle", { cx: x(last[0]), cy: y(last[1]), r: 2.5, fill: color }));
    const item = el("span");
    item.appendChild(el("i", { style: "background:" + color }));
    item.appendChild(document.createTextNode("pid " + s.pid + (s.slot !== null ? " (slot " + s.slot + ")" : "") +
      (s.alive ? "" : " †") + (s.growing ? " ↗ growing" : "")));
    legend.appendChild(item);
  });
  wrap.appendChild(legend);
  return wrap;
}

// -- recent calls --------------------------------------------------------------------------------

function renderCalls() {
  const body = document.querySelector("#calls tbody");
  body.replaceChildren();
  for (const c of state.calls.slice(-MAX_CALL_ROWS).reverse()) {
    const row = el("tr", { "data-op": c.op, "data-outcome": c.outcome, title: c.message || c.request_id || "" });
    const cells = [clock(c.time_unix_ns), c.op, c.outcome, ms(c.total_ms), ms(c.queue_ms), ms(c.compute_ms),
      c.bytes_in === undefined ? "–" : bytes(c.bytes_in), c.bytes_out === undefined ? "–" : bytes(c.bytes_out)];
    cells.forEach((v, i) => {
      const td = el("td", i === 1 || i === 2 ? { class: "text" } : {}, String(v));
      if (i === 2) td.classList.add(c.outcome === "ok" ? "outcome-ok" : "outcome-err");
      row.appendChild(td);
    });
    body.appendChild(row);
  }
}

// -- events timeline -----------------------------------------------------------------------------

function describe(e) {
  const m = e.metadata || {};
  const keys = ["slot", "pid", "classification", "via", "op", "attempt", "device", "bytes", "growth_bytes",
    "since_crash_ms", "start_ms", "description", "message", "summary"];
  return keys.filter((k) => m[k] !== undefined && m[k] !== null && m[k] !== "")
    .map((k) => k + "=" + (k.endsWith("bytes") ? bytes(Number(m[k])) : m[k])).join(" ");
}

function renderEvents() {
  const list = document.getElementById("timeline");
  list.replaceChildren();
  for (const e of state.events.slice().reverse()) {
    const li = el("li", { class: "ev-" + e.event, "data-event": e.event, "data-classification": (e.metadata || {}).classification || "" });
    li.appendChild(el("span", { class: "muted" }, clock(e.time_unix_ns) + " "));
    li.appendChild(el("b", {}, e.event));
    li.appendChild(document.createTextNode(" " + describe(e)));
    list.appendChild(li);
  }
  const strip = document.getElementById("timeline-strip");
  strip.replaceChildren();
  // From the oldest event shown (at least one minute, at most five) up to now.
  const now = Date.now();
  const oldest = state.events.length ? state.events[0].time_unix_ns / 1e6 : now;
  const span = Math.min(5 * 60 * 1000, Math.max(60 * 1000, (now - oldest) * 1.05));
  strip.appendChild(el("svg:text", { x: 2, y: 38, "font-size": 9, fill: "#8a90a0" }, "−" + Math.round(span / 1000) + " s"));
  strip.appendChild(el("svg:text", { x: 598, y: 38, "font-size": 9, fill: "#8a90a0", "text-anchor": "end" }, "now"));
  for (const e of state.events) {
    const t = e.time_unix_ns / 1e6;
    if (t < now - span) continue;
    const x = 600 * (1 - (now - t) / span);
    const color = /crash|open|threshold|growth/.test(e.event) && e.event !== "breaker_half_open" ? "#b3261e"
      : /restart|close|started/.test(e.event) ? "#1f7a3a" : "#b36b00";
    const mark = el("svg:rect", { x: x.toFixed(1), y: 6, width: 3, height: 28, fill: color, "data-event": e.event });
    mark.appendChild(el("svg:title", {}, clock(e.time_unix_ns) + " " + e.event + " " + describe(e)));
    strip.appendChild(mark);
  }
}

// -- polling -------------------------------------------------------------------------------------

async function poll() {
  try {
    const [status, calls, events, memory] = await Promise.all([
      getJSON("/api/status"), getJSON("/api/calls?since=" + state.callsSeq),
      getJSON("/api/events?since=" + state.eventsSeq), getJSON("/api/memory?last=" + MAX_CHART_POINTS)]);
    state.calls = state.calls.concat(calls.calls).slice(-MAX_CALL_ROWS);
    state.callsSeq = calls.last;
    state.events = state.events.concat(events.events).slice(-MAX_EVENTS);
    state.eventsSeq = events.last;
    renderStatus(status);
    renderMemory(memory);
    renderCalls();
    renderEvents();
    state.failures = 0;
    document.getElementById("updated").textContent = "updated " + clock(status.time_unix_ns);
    document.body.dataset.polls = String(Number(document.body.dataset.polls || 0) + 1);
  } catch (err) {
    state.failures += 1;
    document.getElementById("updated").textContent = "unreachable (" + err.message + ")";
  }
  setTimeout(poll, state.failures ? Math.min(10000, POLL_MS * 2 ** state.failures) : POLL_MS);
}

poll();
