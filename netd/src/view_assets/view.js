// netd's live view: nodes as columns with their tasks as cards coloured by service,
// and the services with their VIPs, published ports and per-backend connections.
// It follows the cluster by its event stream (/view/events): each event asks for the
// state again (coalesced, so a burst of events costs one fetch); the connection counts
// are read every second. Everything comes from the netd that serves this page.
"use strict";

const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

// A stable colour per service: a hue from its name.
function colour(name, light) {
  let h = 0;
  for (const c of name) h = (h * 31 + c.charCodeAt(0)) >>> 0;
  return `hsl(${h % 360}, 65%, ${light}%)`;
}

let state = null;
let counters = {};

function renderNodes() {
  const byNode = new Map(state.nodes.map((n) => [n.name, []]));
  for (const t of state.tasks) {
    if (!byNode.has(t.node)) byNode.set(t.node, []);
    byNode.get(t.node).push(t);
  }
  const nodes = state.nodes.map((n) => n.name);
  for (const name of byNode.keys()) if (!nodes.includes(name)) nodes.push(name);
  const info = new Map(state.nodes.map((n) => [n.name, n]));
  document.getElementById("nodes").innerHTML = nodes.map((name) => {
    const n = info.get(name) || { name, address: "", ready: false };
    const tasks = byNode.get(name).sort((a, b) =>
      a.service.localeCompare(b.service) || a.name.localeCompare(b.name));
    const cards = tasks.map((t) => {
      const cls = ["task"];
      if (t.state === "draining") cls.push("draining");
      if (t.health && t.health.startsWith("unhealthy")) cls.push("unhealthy");
      const badges = [t.state !== "running" ? t.state : "", t.health && t.health !== "healthy" ? t.health : ""]
        .filter(Boolean).map((b) => `<span class="badge">${esc(b)}</span>`).join("");
      return `<div class="${cls.join(" ")}" data-task="${esc(t.name)}" data-service="${esc(t.service)}"
        style="background:${colour(t.service, 86)};border-left-color:${colour(t.service, 45)}">
        <div class="name">${esc(t.name)}${badges}</div>
        <div class="meta">${esc(t.service)} · ${esc(t.addresses.join(", "))}</div></div>`;
    }).join("");
    return `<div class="node${n.ready ? "" : " down"}" data-node="${esc(name)}">
      <h3>${esc(name)}<small>${esc(n.address || "")} · ${n.ready ? "ready" : "down"} · ${tasks.length} tasks</small></h3>
      <div class="cards">${cards}</div></div>`;
  }).join("");
}

function renderServices() {
  const rows = state.services.map((s) => {
    const vips = s.vips.map((v) => `${esc(v.vip)} <small>(${esc(v.network)})</small>`).join("<br>");
    return `<tr data-service="${esc(s.name)}">
      <td><span class="swatch" style="background:${colour(s.name, 45)}"></span>${esc(s.name)}</td>
      <td>${vips || "—"}</td><td>${esc(s.publish.join(", ")) || "—"}</td>
      <td>${s.tasks.length}</td><td class="backends"></td></tr>`;
  }).join("");
  document.querySelector("#services tbody").innerHTML = rows;
  renderCounts();
}

// Each backend's connections, summed over the service's VIPs, as a number and a bar.
function renderCounts() {
  if (!state) return;
  for (const s of state.services) {
    const cell = document.querySelector(`#services tr[data-service="${CSS.escape(s.name)}"] .backends`);
    if (!cell) continue;
    const per = s.backends.map((b) => {
      const n = s.vips.reduce((sum, v) => sum + ((counters[v.vip] || {})[b.address] || 0), 0);
      return { task: b.task, address: b.address, n };
    });
    const most = Math.max(1, ...per.map((p) => p.n));
    cell.innerHTML = per.map((p) => `<div class="backend" data-backend="${esc(p.task)}">
      <span class="n">${p.n}</span><span class="bar" style="width:${(8 * p.n) / most}em"></span>
      ${esc(p.task)} <small>${esc(p.address)}</small></div>`).join("") || "—";
  }
}

function render() {
  const down = state.nodes.filter((n) => !n.ready).length;
  document.getElementById("summary").textContent =
    `${state.nodes.length} nodes${down ? ` (${down} down)` : ""}, ${state.services.length} services, ` +
    `${state.tasks.length} tasks · revision ${state.revision}`;
  document.getElementById("counted-on").textContent = state.node;
  renderNodes();
  renderServices();
  document.body.dataset.revision = state.revision;
}

let fetching = false;
let again = false;
async function refresh() {
  if (fetching) { again = true; return; }
  fetching = true;
  try {
    do {
      again = false;
      const r = await fetch("/view/state", { cache: "no-store" });
      if (r.ok) { state = await r.json(); render(); }
    } while (again);
  } catch (e) {
    console.warn("state", e);
  } finally {
    fetching = false;
  }
}

async function poll() {
  try {
    const r = await fetch("/view/counters", { cache: "no-store" });
    if (r.ok) { counters = await r.json(); renderCounts(); }
  } catch (e) {
    console.warn("counters", e);
  }
}

function follow() {
  const live = document.getElementById("live");
  const es = new EventSource("/view/events");
  es.onopen = () => { live.className = "live on"; refresh(); };
  es.onmessage = () => refresh();
  es.onerror = () => { live.className = "live off"; };
}

refresh();
follow();
setInterval(poll, 1000);
poll();
