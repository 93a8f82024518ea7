// The pgstagechain dashboard: polls one snapshot per refresh and fills the page with
// textContent only (keys and error texts are data, never markup).
"use strict";

const REFRESH_MS = 2000;
const SVG_NS = "http://www.w3.org/2000/svg";
const WRITE_HEADER = "X-PgStageChain-Dashboard";
let config = null;
let failureStage = "";
let rerunStage = null;
let rerunPending = null;

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function seconds(value) {
  if (value === null || value === undefined) return "-";
  if (value < 1) return Math.round(value * 1000) + "ms";
  if (value < 60) return value.toFixed(1) + "s";
  if (value < 3600) return Math.floor(value / 60) + "m" + String(Math.floor(value % 60)).padStart(2, "0") + "s";
  return Math.floor(value / 3600) + "h" + String(Math.floor((value % 3600) / 60)).padStart(2, "0") + "m";
}

function rate(perMinute) {
  return (perMinute < 10 ? perMinute.toFixed(1) : Math.round(perMinute)) + "/min";
}

function when(iso) {
  return iso ? new Date(iso).toLocaleTimeString() : "";
}

function token() {
  const fromHash = new URLSearchParams(location.hash.slice(1)).get("token");
  if (fromHash) {
    sessionStorage.setItem("pgstagechain-token", fromHash);
    history.replaceState(null, "", location.pathname + location.search);
  }
  return $("token").value || sessionStorage.getItem("pgstagechain-token") || "";
}

function toast(text, bad) {
  const box = $("toast");
  box.textContent = text;
  box.className = "show" + (bad ? " bad" : "");
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { box.className = ""; }, 5000);
}

async function getJSON(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  const data = await response.json();
  if (!response.ok) throw new Error(data.error || response.statusText);
  return data;
}

async function post(action, body) {
  const headers = { "Content-Type": "application/json", [WRITE_HEADER]: "1" };
  const secret = token();
  if (secret) headers.Authorization = "Bearer " + secret;
  const response = await fetch("api/" + action, {
    method: "POST", headers, body: JSON.stringify(body), credentials: "same-origin",
  });
  const data = await response.json().catch(() => ({}));
  if (!response.ok) {
    toast(action + " refused: " + (data.error || response.status), true);
    return null;
  }
  return data;
}

async function act(action, target) {
  const data = await post(action, target);
  if (data === null) return;
  const keys = data.keys || [];
  toast(action + ": " + (keys.length ? keys.join(", ") : "nothing to " + action));
  refresh();
}

function actionButton(label, action, target) {
  const button = el("button", label);
  button.type = "button";
  button.dataset.action = action;
  button.addEventListener("click", () => act(action, target));
  return button;
}

async function loadGraph() {
  const response = await fetch("api/graph.svg");
  const parsed = new DOMParser().parseFromString(await response.text(), "image/svg+xml");
  $("graph").replaceChildren(document.importNode(parsed.documentElement, true));
}

function showGraph(stages) {
  for (const stage of stages) {
    const node = document.querySelector('#graph g.node[data-stage="' + CSS.escape(stage.name) + '"]');
    if (!node) continue;
    const field = (name) => node.querySelector('[data-field="' + name + '"]');
    field("waiting").textContent = String(stage.waiting);
    field("running").textContent = String(stage.running);
    field("failed").textContent = String(stage.failed);
    field("failed").classList.toggle("failed", stage.failed > 0);
    field("rate").textContent = rate(stage.per_minute);
    const age = stage.oldest_waiting_seconds;
    field("age").textContent = age === null ? "" : " · oldest " + seconds(age);
    for (let level = 1; level <= 3; level++) node.classList.toggle("backlog-" + level, stage.backlog === level);
  }
}

// a stage's cluster-wide limits, after its running count: " · 2/2 live · 20/s"
function limits(found) {
  if (!found) return "";
  let text = "";
  if (found.max_running !== null) text += " · " + found.live + "/" + found.max_running + " live";
  if (found.max_per_second !== null) text += " · " + found.max_per_second + "/s";
  return text;
}

function showStages(stages) {
  const rows = stages.map((stage) => {
    const tr = el("tr");
    tr.dataset.stage = stage.name;
    tr.append(el("td", stage.name), el("td", stage.level), el("td", stage.waiting, "num"),
      el("td", stage.running + (stage.retrying ? " (" + stage.retrying + " retrying)" : "") + limits(stage.limits), "num"),
      el("td", stage.failed, stage.failed ? "num failed" : "num"),
      el("td", seconds(stage.oldest_waiting_seconds), "num"), el("td", rate(stage.per_minute), "num"),
      el("td", seconds(stage.runs.p50_seconds), "num"), el("td", seconds(stage.runs.p95_seconds), "num"));
    const actions = el("td", null, "write-only");
    const rerun = el("button", "re-run from here");
    rerun.type = "button";
    rerun.dataset.action = "rerun";
    rerun.addEventListener("click", () => openRerun(stage.name));
    actions.append(actionButton("retry failed", "retry", { stage: stage.name }),
      actionButton("cancel running", "cancel", { stage: stage.name }), rerun);
    tr.append(actions);
    return tr;
  });
  $("stages").tBodies[0].replaceChildren(...rows);
}

function chart(name, series) {
  const box = el("div", null, "chart");
  box.dataset.stage = name;
  const total = series.succeeded.reduce((a, b) => a + b, 0);
  const failed = series.failed.reduce((a, b) => a + b, 0);
  box.append(el("div", name, "title"), el("div", total + " ok · " + failed + " failed", "muted"));
  const n = series.succeeded.length;
  const peak = Math.max(1, ...series.succeeded.map((ok, i) => ok + series.failed[i]));
  const svg = document.createElementNS(SVG_NS, "svg");
  svg.setAttribute("viewBox", "0 0 " + n * 10 + " 48");
  svg.setAttribute("preserveAspectRatio", "none");
  for (let i = 0; i < n; i++) {
    const okHeight = (series.succeeded[i] / peak) * 46;
    const badHeight = (series.failed[i] / peak) * 46;
    for (const [height, y, cls] of [[okHeight, 47 - okHeight, "ok"], [badHeight, 47 - okHeight - badHeight, "bad"]]) {
      if (height <= 0) continue;
      const bar = document.createElementNS(SVG_NS, "rect");
      bar.setAttribute("x", String(i * 10 + 1));
      bar.setAttribute("width", "8");
      bar.setAttribute("y", String(y));
      bar.setAttribute("height", String(height));
      bar.setAttribute("class", cls);
      svg.append(bar);
    }
  }
  const base = document.createElementNS(SVG_NS, "line");
  base.setAttribute("x1", "0"); base.setAttribute("x2", String(n * 10));
  base.setAttribute("y1", "47.5"); base.setAttribute("y2", "47.5");
  base.setAttribute("class", "base");
  svg.append(base);
  box.append(svg);
  return box;
}

function showCharts(charts) {
  $("charts").replaceChildren(...config.stages.map((s) => chart(s.name, charts.stages[s.name])));
}

function showFailures(failures) {
  const rows = failures.map((failure) => {
    const tr = el("tr");
    tr.dataset.key = failure.key;
    const target = failure.level === "group" ? { group: failure.key } : { key: failure.key };
    tr.append(el("td", (failure.level === "group" ? "group " : "") + failure.key, "key"),
      el("td", failure.stage), el("td", failure.attempt ?? "-", "num"),
      el("td", when(failure.finished_at)), el("td", failure.error ?? "", "error"));
    const actions = el("td", null, "write-only");
    actions.append(actionButton("retry", "retry", target));
    tr.append(actions);
    return tr;
  });
  $("failures").tBodies[0].replaceChildren(...rows);
  $("no-failures").hidden = failures.length > 0;
}

function showWorkers(workers) {
  $("workers").tBodies[0].replaceChildren(...workers.map((worker) => {
    const tr = el("tr");
    tr.append(el("td", worker.worker_id), el("td", worker.running, "num"),
      el("td", worker.stages.join(", ")), el("td", when(worker.lease_until)));
    return tr;
  }));
  $("no-workers").hidden = workers.length > 0;
}

async function refresh() {
  try {
    const query = failureStage ? "?stage=" + encodeURIComponent(failureStage) : "";
    const snapshot = await getJSON("api/snapshot" + query);
    showGraph(snapshot.stages);
    showStages(snapshot.stages);
    showCharts(snapshot.charts);
    showFailures(snapshot.failures);
    showWorkers(snapshot.workers);
    $("updated").textContent = "updated " + when(snapshot.now);
    $("state").textContent = "";
  } catch (error) {
    $("state").textContent = "refresh failed: " + error.message;
  }
}

function runsTable(title, runs) {
  const table = el("table", null, "history-runs");
  const head = el("tr");
  for (const name of ["run", "stage", "attempt", "state", "worker", "started", "took", "error"]) head.append(el("th", name));
  table.append(el("caption", title), head);
  for (const run of runs) {
    const tr = el("tr");
    const took = run.finished_at ? (new Date(run.finished_at) - new Date(run.started_at)) / 1000 : null;
    tr.append(el("td", run.id, "num"), el("td", run.stage), el("td", run.attempt, "num"), el("td", run.state),
      el("td", run.worker_id), el("td", when(run.started_at)), el("td", seconds(took), "num"), el("td", run.error ?? "", "error"));
    table.append(tr);
  }
  return table;
}

async function showHistory(event) {
  event.preventDefault();
  const key = $("history-key").value.trim();
  const group = $("history-group").checked;
  if (!key) return;
  const box = $("history");
  try {
    const found = await getJSON("api/history?key=" + encodeURIComponent(key) + (group ? "&group=1" : ""));
    const where = found.step === null ? "(no position)" : "(" + found.step + ", " + found.status + ")";
    const parts = [el("p", (found.group ? "group " : "row ") + found.key + ": " + where, "position")];
    if (!found.group && found.group_key !== null) {
      parts.push(el("p", "group " + found.group_key + ": " + (found.group_step === null ? "not formed yet" : "(" + found.group_step + ", " + found.group_status + ")")));
    }
    const target = found.group ? { group: found.key } : { key: found.key };
    const actions = el("p", null, "write-only");
    actions.append(actionButton("retry", "retry", target), actionButton("cancel", "cancel", target));
    parts.push(actions, runsTable("runs", found.runs));
    if (found.group_runs && found.group_runs.length) parts.push(runsTable("runs of group " + found.group_key, found.group_runs));
    box.replaceChildren(...parts);
  } catch (error) {
    box.replaceChildren(el("p", error.message, "muted"));
  }
}

function openRerun(stage) {
  rerunStage = stage;
  $("rerun-stage").textContent = stage;
  $("rerun-panel").hidden = false;
  rerunChanged();
  $("rerun-panel").scrollIntoView({ block: "nearest" });
}

function rerunChanged() {
  rerunPending = null;
  $("rerun-confirm").disabled = true;
  $("rerun-confirm").textContent = "Re-run";
  $("rerun-result").replaceChildren();
}

function rerunTarget() {
  const which = $("rerun-which").value;
  const target = { stage: rerunStage, skip_in_flight: $("rerun-skip").checked };
  const text = $("rerun-keys").value.trim();
  if (which === "keys") target.keys = text;
  else if (which === "groups") target.groups = text;
  else if (which !== "all") target.status = which;
  const since = $("rerun-since").value;
  if (since) target.since = new Date(since).toISOString();
  else if (which === "all") target.all = true;
  return target;
}

function rerunReport(data) {
  const level = data.level === "group" ? "group" : "row";
  const count = data.keys_count;
  const verb = data.dry_run ? "would re-run" : "re-ran";
  const head = el("p", verb + " stage " + data.stage + " and the stages after it for " + count + " " + level + (count === 1 ? "" : "s")
    + (data.keys.length ? ": " + data.keys.join(", ") + (count > data.keys.length ? ", ..." : "") : ""), "rerun-count");
  head.dataset.count = String(count);
  head.dataset.dryRun = String(data.dry_run);
  const parts = [head];
  if (data.in_flight_count) parts.push(el("p", data.in_flight_count + " in flight, " + (data.dry_run ? "to be " : "") + "cancelled first: " + data.in_flight.join(", ")));
  for (const [reason, found] of Object.entries(data.skipped)) {
    const line = el("p", "skipped " + found.count + ", " + found.why + ": " + found.keys.join(", "), "skipped");
    line.dataset.reason = reason;
    parts.push(line);
  }
  if (data.groups_count) {
    parts.push(el("p", data.groups_count + " group(s) " + (data.dry_run ? "to be " : "") + "taken apart, each forms again once its re-run members are back"
      + (data.groups_stopped_count ? "; " + data.groups_stopped_count + " had a group stage at work, " + (data.dry_run ? "to be " : "") + "stopped" : "")));
  }
  $("rerun-result").replaceChildren(...parts);
}

async function previewRerun(event) {
  event.preventDefault();
  rerunChanged();
  const target = rerunTarget();
  const data = await post("rerun", { ...target, dry_run: true });
  if (data === null) return;
  rerunReport(data);
  if (data.keys_count > 0) {
    rerunPending = target;
    $("rerun-confirm").disabled = false;
    $("rerun-confirm").textContent = "Re-run " + data.keys_count + " " + (data.level === "group" ? "group" : "row") + (data.keys_count === 1 ? "" : "s");
  }
}

async function confirmRerun() {
  if (rerunPending === null) return;
  const target = rerunPending;
  rerunChanged();
  const data = await post("rerun", { ...target, dry_run: false });
  if (data === null) return;
  rerunReport(data);
  toast("rerun: " + data.keys_count + " from " + data.stage);
  refresh();
}

async function start() {
  config = await getJSON("api/config");
  document.title = "pgstagechain: " + config.pipeline;
  $("pipeline-name").textContent = config.pipeline;
  $("chart-minutes").textContent = String(config.minutes);
  document.body.classList.toggle("writes", config.writes);
  $("token-form").hidden = !config.writes;
  $("token-form").addEventListener("submit", (event) => event.preventDefault());
  token();
  for (const stage of config.stages) {
    const option = el("option", stage.name);
    option.value = stage.name;
    $("failure-stage").append(option);
  }
  $("failure-stage").addEventListener("change", (event) => { failureStage = event.target.value; refresh(); });
  $("history-form").addEventListener("submit", showHistory);
  $("rerun-form").addEventListener("submit", previewRerun);
  $("rerun-form").addEventListener("input", rerunChanged);
  $("rerun-confirm").addEventListener("click", confirmRerun);
  $("rerun-close").addEventListener("click", () => { $("rerun-panel").hidden = true; rerunChanged(); });
  await loadGraph();
  await refresh();
  setInterval(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", start);
