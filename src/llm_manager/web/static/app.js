// LLM-Manager dashboard: plain JavaScript, no build step, nothing fetched from elsewhere.
// Model names, log lines and answers are always put in the page with textContent.
"use strict";

const $ = (sel) => document.querySelector(sel);
const state = {
  key: sessionStorage.getItem("llm-manager-key") || "",
  models: {},          // name -> model info (from /api/events or polling)
  modelsAt: 0,         // when that info arrived (ms), for the idle clock
  devices: null,
  events: null,        // EventSource of /api/events
  pollTimer: null,
  tab: "models",
};

// --- helpers ----------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = String(v);
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (state.key) h["Authorization"] = "Bearer " + state.key;
  return h;
}

class HttpError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options) {
  const opts = Object.assign({}, options || {});
  opts.headers = headers(opts.headers);
  const resp = await fetch(path, opts);
  if (resp.status === 401) {
    askForKey();
    throw new HttpError(401, "a key is needed");
  }
  const text = await resp.text();
  let body = null;
  try { body = text ? JSON.parse(text) : null; } catch (_) { body = null; }
  if (!resp.ok) {
    const err = body && (body.error || body.detail || body.message);
    const message = typeof err === "string" ? err
      : err && err.message ? err.message : `HTTP ${resp.status}`;
    throw new HttpError(resp.status, message);
  }
  return body;
}

let toastTimer = null;
function toast(message, kind) {
  const box = $("#toast");
  box.textContent = message;
  box.className = "toast" + (kind === "info" ? " info" : "");
  box.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { box.hidden = true; }, kind === "info" ? 3000 : 8000);
}

function modelUrl(name, tail) {
  return "/api/models/" + encodeURIComponent(name) + tail;
}

function fmtDuration(sec) {
  sec = Math.max(0, Math.floor(sec));
  if (sec < 60) return sec + "s";
  if (sec < 3600) return Math.floor(sec / 60) + "m " + (sec % 60) + "s";
  if (sec < 86400) return Math.floor(sec / 3600) + "h " + Math.floor((sec % 3600) / 60) + "m";
  return Math.floor(sec / 86400) + "d " + Math.floor((sec % 86400) / 3600) + "h";
}
const fmtMs = (ms) => (ms === null || ms === undefined ? "–" : ms < 1000
  ? ms.toFixed(0) + " ms" : (ms / 1000).toFixed(2) + " s");
const fmtNum = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString());
const fmtMiB = (mib) => (mib >= 1024 ? (mib / 1024).toFixed(1) + " GiB" : mib + " MiB");

// --- theme ------------------------------------------------------------------------------

const THEMES = ["auto", "dark", "light"];
function applyTheme(theme) {
  if (theme === "auto") document.documentElement.removeAttribute("data-theme");
  else document.documentElement.setAttribute("data-theme", theme);
  $("#theme").textContent = "◐ " + theme;
  localStorage.setItem("llm-manager-theme", theme);
  if (state.usage) drawChart(state.usage);
}

// --- key --------------------------------------------------------------------------------

function askForKey() {
  $("#keyform").hidden = false;
  setConn("key needed", "down");
}

function useKey(key) {
  state.key = key;
  sessionStorage.setItem("llm-manager-key", key);
  $("#keyform").hidden = true;
  connectEvents();
  showTab(state.tab);
}

// --- tabs -------------------------------------------------------------------------------

function showTab(name) {
  state.tab = name;
  for (const b of document.querySelectorAll(".tabs button")) {
    b.classList.toggle("active", b.dataset.tab === name);
  }
  for (const s of document.querySelectorAll("main .tab")) {
    s.classList.toggle("active", s.id === "tab-" + name);
  }
  if (location.hash !== "#" + name) history.replaceState(null, "", "#" + name);
  if (name === "usage") loadUsage();
  if (name === "logs") ensureLogStream();
}

// --- live state: /api/events, or polling when a key is needed ----------------------------

function setConn(text, cls) {
  const c = $("#conn");
  c.textContent = text;
  c.className = "conn " + (cls || "");
}

function connectEvents() {
  if (state.events) { state.events.close(); state.events = null; }
  clearInterval(state.pollTimer);
  state.pollTimer = null;
  if (state.key) {  // EventSource cannot send the key: poll instead
    setConn("polling", "live");
    const poll = async () => {
      try {
        const info = await api("/api/models/all-models/info");
        onModels(info);
        const dev = await api("/api/devices/info");
        onDevices(dev);
      } catch (e) {
        setConn("reconnecting…", "down");
      }
    };
    poll();
    state.pollTimer = setInterval(poll, 2000);
    return;
  }
  const source = new EventSource("/api/events");
  state.events = source;
  source.addEventListener("open", () => setConn("live", "live"));
  source.addEventListener("models", (e) => onModels(JSON.parse(e.data)));
  source.addEventListener("devices", (e) => onDevices(JSON.parse(e.data)));
  source.addEventListener("end", () => setConn("server stopping…", "down"));
  source.addEventListener("error", () => {
    setConn("reconnecting…", "down");
    if (source.readyState === EventSource.CLOSED && state.events === source) {
      // The browser gave up (an HTTP error): find out why, then try again.
      state.events = null;
      setTimeout(async () => {
        try { await api("/api/models/all-models/info"); } catch (_) { /* shown already */ }
        if (!state.events && !state.pollTimer) connectEvents();
      }, 3000);
    }
  });
}

// --- models tab -------------------------------------------------------------------------

const ACTIVE = new Set(["starting", "health_check", "routing"]);
const busy = new Set();  // models with a start/stop request in flight
// The API keeps the seed's values (routing, health_check, Chat); a person reads these
// (the CLI's words, cli/words.py).
const STATE_WORDS = { routing: "ready", health_check: "loading" };
const stateWord = (status) => STATE_WORDS[status] || String(status).replace(/_/g, " ");
const modeWord = (mode) => String(mode || "").toLowerCase();

function onModels(body) {
  state.models = body.models || {};
  state.modelsAt = Date.now();
  const total = body.total_models ?? Object.keys(state.models).length;
  $("#summary").textContent = `${total} models · ${body.running_models ?? 0} running · `
    + `${body.total_pending_requests ?? 0} pending`
    + (body.total_waiting_requests ? ` · ${body.total_waiting_requests} waiting` : "");
  renderModels();
  fillModelSelect($("#log-model"));
  fillModelSelect($("#pg-model"));
}

function renderModels() {
  const tbody = $("#models tbody");
  const names = Object.keys(state.models);
  $("#models-empty").hidden = names.length > 0;
  const rows = new Map();
  for (const tr of tbody.querySelectorAll("tr")) rows.set(tr.dataset.model, tr);
  for (const [name, tr] of rows) if (!(name in state.models)) tr.remove();
  for (const name of names) {
    const m = state.models[name];
    const fresh = modelRow(name, m);
    const old = rows.get(name);
    if (old) old.replaceWith(fresh); else tbody.append(fresh);
  }
  // keep the configuration's order
  for (const name of names) {
    const tr = tbody.querySelector(`tr[data-model="${CSS.escape(name)}"]`);
    if (tr) tbody.append(tr);
  }
}

function idleText(m) {
  if (!ACTIVE.has(m.status)) return "–";
  if (m.pending_requests > 0) return "busy";
  return fmtDuration(m.idle_time_sec + (Date.now() - state.modelsAt) / 1000);
}

function modelRow(name, m) {
  const stateCell = el("td", {},
    el("span", { class: "badge " + m.status, text: stateWord(m.status), title: m.status }));
  if (m.failure_reason) stateCell.append(el("div", { class: "reason", text: m.failure_reason }));
  if (m.waiting_for && m.waiting_for.length) {
    stateCell.append(el("div", { class: "queue", text: `waiting for room: ${m.waiting_for.join(", ")}` }));
  }
  if (m.turn_ends_in_sec != null) {
    const turn = m.turn_ends_in_sec > 0
      ? `another model waits: turn ends in ${fmtDuration(m.turn_ends_in_sec)}`
      : "another model waits: finishing, then swapped out";
    stateCell.append(el("div", { class: "queue", text: turn }));
  }
  const inFlight = busy.has(name);
  const canStart = !inFlight && !ACTIVE.has(m.status) && m.status !== "stopping";
  const canStop = !inFlight && ACTIVE.has(m.status);
  const tr = el("tr", { "data-model": name, "data-state": m.status },
    el("td", { class: "name", text: name }),
    el("td", { class: "col-opt", text: (m.aliases || []).join(", ") || "–" }),
    el("td", { class: "col-opt", text: modeWord(m.mode) }),
    stateCell,
    el("td", { class: "col-opt", text: m.config_source || "–",
      title: m.current_bat_path ? "command: " + m.current_bat_path : "" }),
    memoryCell(m.memory),
    el("td", { class: "num col-opt", text: m.port ?? "–" }),
    el("td", { class: "num col-opt", text: m.pid ?? "–" }),
    el("td", { class: "num col-opt", text: m.waiting ? `${m.pending_requests} (${m.waiting} waiting)` : m.pending_requests }),
    el("td", { class: "num idle", text: idleText(m) }),
    el("td", {},
      el("div", { class: "actions" },
        el("button", {
          type: "button", class: "start", disabled: !canStart,
          onclick: () => modelAction(name, "start"),
        }, "Start"),
        el("button", {
          type: "button", class: "stop", disabled: !canStop,
          onclick: () => modelAction(name, "stop"),
        }, "Stop"))));
  if (!m.is_available) tr.title = "no scheme's devices are present";
  return tr;
}

// Memory of the scheme in use (or the one a start would pick), per device key:
// declared / measured peak / planned (source); the API's warnings highlighted
// (api/memory.py; the CLI says the same in cli/memory.py).
const peakOf = (d) => {
  const seen = [d.load_peak, d.serve_peak].filter((v) => v !== null && v !== undefined);
  return seen.length ? Math.max(...seen) : null;
};
const mibOr = (v) => (v === null || v === undefined ? "–" : fmtMiB(v));

function memoryTitle(key, d) {
  const parts = [`${key}: declared ${d.declared === "auto" ? "auto" : d.declared + " MiB"}`];
  parts.push(`measured: load peak ${mibOr(d.load_peak)}, serve peak ${mibOr(d.serve_peak)}`
    + ` over ${d.runs || 0} run(s)`);
  if (d.now !== null && d.now !== undefined) parts.push(`now ${fmtMiB(d.now)}`);
  parts.push(d.planned === null || d.planned === undefined
    ? "planned: nothing to go by (write a number)"
    : `planned ${fmtMiB(d.planned)} (${d.source})`);
  if (d.booked !== null && d.booked !== undefined) parts.push(`booked this run ${fmtMiB(d.booked)}`);
  if (d.estimate !== null && d.estimate !== undefined) parts.push(`GGUF estimate ${fmtMiB(d.estimate)}`);
  return parts.join("\n");
}

function memoryCell(mem) {
  const td = el("td", { class: "col-opt memory" });
  if (!mem || !mem.scheme) { td.textContent = "–"; return td; }
  for (const [key, d] of Object.entries(mem.devices || {})) {
    const declared = d.declared === "auto" ? "auto" : fmtMiB(d.declared);
    const planned = d.planned === null || d.planned === undefined
      ? "unplanned" : `${fmtMiB(d.planned)} (${d.source})`;
    td.append(el("div", { class: "mem", "data-device": key, title: memoryTitle(key, d) },
      el("span", { class: "key", text: key }), " ",
      el("span", { class: "declared", text: declared }), " / ",
      el("span", { class: "peak", text: mibOr(peakOf(d)) }), " / ",
      el("span", { class: "planned" + (d.source === "none" ? " none" : ""), text: planned })));
  }
  if (mem.host) {
    const h = mem.host;
    td.append(el("div", { class: "mem", "data-device": "system",
      title: `system memory (not in the scheme's devices): load peak ${mibOr(h.load_peak)}, `
        + `serve peak ${mibOr(h.serve_peak)} over ${h.runs || 0} run(s)` },
      el("span", { class: "key", text: "system" }), " ",
      el("span", { class: "peak", text: mibOr(peakOf(h)) })));
  }
  if (mem.estimate_error) {
    td.append(el("div", { class: "mem-note", text: "no estimate: " + mem.estimate_error }));
  }
  for (const w of mem.warnings || []) td.append(el("div", { class: "mem-warn", text: "⚠ " + w }));
  if (!td.childNodes.length) td.textContent = "–";
  return td;
}

async function modelAction(name, action) {
  busy.add(name);
  renderModels();
  try {
    const body = await api(modelUrl(name, "/" + action), { method: "POST" });
    if (body && body.message) toast(body.message, "info");
  } catch (e) {
    toast(`${action} ${name}: ${e.message}`);
  } finally {
    busy.delete(name);
    renderModels();
    if (state.key) refreshModels();
  }
}

async function refreshModels() {
  try { onModels(await api("/api/models/all-models/info")); } catch (_) { /* polling retries */ }
}

function fillModelSelect(select) {
  const names = Object.keys(state.models);
  const current = select.value;
  const existing = Array.from(select.options).map((o) => o.value);
  if (existing.join("\n") === names.join("\n")) return;
  select.replaceChildren(...names.map((n) => el("option", { value: n, text: n })));
  if (names.includes(current)) select.value = current;
  if (select.id === "log-model" && state.tab === "logs") ensureLogStream();
}

// --- logs tab ---------------------------------------------------------------------------

const MAX_LINES = 5000;
const logs = { source: null, model: null, lines: [], paused: false, held: [], levels: {} };

// How serious a line is, read from what it says (llama.cpp writes everything to stderr):
// the rules of src/llm_manager/loglevel.py, which tests/test_log_levels.py checks against
// this function line by line.
const LEVEL_MARKS = { E: "error", F: "error", W: "warning", I: "info", D: "info", T: "info",
  TRACE: "info", DEBUG: "info", INFO: "info", NOTICE: "info", WARN: "warning",
  WARNING: "warning", ERROR: "error", CRITICAL: "error", FATAL: "error", PANIC: "error",
  ALERT: "error", EMERG: "error", CRIT: "error" };
const LEVEL_RULES = {
  llama: /^\s*(?:\d+(?:\.\d+)+\s+)?([DIWE]) /,
  glog: /^([IWEF])\d{4} /,
  named: /(?<![\w-])(TRACE|DEBUG|INFO|NOTICE|WARNING|WARN|ERROR|CRITICAL|FATAL|PANIC)(?![\w-])/,
  tagged: /\[(debug|info|notice|warn|warning|error|crit|critical|alert|emerg|fatal)\]|\blevel"?\s*[:=]\s*"?(trace|debug|info|notice|warn|warning|error|critical|fatal|panic)\b/i,
  errorWords: /\b(?:error|fatal|exception|panic|failed|failure|aborted|out of memory|segmentation fault)\b/i,
  errorNames: /\b[A-Z][A-Za-z0-9]*(?:Error|Exception)\b/,
  warningWords: /\b(?:warn|warns|warned|warning|warnings|deprecated)\b/i,
  warningNames: /\b[A-Z][A-Za-z0-9]*Warning\b/,
};
const NAMED_WITHIN = 48;
const TRACEBACK = "Traceback (most recent call last):";
const CHAINED = ["During handling of the above exception, another exception occurred:",
  "The above exception was the direct cause of the following exception:"];

function classifyLine(message) {
  let m = LEVEL_RULES.llama.exec(message) || LEVEL_RULES.glog.exec(message);
  if (m) return LEVEL_MARKS[m[1]];
  m = LEVEL_RULES.named.exec(message.slice(0, NAMED_WITHIN));
  if (m) return LEVEL_MARKS[m[1]];
  m = LEVEL_RULES.tagged.exec(message);
  if (m) return LEVEL_MARKS[(m[1] || m[2]).toUpperCase()];
  if (LEVEL_RULES.errorWords.test(message) || LEVEL_RULES.errorNames.test(message)) return "error";
  if (LEVEL_RULES.warningWords.test(message) || LEVEL_RULES.warningNames.test(message)) return "warning";
  return "info";
}

// levels: { stream: true while a Python traceback is open on it }
function lineLevel(levels, stream, message) {
  if (message.startsWith(TRACEBACK)) { levels[stream] = true; return "error"; }
  if (levels[stream]) {
    if (!message.trim() || /^\s/.test(message) || CHAINED.some((c) => message.startsWith(c))) {
      return "error";
    }
    levels[stream] = false;  // the exception line ends the traceback
    return "error";
  }
  return classifyLine(message);
}

function ensureLogStream() {
  const model = $("#log-model").value;
  if (!model || (logs.model === model && (logs.source || state.key))) return;
  openLogStream(model);
}

function openLogStream(model) {
  if (logs.source) { logs.source.close(); logs.source = null; }
  logs.model = model;
  logs.lines = [];
  logs.held = [];
  logs.levels = {};
  $("#log-lines").replaceChildren();
  const url = modelUrl(model, "/logs/stream") + "?history=1000";
  if (state.key) {  // no EventSource with a key: read the history once
    $("#log-status").textContent = "snapshot (live logs need an unauthenticated EventSource)";
    fetch(url + "&follow=false", { headers: headers() }).then((r) => r.text()).then((text) => {
      for (const chunk of text.split("\n\n")) {
        if (chunk.startsWith("data: ")) onLogEvent(model, JSON.parse(chunk.slice(6)));
      }
    }).catch((e) => toast("logs: " + e.message));
    return;
  }
  $("#log-status").textContent = "connecting…";
  const source = new EventSource(url);
  logs.source = source;
  source.addEventListener("open", () => {
    // On a reconnect the history comes again: start the view afresh.
    logs.lines = [];
    logs.held = [];
    logs.levels = {};
    $("#log-lines").replaceChildren();
    $("#log-status").textContent = "live";
  });
  source.onmessage = (e) => onLogEvent(model, JSON.parse(e.data));
  source.onerror = () => {
    $("#log-status").textContent = "reconnecting…";
    if (source.readyState === EventSource.CLOSED && logs.source === source) {
      logs.source = null;
      setTimeout(() => { if (!logs.source && logs.model === model) openLogStream(model); }, 3000);
    }
  };
}

function onLogEvent(model, data) {
  if (model !== logs.model) return;
  if (data.type === "historical" || data.type === "realtime") {
    const line = data.log;
    // The server's level where it sends one (it sends one on every line); the same rules
    // here where it does not.
    line.level = line.level || lineLevel(logs.levels, line.stream || "", line.message);
    logs.lines.push(line);
    if (logs.lines.length > MAX_LINES) logs.lines.splice(0, logs.lines.length - MAX_LINES);
    if (logs.paused) logs.held.push(line);
    else appendLines([line]);
  } else if (data.type === "historical_complete") {
    $("#log-status").textContent = logs.source ? "live" : `${data.count} lines`;
  } else if (data.type === "stream_end") {
    $("#log-status").textContent = "stream ended";
  }
}

function fmtTime(ts) {
  const d = new Date(ts * 1000);
  return d.toLocaleTimeString([], { hour12: false }) + "." + String(d.getMilliseconds()).padStart(3, "0");
}

function lineNode(line) {
  const node = el("div", {
    class: `line lvl-${line.level || "info"}` + (line.stream === "manager" ? " manager" : ""),
    "data-stream": line.stream || "", "data-level": line.level || "info",
    title: line.stream || "" },
    el("span", { class: "ts", text: fmtTime(line.timestamp) }),
    el("span", { class: "msg-text", text: line.message }));
  const filter = $("#log-search").value.toLowerCase();
  if (filter && !line.message.toLowerCase().includes(filter)) node.hidden = true;
  return node;
}

function appendLines(lines) {
  const box = $("#log-lines");
  box.append(...lines.map(lineNode));
  while (box.childElementCount > MAX_LINES) box.firstElementChild.remove();
  if ($("#log-follow").checked) box.scrollTop = box.scrollHeight;
}

function applyLogFilter() {
  const filter = $("#log-search").value.toLowerCase();
  for (const node of $("#log-lines").children) {
    const text = node.querySelector(".msg-text").textContent.toLowerCase();
    node.hidden = Boolean(filter) && !text.includes(filter);
  }
}

function togglePause() {
  logs.paused = !logs.paused;
  $("#log-pause").textContent = logs.paused ? "Resume" : "Pause";
  if (!logs.paused && logs.held.length) {
    appendLines(logs.held);
    logs.held = [];
  }
}

function downloadLog() {
  const text = logs.lines.map((l) => `${new Date(l.timestamp * 1000).toISOString()} `
    + `[${l.stream}] ${l.message}`).join("\n") + "\n";
  const link = el("a", {
    href: URL.createObjectURL(new Blob([text], { type: "text/plain" })),
    download: `${logs.model || "log"}.txt`.replace(/[\\/:*?"<>|]/g, "_"),
  });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

// --- devices tab ------------------------------------------------------------------------

function onDevices(body) {
  state.devices = body.devices || {};
  renderDevices();
}

function memoryBar(used, total) {
  const pct = total ? Math.min(100, (100 * used) / total) : 0;
  const bar = el("div", { class: "bar" + (pct > 85 ? " high" : ""), title: pct.toFixed(0) + "%" },
    el("div", { style: `width:${pct.toFixed(1)}%` }));
  return [bar, el("div", { class: "row" },
    el("span", { class: "muted", text: "memory" }),
    el("span", { text: `${fmtMiB(used)} / ${fmtMiB(total)} (${pct.toFixed(0)}%)` }))];
}

function row(label, value) {
  return el("div", { class: "row" },
    el("span", { class: "muted", text: label }), el("span", { text: value }));
}

function renderDevices() {
  const cards = [];
  for (const [family, report] of Object.entries(state.devices || {})) {
    if (family === "cpu") {
      const info = report.info || {};
      const card = el("div", { class: "card", "data-device": "cpu" },
        el("h3", { text: `CPU${info.cpu_count ? " · " + info.cpu_count + " cores" : ""}` }));
      if (report.online && info.memory_total) card.append(...memoryBar(info.memory_used, info.memory_total));
      if (info.temperature !== undefined) card.append(row("temperature", info.temperature + " °C"));
      if (!report.online) card.append(row("offline", report.error || ""));
      cards.push(card);
      continue;
    }
    const devices = (report.info && report.info.devices) || [];
    if (!report.online || devices.length === 0) {
      cards.push(el("div", { class: "card", "data-device": family },
        el("h3", { text: family.toUpperCase() }),
        row("offline", report.error || "no devices")));
      continue;
    }
    for (const d of devices) {
      const card = el("div", { class: "card", "data-device": d.key },
        el("h3", { text: `${d.name} · ${d.key}` }));
      if (d.memory_total) card.append(...memoryBar(d.memory_used, d.memory_total));
      if (d.temperature !== null && d.temperature !== undefined) {
        card.append(row("temperature", d.temperature + " °C"));
      }
      if (d.utilization !== undefined) card.append(row("utilisation", d.utilization + " %"));
      if (d.processes) {
        const ours = d.processes.filter((p) => p.model);
        card.append(row("models", ours.length ? "" : "none"));
        if (ours.length) {
          card.append(el("ul", { class: "procs" }, ...ours.map((p) =>
            el("li", { text: `${p.model} (PID ${p.pid}, ${fmtMiB(p.memory_used)})` }))));
        }
        const others = d.processes.length - ours.length;
        if (others) card.append(row("other processes", String(others)));
      }
      if (!d.online) card.append(row("offline", ""));
      cards.push(card);
    }
  }
  $("#devices").replaceChildren(...cards);
}

// --- usage tab --------------------------------------------------------------------------

const PALETTE = ["#2563eb", "#16a34a", "#d97706", "#db2777", "#7c3aed", "#0891b2",
  "#dc2626", "#65a30d", "#ea580c", "#4f46e5"];

async function loadUsage() {
  try {
    const [usage, requests] = await Promise.all([
      api("/api/usage?bucket=hour&since=24h"), api("/api/requests?limit=50")]);
    state.usage = usage;
    drawChart(usage);
    renderTotals(usage);
    renderRequests(requests.requests || []);
  } catch (e) {
    if (e.status !== 401) toast("usage: " + e.message);
  }
}

function niceCeil(value) {  // 1, 2, 4, 5 or 10 times a power of ten, divisible by 4 ticks
  const power = Math.pow(10, Math.floor(Math.log10(value)));
  for (const step of [1, 2, 4, 8, 10]) if (step * power >= value) return Math.max(4, step * power);
  return 10 * power;
}

function drawChart(usage) {
  const canvas = $("#usage-chart");
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || 800;
  const height = canvas.clientHeight || 220;
  canvas.width = Math.round(width * dpr);
  canvas.height = Math.round(height * dpr);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const styles = getComputedStyle(document.documentElement);
  const fg = styles.getPropertyValue("--muted").trim() || "#888";
  const line = styles.getPropertyValue("--line").trim() || "#ccc";
  const now = Math.floor(Date.now() / 1000 / 3600) * 3600;
  const hours = [];
  for (let h = now - 23 * 3600; h <= now; h += 3600) hours.push(h);
  const models = Object.keys(usage.series || {});
  const stacks = hours.map((h) => models.map((m) => {
    const b = (usage.series[m] || []).find((x) => x.start === h);
    return b ? (b.prompt_tokens || 0) + (b.completion_tokens || 0) : 0;
  }));
  const max = niceCeil(Math.max(1, ...stacks.map((s) => s.reduce((a, b) => a + b, 0))));
  const left = 44, bottom = 22, top = 10, right = 8;
  const plotW = width - left - right, plotH = height - top - bottom;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = fg;
  ctx.strokeStyle = line;
  ctx.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {  // grid and scale
    const y = top + plotH - (plotH * i) / 4 + 0.5;
    ctx.beginPath(); ctx.moveTo(left, y); ctx.lineTo(width - right, y); ctx.stroke();
    ctx.textAlign = "right";
    ctx.fillText(fmtNum(Math.round((max * i) / 4)), left - 4, y + 3);
  }
  const slot = plotW / hours.length;
  let bars = 0;
  hours.forEach((h, i) => {
    let y = top + plotH;
    stacks[i].forEach((tokens, j) => {
      if (!tokens) return;
      const barH = Math.max(1, (plotH * tokens) / max);
      ctx.fillStyle = PALETTE[j % PALETTE.length];
      ctx.fillRect(left + i * slot + slot * 0.15, y - barH, slot * 0.7, barH);
      y -= barH;
      bars += 1;
    });
    if (i % 3 === 2 || i === hours.length - 1) {
      ctx.fillStyle = fg;
      ctx.textAlign = "center";
      const label = new Date(h * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
      ctx.fillText(label, left + i * slot + slot / 2, height - 6);
    }
  });
  canvas.dataset.bars = String(bars);
  $("#usage-legend").replaceChildren(...models.map((m, j) =>
    el("span", { style: `--swatch:${PALETTE[j % PALETTE.length]}`, text: m })));
}

function renderTotals(usage) {
  const rows = Object.entries(usage.totals || {}).map(([name, t]) => el("tr", {},
    el("td", { class: "name", text: name }),
    el("td", { class: "num", text: fmtNum(t.requests) }),
    el("td", { class: "num", text: fmtNum(t.prompt_tokens) }),
    el("td", { class: "num", text: fmtNum(t.completion_tokens) }),
    el("td", { class: "num", text: fmtNum(t.errors) }),
    el("td", { class: "num", text: fmtMs(t.avg_duration_ms) }),
    el("td", { class: "num", text: fmtMs(t.avg_ttfb_ms) })));
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: 7, class: "muted", text: "no requests in the last 24 h" })));
  $("#usage-totals tbody").replaceChildren(...rows);
}

function renderRequests(records) {
  const rows = records.map((r) => el("tr", { "data-status": r.status },
    el("td", { text: new Date(r.started_at * 1000).toLocaleTimeString([], { hour12: false }) }),
    el("td", { class: "name", text: r.model }),
    el("td", { text: r.endpoint + (r.stream ? " (stream)" : "") }),
    el("td", { class: "num", text: r.status }),
    el("td", { class: "num", text: fmtMs(r.duration_ms) }),
    el("td", { class: "num", text: fmtMs(r.ttfb_ms) }),
    el("td", { class: "num", text: fmtNum(r.prompt_tokens) }),
    el("td", { class: "num", text: fmtNum(r.completion_tokens) }),
    el("td", { class: "reason", text: r.error || "" })));
  $("#requests tbody").replaceChildren(...rows);
}

// --- playground -------------------------------------------------------------------------

const chat = { history: [], abort: null };

function bubble(role, text) {
  const body = el("span", { class: "body", text });
  const node = el("div", { class: "msg " + role }, el("span", { class: "who", text: role }), body);
  $("#pg-output").append(node);
  $("#pg-output").scrollTop = $("#pg-output").scrollHeight;
  return body;
}

async function sendPlayground(ev) {
  ev.preventDefault();
  const model = $("#pg-model").value;
  const input = $("#pg-input").value;
  if (!model || !input.trim() || chat.abort) return;
  const kind = document.querySelector("input[name=pg-kind]:checked").value;
  $("#pg-input").value = "";
  bubble("user", input);
  chat.abort = new AbortController();
  $("#pg-send").disabled = true;
  $("#pg-stop").disabled = false;
  try {
    if (kind === "embedding") await runEmbedding(model, input);
    else await runChat(model, input);
  } catch (e) {
    if (e.name !== "AbortError") bubble("error", e.message);
  } finally {
    chat.abort = null;
    $("#pg-send").disabled = false;
    $("#pg-stop").disabled = true;
  }
}

async function failure(resp) {
  const text = await resp.text();
  try {
    const body = JSON.parse(text);
    const err = body.error;
    return new HttpError(resp.status, `HTTP ${resp.status}: ${err && err.message ? err.message : err || text}`);
  } catch (_) {
    return new HttpError(resp.status, `HTTP ${resp.status}: ${text.slice(0, 300)}`);
  }
}

async function runChat(model, input) {
  chat.history.push({ role: "user", content: input });
  const resp = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model, messages: chat.history, stream: true }),
    signal: chat.abort.signal,
  });
  if (!resp.ok) { chat.history.pop(); throw await failure(resp); }
  const out = bubble("assistant", "");
  out.parentElement.dataset.streaming = "1";
  let answer = "";
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const lineText = buffer.slice(0, cut).replace(/\r$/, "");
        buffer = buffer.slice(cut + 1);
        if (!lineText.startsWith("data:")) continue;
        const data = lineText.slice(5).trim();
        if (!data || data === "[DONE]") continue;
        let chunk;
        try { chunk = JSON.parse(data); } catch (_) { continue; }
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        const choice = (chunk.choices || [])[0];
        const piece = choice && choice.delta ? choice.delta.content || "" : "";
        if (piece) {
          answer += piece;
          out.textContent = answer;
          $("#pg-output").scrollTop = $("#pg-output").scrollHeight;
        }
      }
    }
  } finally {
    delete out.parentElement.dataset.streaming;
    out.parentElement.dataset.done = "1";
    chat.history.push({ role: "assistant", content: answer });
  }
}

async function runEmbedding(model, input) {
  const resp = await fetch("/v1/embeddings", {
    method: "POST",
    headers: headers({ "Content-Type": "application/json" }),
    body: JSON.stringify({ model, input }),
    signal: chat.abort.signal,
  });
  if (!resp.ok) throw await failure(resp);
  const body = await resp.json();
  const vector = (body.data && body.data[0] && body.data[0].embedding) || [];
  const head = vector.slice(0, 6).map((x) => Number(x).toFixed(4)).join(", ");
  const node = bubble("assistant", `vector length: ${vector.length}\n[${head}${vector.length > 6 ? ", …" : ""}]`);
  node.parentElement.dataset.done = "1";
}

// --- start ------------------------------------------------------------------------------

function init() {
  applyTheme(localStorage.getItem("llm-manager-theme") || "auto");
  $("#theme").addEventListener("click", () => {
    const now = localStorage.getItem("llm-manager-theme") || "auto";
    applyTheme(THEMES[(THEMES.indexOf(now) + 1) % THEMES.length]);
  });
  $("#keyform").addEventListener("submit", (e) => {
    e.preventDefault();
    useKey($("#key").value.trim());
  });
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => showTab(b.dataset.tab));
  }
  $("#stop-all").addEventListener("click", async () => {
    try {
      const body = await api("/api/models/stop-all", { method: "POST" });
      toast(body.message, "info");
    } catch (e) { toast("stop-all: " + e.message); }
  });
  $("#log-model").addEventListener("change", () => openLogStream($("#log-model").value));
  $("#log-search").addEventListener("input", applyLogFilter);
  $("#log-pause").addEventListener("click", togglePause);
  $("#log-download").addEventListener("click", downloadLog);
  $("#usage-refresh").addEventListener("click", loadUsage);
  $("#pg-form").addEventListener("submit", sendPlayground);
  $("#pg-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("#pg-form").requestSubmit();
  });
  $("#pg-stop").addEventListener("click", () => chat.abort && chat.abort.abort());
  $("#pg-clear").addEventListener("click", () => {
    chat.history = [];
    $("#pg-output").replaceChildren();
  });
  setInterval(() => {  // the idle clock; the server only sends changes
    for (const tr of document.querySelectorAll("#models tbody tr")) {
      const m = state.models[tr.dataset.model];
      if (m) tr.querySelector(".idle").textContent = idleText(m);
    }
  }, 1000);
  setInterval(() => { if (state.tab === "usage" && !document.hidden) loadUsage(); }, 15000);
  window.addEventListener("resize", () => { if (state.usage) drawChart(state.usage); });
  connectEvents();
  const wanted = location.hash.slice(1);
  showTab(["models", "logs", "devices", "usage", "playground"].includes(wanted) ? wanted : "models");
}

document.addEventListener("DOMContentLoaded", init);
