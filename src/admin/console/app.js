// hookline console: a small single-page app over the /v1 API. No framework, no build step; every
// value from the server is put into the page as text (never as HTML).
"use strict";

let csrf = null;
let me = null;
let timers = [];

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function status(msg, bad) {
  const s = document.getElementById("status");
  s.textContent = msg || "";
  s.className = bad ? "bad" : "";
}

async function api(method, path, body) {
  const headers = { "accept": "application/json" };
  if (body !== undefined) headers["content-type"] = "application/json";
  if (method !== "GET" && csrf) headers["x-csrf-token"] = csrf;
  const r = await fetch(path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  let data = null;
  const text = await r.text();
  try { data = text ? JSON.parse(text) : null; } catch (_) { data = text; }
  if (r.status === 401 && path !== "/console/session") { showSignIn("Your session ended: sign in again."); }
  if (!r.ok) {
    const why = data && data.error ? data.error + (data.field ? " (" + data.field + ")" : "") : r.status;
    throw new Error(why);
  }
  return data;
}

function table(headers, rows, caption) {
  return el("table", {},
    caption ? el("caption", { class: "muted", text: caption }) : null,
    el("thead", {}, el("tr", {}, headers.map(h => el("th", { scope: "col", text: h })))),
    el("tbody", {}, rows.map(r => el("tr", {}, r.map(c => c instanceof Node ? el("td", {}, c) :
      el("td", { class: typeof c === "number" ? "num" : null, text: c === null || c === undefined ? "–" : String(c) }))))));
}

function view(title, ...children) {
  for (const t of timers) clearInterval(t);
  timers = [];
  const v = document.getElementById("view");
  v.replaceChildren(el("h2", { text: title }), ...children);
  v.hidden = false;
  document.getElementById("signin").hidden = true;
  document.title = title + " – hookline console";
  for (const a of document.querySelectorAll("nav a")) {
    if (location.hash.startsWith(a.getAttribute("href"))) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  document.getElementById("main").focus();
  return v;
}

function showSignIn(msg) {
  csrf = null; me = null;
  document.getElementById("nav").hidden = true;
  document.getElementById("view").hidden = true;
  document.getElementById("signin").hidden = false;
  status(msg || "", !!msg);
  document.getElementById("token").focus();
}

function signedIn(who) {
  me = who; csrf = who.csrf_token;
  document.getElementById("nav").hidden = false;
  document.getElementById("whoami").textContent =
    who.role === "admin" ? "signed in as admin" : "signed in as tenant " + who.tenant;
  document.getElementById("signin").hidden = true;
}

// ---- subscriptions ----

function ratio(w) {
  const n = w.successes + w.failures;
  return n === 0 ? "–" : Math.round(100 * w.successes / n) + " %";
}

async function subscriptionsPage(cursor) {
  const v = view("Subscriptions");
  const list = await api("GET", "/v1/subscriptions?limit=100" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
  // Health of the page's subscriptions, ten requests at a time.
  const health = new Array(list.items.length).fill(null);
  for (let i = 0; i < list.items.length; i += 10) {
    await Promise.all(list.items.slice(i, i + 10).map((s, k) =>
      api("GET", "/v1/subscriptions/" + s.id + "/health").then(h => { health[i + k] = h; }).catch(() => { /* shown as – */ })));
  }
  const rows = list.items.map((s, i) => {
    const h = health[i];
    return [
      el("a", { href: "#/subscriptions/" + s.id, class: "mono", text: s.id.slice(0, 8) }),
      s.tenant, s.url, s.event_types.join(", "), s.enabled ? "enabled" : "disabled",
      h ? h.breaker : null, h ? ratio(h.window) : null,
      h && h.concurrency ? h.concurrency.limit + " / " + h.concurrency.max : null,
      h ? h.pending : null,
    ];
  });
  v.append(table(["Subscription", "Tenant", "URL", "Event types", "State", "Breaker", "Recent success",
    "Concurrency (limit / max)", "Queued"], rows, list.items.length + " subscriptions" + (cursor || list.next_cursor ? " on this page" : "")));
  const pager = el("div", { class: "row" });
  if (cursor) pager.append(el("button", { type: "button", class: "secondary", text: "First page", onclick: () => subscriptionsPage() }));
  if (list.next_cursor) pager.append(el("button", { type: "button", class: "secondary", text: "Next page", onclick: () => subscriptionsPage(list.next_cursor) }));
  v.append(pager);
  const url = el("input", { id: "new-url", type: "url", required: true, size: 40 });
  const types = el("input", { id: "new-types", required: true, value: "*" });
  const form = el("form", {
    class: "row", onsubmit: async ev => {
      ev.preventDefault();
      try {
        const s = await api("POST", "/v1/subscriptions", {
          url: url.value, event_types: types.value.split(",").map(t => t.trim()).filter(Boolean),
        });
        status("Created " + s.id + ". Its signing secret is shown once on the next page.");
        sessionStorage.setItem("new-secret:" + s.id, (s.secrets || [])[0] || "");
        location.hash = "#/subscriptions/" + s.id;
      } catch (e) { status("Create failed: " + e.message, true); }
    }
  },
    el("div", {}, el("label", { for: "new-url", text: "Endpoint URL" }), url),
    el("div", {}, el("label", { for: "new-types", text: "Event types (comma-separated)" }), types),
    el("button", { type: "submit", text: "Create subscription" }));
  v.append(el("h3", { text: "New subscription" }), form);
}

async function subscriptionPage(id) {
  const s = await api("GET", "/v1/subscriptions/" + id);
  const h = await api("GET", "/v1/subscriptions/" + id + "/health");
  const v = view("Subscription " + id.slice(0, 8));
  const fresh = sessionStorage.getItem("new-secret:" + id);
  if (fresh) {
    sessionStorage.removeItem("new-secret:" + id);
    v.append(el("p", { class: "secret" }, "Signing secret (shown once): ", el("code", { text: fresh })));
  }
  const out = el("div", { "aria-live": "polite" });
  v.append(table(["Field", "Value"], [
    ["id", el("code", { text: s.id })], ["tenant", s.tenant], ["url", s.url],
    ["event types", s.event_types.join(", ")], ["state", s.enabled ? "enabled" : "disabled (" + (s.disabled_reason || "by an operator") + ")"],
    ["breaker", h.breaker], ["recent success", ratio(h.window) + " of " + (h.window.successes + h.window.failures) + " in " + h.window.seconds + " s"],
    ["concurrency", h.concurrency ? h.concurrency.limit + " / " + h.concurrency.max + (h.concurrency.adaptive ? " (adaptive)" : "") + ", " + h.concurrency.in_flight + " in flight" : null],
    ["queued", h.pending], ["consecutive failures", h.consecutive_failures],
    ["signing secrets", s.secret_count], ["retry schedule", (s.retry_schedule || []).join(" → ")],
  ]));
  const act = async (label, fn) => {
    try { await fn(); } catch (e) { status(label + " failed: " + e.message, true); }
  };
  v.append(el("div", { class: "row" },
    el("button", {
      type: "button", id: "toggle", text: s.enabled ? "Disable" : "Enable", onclick: () => act("Change", async () => {
        await api("PATCH", "/v1/subscriptions/" + id, { enabled: !s.enabled });
        status(s.enabled ? "Disabled." : "Enabled.");
        await subscriptionPage(id);
      })
    }),
    el("button", {
      type: "button", id: "rotate", class: "secondary", text: "Rotate secret", onclick: () => act("Rotation", async () => {
        const r = await api("POST", "/v1/subscriptions/" + id + "/rotate-secret", {});
        out.replaceChildren(el("p", { class: "secret" }, "New signing secret (shown once; the old one signs for the grace period): ", el("code", { text: r.secret })));
      })
    }),
    el("button", {
      type: "button", id: "test", class: "secondary", text: "Send test delivery", onclick: () => act("Test", async () => {
        const r = await api("POST", "/v1/subscriptions/" + id + "/test", {});
        out.replaceChildren(el("p", {}, "Test delivery: " + r.result + (r.status ? " (HTTP " + r.status + ")" : "") +
          " in " + r.duration_ms.toFixed(1) + " ms" + (r.error ? ": " + r.error : "")),
          el("pre", { text: r.response_excerpt || "(empty response)" }));
      })
    })), out);

  // Attempt log: filter by result, search by event id.
  const result = el("select", { id: "attempt-result" },
    ["", "delivered", "failed", "rejected", "gone", "timeout", "connect_error", "auth_error", "refused", "circuit_open", "deferred"]
      .map(r => el("option", { value: r, text: r || "any result" })));
  const search = el("input", { id: "attempt-search", type: "search", placeholder: "event id" });
  const holder = el("div", {});
  let attempts = [];
  const render = () => {
    const q = search.value.trim();
    const shown = attempts.filter(a => (!result.value || a.result === result.value) && (!q || a.event_id.includes(q)));
    holder.replaceChildren(table(["At", "Event id", "Type", "Attempt", "Result", "Status", "ms", "Error"],
      shown.map(a => [a.at, a.event_id, a.event_type, a.attempt, a.result, a.status_code, a.duration_ms, a.error]),
      shown.length + " of the " + attempts.length + " newest attempts"));
  };
  result.addEventListener("change", render);
  search.addEventListener("input", render);
  v.append(el("h3", { text: "Attempt log" }), el("div", { class: "row" },
    el("div", {}, el("label", { for: "attempt-result", text: "Result" }), result),
    el("div", {}, el("label", { for: "attempt-search", text: "Search by event id" }), search),
    el("button", { type: "button", class: "secondary", text: "Refresh", onclick: () => load() })), holder);
  const load = async () => {
    let cursor = null; attempts = [];
    for (let i = 0; i < 4; i++) {
      const page = await api("GET", "/v1/subscriptions/" + id + "/attempts?limit=100" + (cursor ? "&cursor=" + encodeURIComponent(cursor) : ""));
      attempts.push(...page.items);
      cursor = page.next_cursor;
      if (!cursor) break;
    }
    render();
  };
  await load();
}

// ---- dead letters ----

function counts(title, map) {
  const rows = Object.entries(map || {}).sort((a, b) => b[1] - a[1]);
  return table([title, "Records"], rows.map(([k, n]) => [k, n]));
}

async function deadLettersPage() {
  const v = view("Dead letters");
  const f = {};
  const field = (name, label, attrs) => {
    f[name] = el(attrs && attrs.tag || "input", Object.assign({ id: "dl-" + name }, attrs || {}));
    if (attrs && attrs.options) for (const o of attrs.options) f[name].append(el("option", { value: o, text: o || "any" }));
    return el("div", {}, el("label", { for: "dl-" + name, text: label }), f[name]);
  };
  const filters = el("form", { class: "row", onsubmit: ev => { ev.preventDefault(); list(); } },
    field("subscription", "Subscription id", { size: 36 }),
    field("event_type", "Event type", { placeholder: "order.*" }),
    field("reason", "Reason", { tag: "select", options: ["", "exhausted", "rejected", "gone", "invalid_event"] }),
    field("since", "Since", { placeholder: "2h or RFC 3339" }),
    el("button", { type: "submit", text: "Show" }));
  const results = el("div", {});
  const progress = el("div", { "aria-live": "polite" });
  const query = () => {
    const q = {};
    for (const k of ["subscription", "event_type", "reason", "since"]) if (f[k].value.trim()) q[k] = f[k].value.trim();
    return q;
  };
  const list = async () => {
    try {
      const q = new URLSearchParams(query()); q.set("limit", "50");
      const d = await api("GET", "/v1/dead-letters?" + q);
      results.replaceChildren(
        el("p", { text: d.matched + " matching of " + d.scanned + " records in " + d.topic + (d.truncated ? " (only the first million read)" : "") }),
        el("div", { class: "row" }, counts("Reason", d.by_reason), counts("Subscription", d.by_subscription), counts("Event type", d.by_event_type)),
        table(["Partition/offset", "At", "Reason", "Subscription", "Event id", "Type", "Body (excerpt)"],
          d.items.map(i => [i.partition + "/" + i.offset, i.timestamp, i.reason, i.subscription, i.event_id, i.event_type,
            el("code", { text: i.body_excerpt.slice(0, 120) })]), d.items.length < d.matched ? "The first " + d.items.length : null));
    } catch (e) { status("Listing failed: " + e.message, true); }
  };
  const to = el("input", { id: "dl-to", placeholder: "retry.<tier> (default: first tier)" });
  const rate = el("input", { id: "dl-rate", type: "number", min: "0", value: "100" });
  const replay = async dry => {
    try {
      const body = Object.assign(query(), { dry_run: dry, rate: Number(rate.value) || null });
      if (to.value.trim()) body.to = to.value.trim();
      const r = await api("POST", "/v1/dead-letters/replay", body);
      const bar = el("progress", { max: "1", value: "0", "aria-label": "Replay progress" });
      const line = el("span", { text: dry ? "Dry run started" : "Replay started" });
      progress.replaceChildren(el("p", {}, bar, " ", line));
      const poll = async () => {
        const s = await api("GET", "/v1/replays/" + r.id);
        const sum = s.summary;
        bar.max = Math.max(1, sum.in_range); bar.value = sum.scanned;
        line.textContent = (dry ? "Dry run: would replay " : "Replayed ") + sum.replayed + " of " + sum.matched +
          " matching (" + sum.scanned + " of " + sum.in_range + " read, " + sum.skipped + " skipped) – " + s.state + (s.error ? ": " + s.error : "");
        if (s.state !== "running") {
          clearInterval(t);
          if (dry && sum.sample && sum.sample.length) progress.append(table(["Partition/offset", "Reason", "Event id", "Type"],
            sum.sample.map(x => [x.partition + "/" + x.offset, x.reason, x.event_id, x.event_type]), "Sample of what would be replayed"));
          if (!dry) list();
        }
      };
      const t = setInterval(() => poll().catch(e => { clearInterval(t); status(e.message, true); }), 300);
      timers.push(t);
    } catch (e) { status("Replay failed: " + e.message, true); }
  };
  v.append(filters, results, el("h3", { text: "Replay" }),
    el("p", { class: "muted", text: "Replays the records matching the filters above, through the retry path (limits and breaker apply). Preview first: a dry run counts and samples and sends nothing." }),
    el("div", { class: "row" },
      el("div", {}, el("label", { for: "dl-to", text: "Target" }), to),
      el("div", {}, el("label", { for: "dl-rate", text: "Records per second" }), rate),
      el("button", { type: "button", id: "dry-run", class: "secondary", text: "Preview (dry run)", onclick: () => replay(true) }),
      el("button", { type: "button", id: "replay", text: "Replay", onclick: () => replay(false) })), progress);
  await list();
}

// ---- lag and delivery rate (from /metrics) ----

function parseMetrics(text) {
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})? ([^ ]+)/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/([a-zA-Z_]+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

async function lagPage() {
  const v = view("Lag and delivery rate");
  const canvas = el("canvas", { width: "640", height: "160", role: "img", "aria-label": "Consumer lag (records) and deliveries per second over the last minutes" });
  const now = el("div", {});
  v.append(el("p", { class: "muted", text: "This instance's view, refreshed every 2 s: lag of the partitions assigned here (source topics and retry tiers)." }), canvas, now);
  const history = [];
  let prev = null;
  const tick = async () => {
    const r = await fetch("/metrics", { credentials: "same-origin" });
    const ms = parseMetrics(await r.text());
    const lag = ms.filter(m => m.name === "kafka_consumergroup_lag");
    const secs = ms.filter(m => m.name === "hookline_consumer_lag_seconds");
    const delivered = ms.filter(m => m.name === "hookline_deliveries_total").reduce((a, m) => a + m.value, 0);
    const total = lag.reduce((a, m) => a + m.value, 0);
    const t = Date.now();
    const rate = prev ? Math.max(0, (delivered - prev.d) / ((t - prev.t) / 1000)) : 0;
    prev = { d: delivered, t };
    history.push({ lag: total, rate });
    if (history.length > 90) history.shift();
    draw(canvas, history);
    const byTopic = {};
    for (const m of secs) byTopic[m.labels.topic + "/" + m.labels.partition] = m.value;
    now.replaceChildren(el("p", { text: "Lag " + total + " records; " + rate.toFixed(0) + " deliveries/s" }),
      table(["Group", "Topic", "Partition", "Lag (records)", "Oldest unfinished (s)"],
        lag.map(m => [m.labels.consumergroup, m.labels.topic, m.labels.partition, m.value,
          byTopic[m.labels.topic + "/" + m.labels.partition] !== undefined ? byTopic[m.labels.topic + "/" + m.labels.partition].toFixed(1) : null])));
  };
  await tick();
  timers.push(setInterval(() => tick().catch(e => status(e.message, true)), 2000));
}

function draw(canvas, history) {
  const c = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  c.clearRect(0, 0, w, h);
  const line = (key, colour) => {
    const max = Math.max(1, ...history.map(p => p[key]));
    c.strokeStyle = colour; c.beginPath();
    history.forEach((p, i) => {
      const x = (i / 89) * (w - 10) + 5, y = h - 5 - (p[key] / max) * (h - 20);
      if (i === 0) c.moveTo(x, y); else c.lineTo(x, y);
    });
    c.stroke();
    c.fillStyle = colour; c.fillText(key + " (max " + max.toFixed(0) + ")", key === "lag" ? 8 : 200, 12);
  };
  line("lag", "#a40e26");
  line("rate", "#0550ae");
}

// ---- routing ----

async function route() {
  if (!me) return;
  const h = location.hash || "#/subscriptions";
  try {
    status("");
    let m;
    if ((m = h.match(/^#\/subscriptions\/([0-9a-f-]{36})$/))) await subscriptionPage(m[1]);
    else if (h.startsWith("#/dead-letters")) await deadLettersPage();
    else if (h.startsWith("#/lag")) await lagPage();
    else await subscriptionsPage();
  } catch (e) {
    view("Not found", el("p", { text: e.message }));
  }
}

document.addEventListener("DOMContentLoaded", async () => {
  document.getElementById("signin-form").addEventListener("submit", async ev => {
    ev.preventDefault();
    const input = document.getElementById("token");
    try {
      const who = await api("POST", "/console/session", { token: input.value });
      input.value = "";
      signedIn(who);
      await route();
    } catch (e) { status("Sign-in failed: " + e.message, true); }
  });
  document.getElementById("signout").addEventListener("click", async () => {
    try { await api("DELETE", "/console/session"); } catch (_) { /* signed out anyway */ }
    showSignIn("Signed out.");
  });
  window.addEventListener("hashchange", route);
  try {
    signedIn(await api("GET", "/console/session"));
    await route();
  } catch (_) {
    showSignIn();
  }
});
