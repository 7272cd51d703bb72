// curate browse: the page. Everything from the data goes into the DOM as text
// (textContent) or as a URL the server built (/media/<uid>/<member>); nothing is
// parsed as HTML. The state (view, WHERE, offset) lives in the location hash.
"use strict";

const LIMIT = 60;
const state = { view: "samples", where: "", offset: 0, total: 0 };
const $ = (id) => document.getElementById(id);

function el(tag, attrs, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}

async function api(path) {
  const response = await fetch(path, { headers: { Accept: "application/json" } });
  let body;
  try { body = await response.json(); } catch (e) { body = { error: `HTTP ${response.status}` }; }
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function fmt(value) {
  if (value === null || value === undefined) return "";
  if (typeof value === "number") return Number.isInteger(value) ? String(value) : value.toFixed(3);
  if (typeof value === "object") return JSON.stringify(value, null, 1);
  return String(value);
}

function mediaNode(entry, inGrid) {
  const type = entry.type || "";
  if (type.startsWith("image/")) {
    const img = el("img", { src: entry.url, alt: entry.name, loading: "lazy" });
    img.className = inGrid ? "thumb" : "media";
    return img;
  }
  if (type.startsWith("video/")) {
    const video = el("video", { src: entry.url, preload: "metadata", muted: "" });
    if (!inGrid) video.setAttribute("controls", "");
    video.className = inGrid ? "thumb" : "media";
    return video;
  }
  return null;
}

function card(row, media, view) {
  const node = el("article", { "data-uid": row.uid, tabindex: "0" });
  node.className = "card";
  const visual = media.find((m) => /^(image|video)\//.test(m.type || ""));
  node.append(visual ? mediaNode(visual, true) : el("div", { class: "nomedia" }, "no media"));
  if (row.text) node.append(el("p", { class: "caption" }, row.text));
  if (row.caption && row.caption !== row.text) node.append(el("p", { class: "recaption" }, "re-caption: " + row.caption));
  if (row.ocr_text) node.append(el("p", { class: "ocr" }, "OCR: " + row.ocr_text));
  const scores = [];
  for (const name of ["clip_score", "nsfw", "language_score"]) {
    if (typeof row[name] === "number") scores.push(`${name} ${fmt(row[name])}`);
  }
  if (row.language) scores.push(`lang ${row.language}`);
  if (view === "samples") scores.unshift(`${row.tier} · ${row.kind}`);
  if (scores.length) node.append(el("div", { class: "scores" }, scores.join(" · ")));
  if (view === "ledger") {
    const status = el("div", { class: `status status-${row.status}` },
      [row.status, row.reason, row.stage].filter(Boolean).join(" · "));
    node.append(status);
    if (row.error) node.append(el("div", { class: "scores error" }, row.error));
  }
  node.append(el("div", { class: "uid" }, row.uid));
  node.addEventListener("click", () => openSample(row.uid));
  node.addEventListener("keydown", (e) => { if (e.key === "Enter") openSample(row.uid); });
  return node;
}

function saveHash() {
  const params = new URLSearchParams({ view: state.view, where: state.where, offset: String(state.offset) });
  history.replaceState(null, "", "#" + params.toString());
}

function loadHash() {
  const params = new URLSearchParams(location.hash.slice(1));
  state.view = params.get("view") === "ledger" ? "ledger" : "samples";
  state.where = params.get("where") || "";
  state.offset = Math.max(0, parseInt(params.get("offset") || "0", 10) || 0);
  $("view").value = state.view;
  $("where").value = state.where;
}

async function search() {
  showError("");
  const params = new URLSearchParams({ view: state.view, where: state.where, limit: String(LIMIT),
                                       offset: String(state.offset) });
  const grid = $("grid");
  grid.setAttribute("aria-busy", "true");
  try {
    const page = await api("/api/samples?" + params.toString());
    state.total = page.total;
    grid.replaceChildren(...page.rows.map((row, i) => card(row, page.media[i] || [], page.view)));
    const last = Math.min(page.offset + page.rows.length, page.total);
    $("count").textContent = page.total ? `${page.offset + 1}–${last} of ${page.total} ${page.view} rows`
                                        : `no ${page.view} rows match`;
    saveHash();
  } catch (err) {
    grid.replaceChildren();
    $("count").textContent = "";
    showError(err.message);
  } finally {
    grid.setAttribute("aria-busy", "false");
    $("prev").disabled = state.offset <= 0;
    $("next").disabled = state.offset + LIMIT >= state.total;
  }
}

function documentNodes(sample) {
  // A document's text and images in its own order; images its items do not place come after.
  const byName = new Map(sample.media.map((m) => [m.name, m]));
  const placed = new Set();
  const nodes = [];
  const items = sample.doc && Array.isArray(sample.doc.items) ? sample.doc.items : [];
  for (const item of items) {
    if (!item || typeof item !== "object") continue;
    if (item.type === "text" && typeof item.text === "string" && item.text.trim()) {
      nodes.push(el("p", { class: "doc-text" }, item.text));
    } else if (item.type === "image" && byName.has(item.member) && !placed.has(item.member)) {
      placed.add(item.member);
      nodes.push(mediaNode(byName.get(item.member), false));
    }
  }
  for (const m of sample.media) {
    if (!placed.has(m.name)) nodes.push(...mediaBlock(m));
  }
  return nodes;
}

function mediaBlock(entry) {
  const node = mediaNode(entry, false);
  if (node) return [node];
  const link = el("a", { href: entry.url, target: "_blank", rel: "noopener noreferrer" }, entry.name);
  return [el("span", { class: "member" }, "member: "), link];
}

async function openSample(uid) {
  showError("");
  let sample;
  try {
    sample = await api("/api/sample/" + encodeURIComponent(uid));
  } catch (err) {
    showError(err.message);
    return;
  }
  const row = sample.row;
  $("detail-title").textContent = `${sample.uid} · ${sample.view === "samples" ? row.tier + " · " + row.kind
                                                                             : row.status + (row.reason ? " · " + row.reason : "")}`;
  const note = $("detail-note");
  note.textContent = sample.media_note || "";
  note.hidden = !sample.media_note;
  const box = $("detail-media");
  box.replaceChildren(...(sample.doc ? documentNodes(sample) : sample.media.flatMap(mediaBlock)));
  const body = $("columns").tBodies[0];
  const rows = Object.entries(row).map(([name, value]) => {
    const tr = el("tr", { "data-column": name });
    tr.append(el("th", {}, name), el("td", {}, fmt(value)));
    return tr;
  });
  if (sample.view === "samples" && sample.ledger) {
    for (const name of ["stage", "status", "raw_shard", "raw_key"]) {
      if (name in sample.ledger && !(name in row)) {
        const tr = el("tr", { "data-column": "ledger." + name });
        tr.append(el("th", {}, "ledger." + name), el("td", {}, fmt(sample.ledger[name])));
        rows.push(tr);
      }
    }
  }
  body.replaceChildren(...rows);
  $("detail").hidden = false;
  $("detail").scrollTop = 0;
}

function closeDetail() {
  for (const v of $("detail-media").querySelectorAll("video")) v.pause();
  $("detail").hidden = true;
}

document.addEventListener("DOMContentLoaded", () => {
  loadHash();
  $("filter").addEventListener("submit", (e) => {
    e.preventDefault();
    state.view = $("view").value;
    state.where = $("where").value;
    state.offset = 0;
    search();
  });
  $("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - LIMIT); search(); });
  $("next").addEventListener("click", () => { state.offset += LIMIT; search(); });
  $("close").addEventListener("click", closeDetail);
  document.addEventListener("keydown", (e) => { if (e.key === "Escape") closeDetail(); });
  search();
});
