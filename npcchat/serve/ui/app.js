// npcchat playground: plain JavaScript on the server's public HTTP API (the /v1 routes a
// game calls, plus the designer routes). No framework, no build step, nothing from the
// network: one module a small team can read in one sitting.
const $ = (id) => document.getElementById(id);
const SETTABLE = ["trust", "relationship", "quest_stage", "npc_mood", "player_reputation",
  "style", "location", "items", "actions", "position", "lore", "description"];
const state = { history: [], lastLine: "", key: sessionStorage.getItem("npcchat-key") || "" };

function headers(json) {
  const h = json ? { "content-type": "application/json" } : {};
  if (state.key) h.authorization = "Bearer " + state.key;
  return h;
}

async function api(method, path, body) {
  const res = await fetch(path, {
    method, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401) {  // the server was started with --api-key
    const key = prompt("API key of this server");
    if (key) { state.key = key; sessionStorage.setItem("npcchat-key", key); return api(method, path, body); }
  }
  const data = res.status === 204 ? null : await res.json();
  if (!res.ok) throw new Error((data && data.error && data.error.message) || res.statusText);
  return data;
}

function showError(e) { $("error").textContent = e ? String(e.message || e) : ""; }

function say(who, text) {
  const div = document.createElement("div");
  div.className = who === "you" ? "you" : "npc";
  const b = document.createElement("b");
  b.textContent = who === "you" ? "you>" : (who + ">");
  const span = document.createElement("span");
  span.textContent = text;  // text, never markup
  div.append(b, span);
  $("log").append(div);
  $("log").scrollTop = $("log").scrollHeight;
  return span;
}

function npcId() { return $("npc").value; }
function player() { return $("player").value.trim() || "designer"; }
function sessionPath() { return `/v1/sessions/${encodeURIComponent(player())}/${encodeURIComponent(npcId())}`; }

function row(table, cells, cls) {
  const tr = table.insertRow();
  for (const c of cells) { const td = tr.insertCell(); td.textContent = c; }
  if (cls) tr.className = cls;
}

function showState(tags) {
  const t = $("state"); t.replaceChildren();
  for (const [k, v] of Object.entries(tags)) row(t, [k, typeof v === "number" ? v.toFixed(2) : v]);
}

function showHistory() {
  const svg = $("history"), w = 260, h = 80, n = state.history.length;
  const line = (key, color) => {
    if (!n) return "";
    const pts = state.history.map((s, i) =>
      `${(n === 1 ? w / 2 : (i / (n - 1)) * (w - 10) + 5).toFixed(1)},${(h - 5 - s[key] * (h - 10)).toFixed(1)}`);
    return `<polyline fill="none" stroke="${color}" stroke-width="2" points="${pts.join(" ")}"/>`;
  };
  svg.innerHTML = `<rect width="${w}" height="${h}" fill="#fafafa" stroke="#ddd"/>` +
    line("trust", "#2e86c1") + line("relationship", "#28b463");
}

function showTurn(meta, actions) {
  showState(meta.state);
  state.history.push({ trust: meta.state.trust, relationship: meta.state.relationship });
  showHistory();
  const f = $("flags"); f.replaceChildren();
  row(f, ["flag", "prob", "threshold", ""]);
  for (const [name, m] of Object.entries(meta.flags)) {
    const fired = m.prob >= m.threshold && !m.blocked;
    row(f, [name, m.prob.toFixed(3), m.threshold.toFixed(2), m.blocked ? "BLOCKED" : fired ? "FIRED" : ""],
      m.blocked ? "blocked" : fired ? "fired" : "");
  }
  const r = $("rules"); r.replaceChildren();
  const item = (text) => { const li = document.createElement("li"); li.textContent = text; r.append(li); };
  for (const a of actions || []) {
    const params = Object.entries(a).filter(([k]) => k !== "name" && k !== "flag").map(([k, v]) => `${k}=${v}`);
    item(`action ${a.name}(${params.join(", ")})`);
  }
  const rules = meta.rules;
  if (rules) {
    for (const [flag, why] of Object.entries(rules.blocked)) item(`blocked ${flag}: ${why}`);
    for (const c of rules.effects) item(`${c.key}: ${c.from || "-"} → ${c.to || "-"}`);
    if (rules.guard) item(`guarded reply for ${rules.guard}`);
    for (const c of rules.checks) item(`reply check ${c} intervened`);
  }
  if (meta.stop_reason === "trigger") item("forbidden trigger: fixed reaction");
}

// A streamed turn: Server-Sent Events read from the POST's body.
async function turn(text) {
  showError(null);
  say("you", text);
  const name = $("npc").selectedOptions[0]?.dataset.name || npcId();
  const span = say(name, "");
  const res = await fetch("/v1/turn", {
    method: "POST", headers: headers(true),
    body: JSON.stringify({ player_id: player(), npc_id: npcId(), text, stream: true }),
  });
  if (!res.ok) {
    const data = await res.json().catch(() => ({}));
    throw new Error((data.error && data.error.message) || res.statusText);
  }
  const reader = res.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut); buffer = buffer.slice(cut + 2);
      const event = /^event: (.*)$/m.exec(block)?.[1];
      const data = JSON.parse(/^data: (.*)$/m.exec(block)?.[1] || "{}");
      if (event === "text") span.textContent += data.text;
      else if (event === "turn") {
        span.textContent = data.text;
        showTurn(data.meta, data.actions);
        document.body.dataset.turns = String(Number(document.body.dataset.turns || 0) + 1);
      }
      else if (event === "error") throw new Error(data.error.message);
    }
  }
  state.lastLine = text;
  refreshSessions();
}

async function openSession(p, n) {
  $("player").value = p; $("npc").value = n;
  const s = await api("GET", `/v1/sessions/${encodeURIComponent(p)}/${encodeURIComponent(n)}`);
  $("log").replaceChildren(); state.history = [];
  for (const t of s.history) {
    say("you", t.player); say(n, t.reply);
    state.history.push({ trust: t.tags_before.trust, relationship: t.tags_before.relationship });
  }
  state.lastLine = s.history.length ? s.history[s.history.length - 1].player : "";
  showState(s.tags); showHistory(); loadNpc();
}

async function refreshSessions() {
  const list = await api("GET", "/v1/sessions?limit=50");
  const ul = $("sessions"); ul.replaceChildren();
  for (const s of list) {
    const li = document.createElement("li");
    li.textContent = `${s.player_id} · ${s.npc_id} · ${s.updated}`;
    li.onclick = () => openSession(s.player_id, s.npc_id).catch(showError);
    ul.append(li);
  }
}

async function loadNpc() {
  const npc = await api("GET", `/v1/npcs/${encodeURIComponent(npcId())}`);
  $("npcfile").textContent = npc.text;
  $("npcerror").textContent = npc.error ? "This file's last change is refused (the last good version is served): " + npc.error : "";
}

async function start() {
  for (const k of SETTABLE) $("setkey").append(new Option(k, k));
  const [npcs, health] = await Promise.all([api("GET", "/v1/npcs"), api("GET", "/healthz")]);
  $("bundle").textContent = `bundle ${health.bundle} (${health.bundle_id})`;
  for (const n of npcs) { const o = new Option(`${n.name} (${n.id})`, n.id); o.dataset.name = n.name; $("npc").append(o); }
  const fresh = () => {  // another NPC or player: another conversation
    $("log").replaceChildren(); state.history = []; state.lastLine = "";
    showHistory(); $("flags").replaceChildren(); $("rules").replaceChildren();
  };
  $("npc").onchange = () => { fresh(); loadNpc().catch(showError); };
  $("player").onchange = fresh;
  $("say").onsubmit = (e) => {
    e.preventDefault();
    const text = $("line").value.trim();
    if (!text) return;
    $("line").value = "";
    turn(text).catch(showError);
  };
  // Enter while an IME composes a Hangul syllable finishes the syllable, it does not send
  $("line").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.isComposing) e.stopPropagation(); });
  $("set").onsubmit = (e) => {
    e.preventDefault();
    api("POST", sessionPath() + "/set", { key: $("setkey").value, value: $("setvalue").value })
      .then((s) => showState(s.tags)).catch(showError);
  };
  $("undo").onclick = () => api("POST", sessionPath() + "/undo")
    .then(() => openSession(player(), npcId())).catch(showError);
  $("retry").onclick = async () => {  // the last line again, with a new draw
    const line = state.lastLine;
    if (!line) return;
    try {
      await api("POST", sessionPath() + "/undo");
      await openSession(player(), npcId());
      await turn(line);
    } catch (e) { showError(e); }
  };
  $("refresh").onclick = () => refreshSessions().catch(showError);
  await Promise.all([loadNpc(), refreshSessions()]);
}

// -- an eval report file, opened in the browser (nothing is uploaded) -----------------------
const reports = { report: null, baseline: null };

function turnsOf(report) {  // one row per scenario turn, with its pass or fail
  const rows = [];
  for (const sc of report.scenarios || []) {
    (sc.turns || []).forEach((t, i) => {
      const want = (t.expected && t.expected.flags) || {};
      const fired = Object.keys(t.flags || {}).filter((n) => t.flags[n].fired);
      const wrong = Object.entries(want).filter(([n, v]) => t.flags[n] && t.flags[n].fired !== v);
      rows.push({ key: `${sc.id}#${i + 1}`, id: sc.id, turn: i + 1, npc: sc.npc_id || "",
        player: t.player, reply: t.reply, fired, want, failed: wrong.length > 0,
        flags: new Set([...fired, ...Object.keys(want)]), deltas: t.deltas || {} });
    });
  }
  return rows;
}

function showReport() {
  const rep = reports.report;
  if (!rep) return;
  const agg = rep.aggregates || {};
  $("summary").textContent = `${rep.bundle ? rep.bundle.name : ""} · ${agg.scenarios} scenarios · ` +
    `${agg.turns} turns · flag F1 macro ${agg.flag_f1_macro == null ? "–" : agg.flag_f1_macro.toFixed(3)}` +
    (reports.baseline ? " · rows that differ from the other report are marked" : "");
  const base = new Map(reports.baseline ? turnsOf(reports.baseline).map((r) => [r.key, r]) : []);
  const rows = turnsOf(rep);
  const flags = new Set(), npcs = new Set();
  rows.forEach((r) => { r.flags.forEach((f) => flags.add(f)); npcs.add(r.npc); });
  for (const [sel, values] of [["evalflag", flags], ["evalnpc", npcs]]) {
    const keep = $(sel).value;
    $(sel).replaceChildren($(sel).options[0]);
    [...values].sort().forEach((v) => $(sel).append(new Option(v, v)));
    $(sel).value = keep;
  }
  const t = $("evalrows"); t.replaceChildren();
  row(t, ["scenario", "turn", "NPC", "player", "reply", "Δ trust", "fired", "expected", "", "other report"]);
  for (const r of rows) {
    if ($("onlyfailed").checked && !r.failed) continue;
    if ($("evalflag").value && !r.flags.has($("evalflag").value)) continue;
    if ($("evalnpc").value && r.npc !== $("evalnpc").value) continue;
    const other = base.get(r.key);
    const changed = other && (other.reply !== r.reply || other.fired.join() !== r.fired.join());
    const expected = Object.entries(r.want).filter(([, v]) => v).map(([n]) => n).join(", ");
    row(t, [r.id, String(r.turn), r.npc, r.player, r.reply,
      r.deltas.trust == null ? "–" : r.deltas.trust.toFixed(2), r.fired.join(", ") || "–",
      expected || (Object.keys(r.want).length ? "none" : "–"), r.failed ? "FAIL" : "pass",
      other ? (changed ? `was: ${other.reply} [${other.fired.join(", ")}]` : "same") : ""],
    [r.failed ? "blocked" : "", changed ? "changed" : ""].join(" ").trim());
  }
}

for (const which of ["report", "baseline"]) {
  $(which).onchange = async () => {
    try {
      const file = $(which).files[0];
      reports[which] = file ? JSON.parse(await file.text()) : null;
      showReport();
    } catch (e) { showError(new Error(`${which}: not an eval report (${e.message})`)); }
  };
}
for (const id of ["onlyfailed", "evalflag", "evalnpc"]) $(id).onchange = showReport;

start().catch(showError);
