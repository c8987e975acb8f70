// Shipyard dashboard: plain DOM, fetch and EventSource. Every text from the history is
// inserted as a text node (never as HTML), so a log line cannot become markup.
"use strict";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== null && v !== undefined) node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "string" || typeof c === "number" ? document.createTextNode(String(c)) : c);
  }
  return node;
}

async function getJSON(url) {
  const r = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}

const when = (ts) => (ts ? ts.replace("T", " ").slice(0, 19) : "-");
const statusEl = (s) => el("span", { class: "status " + s }, s);
const depLink = (d) => el("a", { href: "/deployments/" + d.id }, "#" + d.id);

function countdown(expires) {
  const left = Math.round((Date.parse(expires) - Date.now()) / 1000);
  if (left <= 0) return "expired";
  const m = Math.floor(left / 60), s = left % 60;
  return "expires in " + (m ? m + " min " : "") + s + " s";
}

let session = { actions: false, user: null };

async function loadSession() {
  session = await getJSON("/api/session");
  const box = document.getElementById("session");
  box.textContent = "";
  if (!session.actions) { box.appendChild(document.createTextNode("read-only")); return; }
  if (session.user) { box.appendChild(document.createTextNode("signed in as " + session.user)); return; }
  const input = el("input", { type: "password", id: "token", placeholder: "token", autocomplete: "off" });
  const form = el("form", { id: "login" }, input, el("button", { type: "submit" }, "Sign in"));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const r = await fetch("/api/session", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ token: input.value }),
    });
    if (r.ok) location.reload(); else alert((await r.json()).error);
  });
  box.appendChild(form);
}

// -- overview ----------------------------------------------------------------------------------

async function overview(main) {
  const doc = await getJSON("/api/overview");
  const table = el("table", { id: "matrix" });
  table.appendChild(el("tr", {}, el("th", {}, "pipeline"), ...doc.environments.map((e) => el("th", {}, e))));
  for (const p of doc.pipelines) {
    const row = el("tr", {}, el("th", {}, p));
    for (const e of doc.environments) {
      const c = doc.cells.find((x) => x.pipeline === p && x.environment === e);
      const td = el("td", { "data-pipeline": p, "data-environment": e });
      if (c && c.current) td.appendChild(el("div", { class: "current" }, el("strong", {}, c.current.version), " ", depLink(c.current)));
      else if (c) td.appendChild(el("div", { class: "current" }, "nothing in service"));
      if (c && c.last) {
        td.appendChild(el("div", { class: "last" }, "last: ", depLink(c.last), " ", c.last.version, " ", statusEl(c.last.status),
          " by " + (c.last.user || "?") + " at " + when(c.last.started_at)));
      }
      for (const a of (c ? c.active : [])) {
        const badge = el("span", { class: "badge " + a.status }, depLink(a), " " + a.status.replace("_", " "));
        if (a.expires_at) badge.appendChild(el("span", { class: "countdown", "data-expires": a.expires_at }, " " + countdown(a.expires_at)));
        td.appendChild(badge);
      }
      row.appendChild(td);
    }
    table.appendChild(row);
  }
  main.textContent = "";
  main.appendChild(el("h1", {}, "Overview"));
  main.appendChild(doc.pipelines.length ? table : el("p", {}, "no deployments yet"));
}

// -- history -----------------------------------------------------------------------------------

async function history(main) {
  const q = new URLSearchParams(location.search);
  const page = Number(q.get("page") || 0);
  const doc = await getJSON("/api/history?" + q.toString());
  const field = (name, label) => el("label", {}, label + " ", el("input", { name, value: q.get(name) || "" }));
  const status = el("select", { name: "status" }, el("option", { value: "" }, "any status"));
  for (const s of ["pending", "running", "awaiting_approval", "succeeded", "failed", "cancelled", "interrupted", "superseded"]) {
    const o = el("option", { value: s }, s);
    if (q.get("status") === s) o.selected = true;
    status.appendChild(o);
  }
  const form = el("form", { class: "filters", method: "get" }, field("pipeline", "pipeline"), " ", field("env", "environment"), " ", status, " ", el("button", { type: "submit" }, "Filter"));
  const table = el("table", { id: "history" }, el("tr", {}, ...["id", "pipeline", "version", "environment", "status", "started", "finished", "by", "note"].map((h) => el("th", {}, h))));
  for (const d of doc.deployments) {
    const note = d.rollback_of ? el("a", { href: "/deployments/" + d.rollback_of }, "rollback of #" + d.rollback_of)
      : d.retry_of ? el("a", { href: "/deployments/" + d.retry_of }, "retry of #" + d.retry_of) : "";
    table.appendChild(el("tr", { "data-id": d.id }, el("td", {}, depLink(d)), el("td", {}, d.pipeline), el("td", {}, d.version),
      el("td", {}, d.environment), el("td", {}, statusEl(d.status)), el("td", {}, when(d.started_at)),
      el("td", {}, when(d.finished_at)), el("td", {}, d.user || ""), el("td", {}, note)));
  }
  const pager = el("p", {});
  const link = (n, text) => { const p = new URLSearchParams(q); p.set("page", n); return el("a", { href: "?" + p.toString() }, text); };
  if (page > 0) pager.appendChild(link(page - 1, "newer"));
  if (doc.more) { pager.appendChild(document.createTextNode(" ")); pager.appendChild(link(page + 1, "older")); }
  main.textContent = "";
  main.appendChild(el("h1", {}, q.get("status") === "awaiting_approval" ? "Inbox" : "History"));
  main.appendChild(form);
  main.appendChild(doc.deployments.length ? table : el("p", {}, "no deployments"));
  main.appendChild(pager);
}

// -- one deployment ----------------------------------------------------------------------------

const VALID = {
  approve: ["awaiting_approval"], reject: ["awaiting_approval"],
  cancel: ["pending", "running", "awaiting_approval"],
  retry: ["failed", "cancelled", "interrupted"], rollback: ["succeeded", "failed"],
};

function actionButtons(d) {
  const box = el("div", { class: "actions", id: "actions" });
  if (!session.actions || !session.user) return box;
  for (const [action, states] of Object.entries(VALID)) {
    if (!states.includes(d.status)) continue;
    const b = el("button", { type: "button", "data-action": action }, action);
    b.addEventListener("click", async () => {
      let comment = "";
      if (action === "reject") { comment = prompt("Why is it rejected?") || ""; if (!comment) return; }
      else if (!confirm(action + " deployment #" + d.id + "?")) return;
      const r = await fetch("/api/deployments/" + d.id + "/" + action, {
        method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ comment }),
      });
      const body = await r.json();
      const out = document.getElementById("action-result");
      out.textContent = (r.ok ? "" : "refused: ") + (body.error || body.output || "started");
      setTimeout(() => location.reload(), 1500);
    });
    box.appendChild(b);
  }
  return box;
}

async function deployment(main) {
  const id = Number(location.pathname.split("/").pop());
  const d = await getJSON("/api/deployments/" + id);
  const info = el("table", { id: "info" });
  const row = (k, v) => info.appendChild(el("tr", {}, el("th", {}, k), el("td", {}, v)));
  row("version", d.version); row("environment", d.environment);
  row("status", el("span", { id: "status", class: "status " + d.status }, d.status));
  row("by", (d.user || "?") + (d.ci_actor ? " (" + d.ci_actor + ")" : "") + " on " + (d.host || "?"));
  row("started", when(d.started_at)); row("finished", when(d.finished_at));
  if (d.rollback_of) row("rollback of", el("a", { href: "/deployments/" + d.rollback_of }, "#" + d.rollback_of));
  if (d.retry_of) row("retry of", el("a", { href: "/deployments/" + d.retry_of }, "#" + d.retry_of));
  if (d.error) row("error", el("span", { class: "error" }, d.error));
  main.textContent = "";
  main.appendChild(el("h1", {}, "#" + d.id + " " + d.pipeline + " " + d.version + " → " + d.environment));
  main.appendChild(info);
  if (d.gate) {
    const gate = el("div", { id: "gate" }, el("h2", {}, "Approval: " + d.gate.stage), el("p", {}, d.gate.status +
      (d.gate.status === "waiting" ? ", " + countdown(d.gate.expires_at) : "") + "; approvers: " + ((d.gate.approvers || []).join(", ") || "anyone")));
    for (const x of d.gate.decisions) gate.appendChild(el("p", { class: "decision" }, x.decision + " by " + x.user + " (" + (x.source || "-") + ") at " + when(x.ts) + (x.comment ? ": " + x.comment : "")));
    main.appendChild(gate);
  }
  main.appendChild(actionButtons(d));
  main.appendChild(el("p", { id: "action-result" }));
  const details = el("div", { id: "details" });
  main.appendChild(details);
  drawDetails(details, d);
  main.appendChild(el("h2", {}, "Log"));
  const log = el("div", { id: "log" });
  main.appendChild(log);
  const es = new EventSource("/api/deployments/" + id + "/events");
  es.addEventListener("log", (ev) => {
    const r = JSON.parse(ev.data);
    log.appendChild(el("div", { class: "line", "data-id": r.id }, el("span", { class: "step" }, "[" + (r.step || r.stream) + "] "), el("span", { class: "text" }, r.line)));
    if (isRetryLine(r)) {
      retryLines.push(r);
      addRetryLine(r);
    }
  });
  es.addEventListener("status", (ev) => {
    const s = JSON.parse(ev.data).status;
    const node = document.getElementById("status");
    node.textContent = s; node.className = "status " + s;
  });
  es.addEventListener("end", async () => {
    es.close();
    // The final steps, verdicts and hosts: drawn again from the finished document.
    try { drawDetails(details, await getJSON("/api/deployments/" + id)); } catch (err) { /* keep the last ones */ }
    log.setAttribute("data-ended", "1");
  });
}

// The runner's line before a retry: "attempt N of M failed: ERROR; retrying in S s".
const RETRY = /^attempt \d+ of \d+ failed: /;
const isRetryLine = (r) => r.stream === "shipyard" && r.stage_idx !== null && r.step_idx !== null && RETRY.test(r.line);
let retryLines = [];

function addRetryLine(r) {
  const cell = document.querySelector("#timeline tr[data-stage='" + r.stage_idx + "'][data-step='" + r.step_idx + "'] td.retries");
  if (cell && !cell.querySelector("[data-id='" + r.id + "']")) cell.appendChild(el("div", { class: "retry", "data-id": r.id }, r.line));
}

function table(id, headers, rows) {
  const t = el("table", { id }, el("tr", {}, ...headers.map((h) => el("th", {}, h))));
  for (const r of rows) t.appendChild(r);
  return t;
}

// A fleet step's attempts on a host: a count, or the list of them.
const attemptsOf = (h) => (Array.isArray(h.attempts) ? h.attempts.length : h.attempts || 0);
const text = (v) => (v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v));

function drawDetails(box, d) {
  box.textContent = "";
  const steps = [];
  d.stages.forEach((s, si) => s.steps.forEach((st, i) => steps.push(el("tr", { "data-stage": si, "data-step": i },
    el("td", {}, s.name), el("td", {}, st.name), el("td", {}, statusEl(st.warning ? "warning" : st.status)),
    el("td", { class: "attempts" }, st.attempts), el("td", { class: "exit" }, st.exit_code === null ? "" : st.exit_code),
    el("td", {}, when(st.started_at)), el("td", {}, when(st.finished_at)), el("td", { class: "error" }, st.error || ""),
    el("td", { class: "retries" })))));
  box.appendChild(el("h2", {}, "Stages"));
  box.appendChild(table("timeline", ["stage", "step", "status", "attempts", "exit", "started", "finished", "error", "retries"], steps));
  for (const r of retryLines) addRetryLine(r);
  if (d.analysis && d.analysis.length) {
    box.appendChild(el("h2", {}, "Analysis"));
    for (const a of d.analysis) {
      const c = a.counts || {};
      const rows = (a.measurements || []).map((m) => el("tr", { class: "measurement" }, el("td", {}, m.n), el("td", {}, when(m.ts)),
        el("td", { class: "value" }, text(m.value)), el("td", {}, statusEl(m.outcome || m.phase || "")), el("td", { class: "error" }, m.error || "")));
      box.appendChild(el("div", { class: "metric", "data-metric": a.metric },
        el("h3", {}, (a.step ? a.step + ": " : "") + a.metric + " ", statusEl(a.verdict || "measuring"), a.dry_run ? " (dry run)" : ""),
        el("p", { class: "counts" }, "successful " + (c.successful || 0) + ", failed " + (c.failed || 0) +
          ", inconclusive " + (c.inconclusive || 0) + ", error " + (c.error || 0)),
        table(null, ["n", "at", "value", "outcome", "error"], rows)));
    }
  }
  if (d.hosts && d.hosts.length) {
    const names = [...new Set(d.hosts.map((h) => h.step))];
    const hosts = [...new Set(d.hosts.map((h) => h.host))];
    const rows = hosts.map((host) => el("tr", { "data-host": host }, el("th", {}, host), ...names.map((step) => {
      const h = d.hosts.find((x) => x.host === host && x.step === step);
      if (!h) return el("td", {});
      const bits = [h.exit_code !== null && h.exit_code !== undefined ? "exit " + h.exit_code : null,
        attemptsOf(h) > 1 ? attemptsOf(h) + " attempts" : null, h.version ? "version " + h.version : null].filter((x) => x);
      return el("td", { "data-step": step }, statusEl(h.status || "?"), bits.length ? " " + bits.join(", ") : "");
    })));
    box.appendChild(el("h2", {}, "Hosts"));
    box.appendChild(table("hosts", ["host", ...names], rows));
  }
}

const PAGES = { overview, history, deployment };

document.addEventListener("DOMContentLoaded", async () => {
  const main = document.getElementById("main");
  try {
    await loadSession();
    await PAGES[document.body.dataset.page](main);
    main.setAttribute("data-ready", "1");
  } catch (err) {
    main.textContent = "";
    main.appendChild(el("p", { class: "error" }, String(err.message || err)));
  }
  setInterval(() => {
    for (const c of document.querySelectorAll(".countdown")) c.textContent = " " + countdown(c.dataset.expires);
  }, 1000);
});
