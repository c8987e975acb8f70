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
  const stages = el("table", { id: "timeline" }, el("tr", {}, ...["stage", "step", "status", "attempts", "exit", "started", "finished", "error"].map((h) => el("th", {}, h))));
  for (const s of d.stages) {
    for (const st of s.steps) {
      stages.appendChild(el("tr", {}, el("td", {}, s.name), el("td", {}, st.name), el("td", {}, statusEl(st.warning ? "warning" : st.status)),
        el("td", {}, st.attempts), el("td", {}, st.exit_code === null ? "" : st.exit_code), el("td", {}, when(st.started_at)),
        el("td", {}, when(st.finished_at)), el("td", {}, st.error || "")));
    }
  }
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
  main.appendChild(el("h2", {}, "Stages"));
  main.appendChild(stages);
  main.appendChild(el("h2", {}, "Log"));
  const log = el("div", { id: "log" });
  main.appendChild(log);
  const es = new EventSource("/api/deployments/" + id + "/events");
  es.addEventListener("log", (ev) => {
    const r = JSON.parse(ev.data);
    log.appendChild(el("div", { class: "line", "data-id": r.id }, el("span", { class: "step" }, "[" + (r.step || r.stream) + "] "), el("span", { class: "text" }, r.line)));
  });
  es.addEventListener("status", (ev) => {
    const s = JSON.parse(ev.data).status;
    const node = document.getElementById("status");
    node.textContent = s; node.className = "status " + s;
  });
  es.addEventListener("end", () => { es.close(); log.setAttribute("data-ended", "1"); });
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
