// The lorafleet console: one page, six views (#fleet, #runs, #playground, #serving, #tenants, #audit).
// Everything it loads comes from this server (CSP: 'self'); the admin key stays in this tab's
// sessionStorage and goes out only as an Authorization header to this origin.
"use strict";

const KEY = "lorafleet-console-key";
const PAGES = ["fleet", "runs", "playground", "serving", "tenants", "audit"];
const COLOURS = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00",
  "#b82e2e", "#316395", "#994499", "#22aa99", "#aaaa11", "#6633cc", "#e67300", "#8b0707"];
const METRICS = ["loss", "eval_loss", "lr", "tokens_per_s"];

const state = { session: null, live: null, run: null, series: {}, counts: {}, generation: 0, charts: {},
  servingHistory: [], fleet: null };

const $ = (selector) => document.querySelector(selector);

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  return node;
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { Authorization: `Bearer ${key}`, ...extra } : extra;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers(options.headers || {}) });
  if (response.status === 401 || (response.status === 403 && path.startsWith("/ui/api"))) {
    const message = await errorMessage(response);
    if (path.startsWith("/ui/api")) showLogin(message);
    throw new ApiError(response.status, message);
  }
  if (!response.ok) throw new ApiError(response.status, await errorMessage(response));
  const type = response.headers.get("content-type") || "";
  return type.includes("json") ? response.json() : response.text();
}

async function errorMessage(response) {
  try { return (await response.json()).error.message; } catch { return `${response.status} ${response.statusText}`; }
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(0)}%`);
const seconds = (x) => (x === null || x === undefined ? "–" : x < 1 ? `${(1000 * x).toFixed(0)} ms` : `${x.toFixed(2)} s`);

// --- signing in -------------------------------------------------------------------------------

function showLogin(message) {
  stopLive();
  $("#nav").hidden = true;
  $("#sign-out").hidden = true;
  for (const page of document.querySelectorAll(".page")) page.hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = message || "";
}

async function signIn(event) {
  event.preventDefault();
  sessionStorage.setItem(KEY, $("#login-key").value.trim());
  $("#login-key").value = "";
  await start();
}

function signOut() {
  sessionStorage.removeItem(KEY);
  showLogin("Signed out.");
}

async function start() {
  try {
    state.session = await api("/ui/api/session");
  } catch (err) {
    if (!(err instanceof ApiError && (err.status === 401 || err.status === 403))) showLogin(err.message);
    return;
  }
  $("#login").hidden = true;
  $("#nav").hidden = false;
  $("#sign-out").hidden = !state.session.keys;
  $("#who").textContent = state.session.tenant ? `signed in as ${state.session.tenant}` : "no keys: loopback only";
  $("#fleet-name").textContent = state.session.fleet_name;
  await route();
}

// --- routing and the live stream ----------------------------------------------------------------

async function route() {
  if (!state.session) return;
  const name = PAGES.includes(location.hash.slice(1)) ? location.hash.slice(1) : "fleet";
  for (const page of PAGES) $(`#page-${page}`).hidden = page !== name;
  for (const link of document.querySelectorAll("#nav a")) link.classList.toggle("current", link.dataset.page === name);
  stopLive();
  try {
    await LOADERS[name]();
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 401)) console.error(err);
  }
}

function stopLive() {
  if (state.live) state.live.abort();
  state.live = null;
}

// Server-Sent Events over fetch (EventSource cannot send the key); reconnects until stopped.
function startLive(query, handlers) {
  stopLive();
  const controller = new AbortController();
  state.live = controller;
  const connect = async () => {
    while (!controller.signal.aborted) {
      try {
        const response = await fetch(`/ui/api/live?${query()}`, { headers: headers(), signal: controller.signal });
        if (!response.ok) throw new Error(await errorMessage(response));
        await readEventBlocks(response, (block) => dispatch(block, handlers));
      } catch (err) {
        if (controller.signal.aborted) return;
      }
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  };
  connect();
}

// Calls onBlock with each Server-Sent Events block (the text between blank lines) of a streamed response.
async function readEventBlocks(response, onBlock) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      onBlock(buffer.slice(0, end));
      buffer = buffer.slice(end + 2);
    }
  }
}

function dispatch(block, handlers) {
  let event = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line.startsWith("event: ")) event = line.slice(7);
    else if (line.startsWith("data: ")) data.push(line.slice(6));
  }
  if (data.length && handlers[event]) handlers[event](JSON.parse(data.join("\n")));
}

// --- charts (uPlot, shipped in the package) -------------------------------------------------------

function chart(id, names, xLabel = "step", time = false) {
  const box = $(`#${id}`);
  if (state.charts[id]) state.charts[id].destroy();
  box.replaceChildren();
  const width = Math.max(320, box.clientWidth || 460);
  const options = {
    width, height: 220, legend: { live: false },
    scales: { x: { time } },
    axes: [{ label: xLabel }, {}],
    series: [{}, ...names.map((name, i) => ({ label: name, stroke: COLOURS[i % COLOURS.length], width: 1.5, spanGaps: true, points: { show: false } }))],
  };
  const data = [[], ...names.map(() => [])];
  state.charts[id] = new uPlot(options, data, box);
  box.dataset.points = "0";
  return state.charts[id];
}

// One x axis for several series that were sampled at different x: uPlot.join aligns them.
function joined(tables) {
  if (!tables.length) return [[]];
  return uPlot.join(tables.map(([x, y]) => [x, y]));
}

// --- Fleet -------------------------------------------------------------------------------------

async function loadFleet() {
  const fleet = await api("/ui/api/fleet");
  state.fleet = fleet;
  $("#fleet-base").textContent = fleet.base.name
    ? `Base model ${fleet.base.name} (${bytes(fleet.base.bytes)}), ${fleet.adapters.length} adapters, in ${fleet.fleet}`
    : `No base found: ${fleet.base.problem}`;
  const rows = fleet.adapters.map((adapter) => el("tr", { "data-adapter": adapter.name, class: adapter.withdrawn ? "withdrawn" : null },
    el("td", {}, el("b", { text: adapter.name }), adapter.id ? el("div", { class: "muted mono", text: adapter.id.slice(0, 12) }) : ""),
    el("td", { text: adapter.served === null ? "–" : adapter.served ? "yes" : "no" }),
    el("td", { text: `${adapter.config.r ?? "–"} / ${adapter.config.lora_alpha ?? "–"}` }),
    el("td", { class: "small", text: [].concat(adapter.config.target_modules || []).join(", ") }),
    el("td", { class: "small" }, ...(adapter.data || []).map((data) => el("div", {}, `${data.path.split("/").pop()} `,
      el("span", { class: "mono muted", title: data.sha256, text: data.sha256.slice(0, 12) }), ` ${data.records} records`))),
    el("td", { class: "scores" }, ...scoreLines(adapter.scores)),
    el("td", { text: bytes(adapter.bytes) }),
    el("td", { text: adapter.final_loss === undefined || adapter.final_loss === null ? "–" : adapter.final_loss.toFixed(4) }),
    el("td", {}, ...documentLinks(adapter.name, Boolean(adapter.id))),
  ));
  $("#adapters tbody").replaceChildren(...rows);
  $("#models tbody").replaceChildren(...fleet.models.map((model) => el("tr", { "data-model": model.name },
    el("td", { text: model.name }), el("td", { text: model.kind }),
    el("td", { text: model.parents.map((p) => `${p.relation} ${p.name}`).join(", ") }),
    el("td", {}, ...scoreLines(model.scores)), el("td", { text: bytes(model.bytes) }),
    el("td", {}, ...documentLinks(model.name, true)))));
  const svg = await api("/ui/api/lineage.svg");
  const parsed = new DOMParser().parseFromString(svg, "image/svg+xml").documentElement;
  $("#lineage").replaceChildren(document.importNode(parsed, true));
  performance.mark("lorafleet:fleet-ready");
}

function scoreLines(scores) {
  if (!scores || !scores.length) return ["–"];
  return scores.map((score) => el("div", { class: "score", "data-accuracy": score.accuracy ?? "" },
    `${score.data}: ${percent(score.base_accuracy)} → `, el("b", { text: percent(score.accuracy) })));
}

function documentLinks(name, registered) {
  if (!registered) return ["not registered"];
  return [["card", "model card"], ["annex", "Annex IV"]].map(([kind, label]) =>
    el("a", { href: `#fleet`, class: "doc-link", onclick: (event) => { event.preventDefault(); showDocument(name, kind, label); }, text: label }));
}

async function showDocument(name, kind, label) {
  const text = await api(`/ui/api/documents/${encodeURIComponent(name)}/${kind}`);
  $("#document-title").textContent = `${label}: ${name}`;
  $("#document-text").textContent = text;
  $("#document").hidden = false;
  $("#document").scrollIntoView();
}

// --- Runs --------------------------------------------------------------------------------------

async function loadRuns() {
  const { runs } = await api("/ui/api/runs");
  const chosen = runs.includes(state.run) ? state.run : runs.includes(".") ? "." : runs[0];
  fillRuns(runs, chosen);
  if (!runs.length) {
    $("#run-status").textContent = "No run yet: metrics.jsonl appears with the first optimizer step of `lorafleet train`.";
    startLive(() => "", { runs: runsChanged });
    return;
  }
  await showRun(chosen);
}

function fillRuns(runs, chosen) {
  $("#run-select").replaceChildren(...runs.map((run) => el("option", { value: run, text: run === "." ? "this fleet's run" : run, selected: run === chosen })));
  fillCompare(runs);
}

// A run started (or removed) while the page is open: the list follows; a first run is shown.
function runsChanged({ runs }) {
  const shown = runs.includes(state.run) ? state.run : null;
  fillRuns(runs, shown ?? runs[0]);
  if (!shown && runs.length) showRun(runs[0]);
}

async function showRun(run) {
  state.run = run;
  const overview = await api(`/ui/api/runs/overview?run=${encodeURIComponent(run)}`);
  state.series = overview.adapters;
  state.counts = overview.steps;
  state.generation = overview.generation;
  const names = Object.keys(state.series);
  for (const metric of METRICS) chart(`chart-${metric}`, names);
  drawRun();
  showRunFacts(overview);
  $("#run-status").textContent = `${names.length} adapters`;
  performance.mark("lorafleet:runs-ready");
  startLive(() => `run=${encodeURIComponent(run)}&generation=${state.generation}&counts=${encodeURIComponent(JSON.stringify(state.counts))}`, {
    runs: runsChanged,
    run: (update) => {
      if (update.reset) { showRun(run); return; }
      for (const [name, columns] of Object.entries(update.adapters)) {
        if (!state.series[name]) { showRun(run); return; }
        for (const column of Object.keys(columns)) state.series[name][column].push(...columns[column]);
        state.counts[name] = (state.counts[name] || 0) + columns.step.length;
      }
      drawRun();
      showRunFacts(update);
    },
  });
}

function drawRun() {
  const names = Object.keys(state.series);
  for (const metric of METRICS) {
    const id = `chart-${metric}`;
    const tables = names.map((name) => [state.series[name].step, state.series[name][metric]]);
    state.charts[id].setData(joined(tables));
    $(`#${id}`).dataset.points = String(names.reduce((sum, name) => sum + state.series[name][metric].filter((v) => v !== null).length, 0));
  }
}

function showRunFacts(facts) {
  if (facts.shared) {
    $("#shared tbody").replaceChildren(...facts.shared.map((group) => el("tr", {},
      el("td", { text: group.adapters.join(" + ") }), el("td", { text: group.fleet_steps }),
      el("td", { text: group.first }), el("td", { text: group.last }))));
  }
  if (facts.checkpoints) $("#run-checkpoints").textContent = `Checkpoints on disk at fleet steps: ${facts.checkpoints.join(", ") || "none"}`;
  if (facts.resumes) $("#run-resumes").textContent = facts.resumes.length ? `Resumed after fleet steps: ${facts.resumes.join(", ")}` : "Never resumed.";
}

function fillCompare(runs) {
  const a = $("#compare-a"), b = $("#compare-b");
  const [keepA, keepB] = [a.value, b.value];
  const options = (keep, fallback) => runs.map((run) => el("option", { value: run, text: run === "." ? "this fleet's run" : run,
    selected: run === (runs.includes(keep) ? keep : fallback) }));
  a.replaceChildren(...options(keepA, runs[0]));
  b.replaceChildren(...options(keepB, runs[1] ?? runs[0]));
}

async function compareRuns() {
  const metric = $("#compare-metric").value;
  const picked = [$("#compare-a").value, $("#compare-b").value];
  const names = [], tables = [];
  for (const run of picked) {
    const overview = await api(`/ui/api/runs/overview?run=${encodeURIComponent(run)}`);
    for (const [adapter, columns] of Object.entries(overview.adapters)) {
      names.push(`${run === "." ? "fleet" : run}: ${adapter}`);
      tables.push([columns.step, columns[metric]]);
    }
  }
  chart("chart-compare", names).setData(joined(tables));
  $("#chart-compare").dataset.points = String(tables.reduce((sum, [, y]) => sum + y.length, 0));
}

// --- Playground ------------------------------------------------------------------------------------

async function loadPlayground() {
  if (!state.session.serving) {
    $("#answers").replaceChildren(el("p", { text: "The playground needs a server: start `lorafleet serve --fleet DIR`." }));
    $("#ask").disabled = true;
    return;
  }
  const models = await api("/v1/models");
  const names = models.data.filter((m) => m.id === "base" || m.parent).map((m) => m.id);
  const box = $("#models-to-ask");
  box.replaceChildren(el("legend", { text: "Models" }), ...names.map((name, i) => el("label", {},
    el("input", { type: "checkbox", value: name, checked: i < 3, "data-model": name }), ` ${name}`)));
}

function imageAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function ask(event) {
  event.preventDefault();
  const models = [...document.querySelectorAll("#models-to-ask input:checked")].map((input) => input.value);
  const content = [{ type: "text", text: $("#prompt").value }];
  const file = $("#image").files[0];
  if (file) content.push({ type: "image_url", image_url: { url: await imageAsDataUrl(file) } });
  const body = { messages: [{ role: "user", content }], stream: true,
    temperature: Number($("#temperature").value), top_p: Number($("#top-p").value), max_tokens: Number($("#max-tokens").value) };
  if ($("#seed").value !== "") body.seed = Number($("#seed").value);
  const format = $("#response-format").value;
  if (format === "json_object") body.response_format = { type: "json_object" };
  if (format === "json_schema") body.response_format = { type: "json_schema", json_schema: { name: "reply", schema: JSON.parse($("#schema").value) } };
  const panes = models.map((model) => {
    const text = el("pre", { class: "answer-text" });
    const status = el("small", { class: "muted", text: "waiting…" });
    const pane = el("div", { class: "answer", "data-model": model, "data-chunks": "0", "data-done": "false" }, el("h3", { text: model }), text, status);
    return { model, pane, text, status };
  });
  $("#answers").replaceChildren(...panes.map((p) => p.pane));
  await Promise.all(panes.map((pane) => streamAnswer(pane, { ...body, model: pane.model })));
}

async function streamAnswer(pane, body) {
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", { method: "POST", headers: headers({ "Content-Type": "application/json" }), body: JSON.stringify(body) });
    if (!response.ok) throw new Error(await errorMessage(response));
    let chunks = 0;
    await readEventBlocks(response, (block) => {
      const line = block.trim();
      if (!line.startsWith("data: ") || line === "data: [DONE]") return;
      const chunk = JSON.parse(line.slice(6));
      const delta = chunk.choices && chunk.choices[0] ? chunk.choices[0].delta.content || "" : "";
      if (delta) { pane.text.textContent += delta; chunks++; pane.pane.dataset.chunks = String(chunks); }
      if (chunk.choices && chunk.choices[0] && chunk.choices[0].finish_reason) pane.status.textContent = `finished: ${chunk.choices[0].finish_reason}`;
    });
    pane.status.textContent += ` in ${((performance.now() - started) / 1000).toFixed(2)} s`;
  } catch (err) {
    pane.pane.classList.add("failed");
    pane.status.textContent = `failed: ${err.message}`;
  }
  pane.pane.dataset.done = "true";
}

// --- Serving -----------------------------------------------------------------------------------

async function loadServing() {
  if (!state.session.serving) { $("#serving-off").hidden = false; $("#serving-on").hidden = true; return; }
  const [snapshot, fleet] = await Promise.all([api("/ui/api/serving"), api("/ui/api/fleet")]);
  state.fleet = fleet;
  chart("chart-serving", ["tokens/s"], "time", true);
  showServing(snapshot);
  showLoadable(fleet);
  startLive(() => "", { serving: showServing });
}

function showServing(snapshot) {
  $("#stat-tokens").textContent = snapshot.tokens_per_s.toFixed(1);
  $("#stat-running").textContent = snapshot.running;
  $("#stat-waiting").textContent = snapshot.waiting;
  $("#stat-p50").textContent = seconds(snapshot.latency_p50_s);
  $("#stat-p99").textContent = seconds(snapshot.latency_p99_s);
  const history = snapshot.history || [];
  state.charts["chart-serving"].setData([history.map((p) => p[0]), history.map((p) => p[1])]);
  $("#by-model tbody").replaceChildren(...snapshot.models.map((row) => el("tr", { "data-model": row.model },
    el("td", { text: row.model }), el("td", { text: row.requests }), el("td", { text: row.errors }),
    el("td", { text: row.prompt_tokens }), el("td", { text: row.completion_tokens }))));
  $("#by-tenant tbody").replaceChildren(...snapshot.tenants.map((row) => el("tr", { "data-tenant": row.tenant },
    el("td", { text: row.tenant || "(no keys)" }), el("td", { text: row.model }), el("td", { text: row.requests }),
    el("td", { text: row.prompt_tokens }), el("td", { text: row.completion_tokens }))));
}

function showLoadable(fleet) {
  $("#loadable tbody").replaceChildren(...fleet.adapters.filter((a) => a.on_disk).map((adapter) => el("tr", { "data-adapter": adapter.name },
    el("td", { text: adapter.name }), el("td", { text: adapter.withdrawn ? "withdrawn" : adapter.served ? "loaded" : "not loaded" }),
    el("td", {}, adapter.served
      ? el("button", { type: "button", text: "Unload", onclick: () => changeAdapter("DELETE", `/v1/adapters/${encodeURIComponent(adapter.name)}`) })
      : el("button", { type: "button", text: "Load", onclick: () => changeAdapter("POST", "/v1/adapters", { name: adapter.name, path: adapter.path }) })))));
}

async function changeAdapter(method, path, body) {
  try {
    await api(path, { method, headers: { "Content-Type": "application/json" }, body: body ? JSON.stringify(body) : undefined });
    $("#load-result").textContent = "done";
  } catch (err) {
    $("#load-result").textContent = err.message;
  }
  showLoadable(await api("/ui/api/fleet"));
}

// --- Tenants and keys ------------------------------------------------------------------------------

async function loadTenants() {
  const { tenants, manages_keys: manages } = await api("/ui/api/tenants");
  $("#keys-mode").textContent = !state.session.keys
    ? "This server has no keys: anyone on this machine may call it."
    : manages ? "This server manages its keys file: keys created, revoked or rotated here take effect at once and are audited."
      : "Keys come from the server's keys file; start it with --manage-keys to create, revoke and rotate keys here.";
  $("#create-form").hidden = !manages;
  $("#tenants tbody").replaceChildren(...tenants.map((tenant) => el("tr", { "data-tenant": tenant.name },
    el("td", { text: tenant.name }), el("td", { class: "mono", text: tenant.key_id }), el("td", { text: tenant.admin ? "yes" : "" }),
    el("td", { text: Array.isArray(tenant.adapters) ? tenant.adapters.join(", ") : tenant.adapters }),
    el("td", { text: tenant.requests_per_minute ?? "–" }), el("td", { text: tenant.tokens_per_minute ?? "–" }),
    el("td", {}, ...(manages ? [confirmButton("Rotate", () => changeKey(tenant.name, "rotate")), " ",
      confirmButton("Revoke", () => changeKey(tenant.name, "revoke"))] : [])))));
}

// A destructive button asks once more on itself rather than in a dialog.
function confirmButton(label, action) {
  const button = el("button", { type: "button", class: "danger", "data-action": label.toLowerCase(), text: label });
  button.addEventListener("click", () => {
    if (button.dataset.armed) { action(); return; }
    button.dataset.armed = "yes";
    button.textContent = `Really ${label.toLowerCase()}?`;
    setTimeout(() => { delete button.dataset.armed; button.textContent = label; }, 5000);
  });
  return button;
}

async function changeKey(name, action) {
  $("#tenants-error").textContent = "";
  try {
    const result = await api(`/ui/api/tenants/${encodeURIComponent(name)}/${action}`, { method: "POST" });
    if (result.key) showNewKey(result.name, result.key);
  } catch (err) {
    $("#tenants-error").textContent = err.message;
  }
  await loadTenants();
}

async function createTenant(event) {
  event.preventDefault();
  const adapters = $("#new-adapters").value.trim();
  const body = { name: $("#new-name").value.trim(), admin: $("#new-admin").checked,
    adapters: adapters === "*" ? "*" : adapters.split(",").map((a) => a.trim()).filter(Boolean) };
  if ($("#new-rpm").value) body.requests_per_minute = Number($("#new-rpm").value);
  if ($("#new-tpm").value) body.tokens_per_minute = Number($("#new-tpm").value);
  $("#tenants-error").textContent = "";
  try {
    const result = await api("/ui/api/tenants", { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) });
    showNewKey(result.name, result.key);
    $("#create-form").reset();
  } catch (err) {
    $("#tenants-error").textContent = err.message;
  }
  await loadTenants();
}

function showNewKey(name, key) {
  $("#new-key-tenant").textContent = name;
  $("#new-key-value").textContent = key;
  $("#new-key").hidden = false;
}

// --- Audit -------------------------------------------------------------------------------------

function auditQuery() {
  const query = new URLSearchParams({ tenant: $("#audit-tenant").value, adapter: $("#audit-adapter").value, event: $("#audit-event").value });
  return query.toString();
}

async function loadAudit(event) {
  if (event) event.preventDefault();
  const { verification, entries } = await api(`/ui/api/audit?${auditQuery()}&limit=200`);
  const box = $("#verification");
  box.className = `notice ${verification.valid ? "ok" : verification.valid === false ? "broken" : ""}`;
  box.dataset.valid = String(verification.valid);
  box.textContent = verification.valid
    ? `The chain verifies: ${verification.entries} entries, seq ${verification.first_seq}…${verification.last_seq}.`
    : verification.valid === false ? `The chain does NOT verify. ${verification.problem}` : verification.problem;
  $("#entries tbody").replaceChildren(...entries.map((entry) => {
    const data = entry.data || {};
    return el("tr", { class: entry.intact ? null : "tampered", "data-seq": entry.seq, "data-event": entry.event },
      el("td", { text: entry.seq }), el("td", { class: "small", text: entry.time }), el("td", { text: entry.event }),
      el("td", { text: data.tenant ?? "" }), el("td", { text: data.adapter ?? data.name ?? "" }),
      el("td", { class: "small mono", text: entry.where }), el("td", { text: entry.intact ? "ok" : "EDITED" }));
  }));
}

async function exportAudit(format) {
  const text = await api(`/ui/api/audit/export?${auditQuery()}&format=${format}`);
  const link = el("a", { href: URL.createObjectURL(new Blob([text], { type: "text/plain" })), download: `audit.${format === "jsonl" ? "jsonl" : "log"}` });
  document.body.append(link);
  link.click();
  link.remove();
}

const LOADERS = { fleet: loadFleet, runs: loadRuns, playground: loadPlayground, serving: loadServing, tenants: loadTenants, audit: () => loadAudit() };

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", signIn);
  $("#sign-out").addEventListener("click", signOut);
  $("#run-select").addEventListener("change", (event) => showRun(event.target.value));
  $("#compare-go").addEventListener("click", compareRuns);
  $("#playground-form").addEventListener("submit", ask);
  $("#response-format").addEventListener("change", (event) => { $("#schema").hidden = event.target.value !== "json_schema"; });
  $("#load-form").addEventListener("submit", (event) => {
    event.preventDefault();
    changeAdapter("POST", "/v1/adapters", { name: $("#load-name").value, path: $("#load-path").value });
  });
  $("#create-form").addEventListener("submit", createTenant);
  $("#audit-form").addEventListener("submit", loadAudit);
  $("#export-jsonl").addEventListener("click", () => exportAudit("jsonl"));
  $("#export-cef").addEventListener("click", () => exportAudit("cef"));
  $("#document-close").addEventListener("click", () => { $("#document").hidden = true; });
  window.addEventListener("hashchange", route);
  start();
});
