// The duoclass web page: pick a model, send an image or a text, show the top-k labels and the model card, and on
// Explain why: the heatmap stacked on the image, or the text with each word coloured by its score.
// Plain DOM code, no framework and nothing from another host. Every value from the server is written with
// textContent (never innerHTML), so class names or errors cannot inject markup.
"use strict";

const $ = (id) => document.getElementById(id);
let models = [];
let current = null;
let lastInput = null;  // what the last prediction was of: {file} or {text}, for the Explain button

function el(tag, props = {}, children = []) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(props)) {
    if (k === "text") e.textContent = v;
    else if (k === "style") Object.assign(e.style, v);
    else e.setAttribute(k, v);
  }
  for (const c of children) e.appendChild(c);
  return e;
}

async function api(path, options = {}) {
  const r = await fetch(path, { credentials: "same-origin", ...options });
  let body = null;
  try { body = await r.json(); } catch (_) { body = null; }
  if (!r.ok) {
    const msg = body && body.error ? body.error : `HTTP ${r.status}`;
    throw new Error(msg);
  }
  return body;
}

function setStatus(text, isError = false) {
  const s = $("status");
  s.textContent = text;
  s.className = isError ? "error" : "";
}

function topK() {
  const k = parseInt($("top-k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 5;
}

function showResults(resp, clientMs) {
  const list = $("results");
  list.replaceChildren();
  const p = resp.predictions[0];
  const verdict = $("verdict");
  verdict.hidden = false;
  verdict.className = p.abstained ? "abstained" : "";
  verdict.textContent = p.abstained
    ? `abstained: the model is not sure enough (top probability ${(p.score * 100).toFixed(1)}%, under ` +
      `${(current.abstain_below * 100).toFixed(0)}%); no label is given`
    : `label: ${p.label}`;
  const set = $("prediction-set");
  set.hidden = !Array.isArray(p.set);
  if (Array.isArray(p.set)) {
    const cover = current.conformal ? `${((1 - current.conformal.alpha) * 100).toFixed(0)}%` : "";
    set.textContent = `conformal set (holds the true class ${cover} of the time): ` +
      (p.set.length ? p.set.join(", ") : "none of the classes");
  }
  for (const { label, score } of p.top_k) {
    const pct = (score * 100).toFixed(1);
    list.appendChild(el("li", { class: "result" }, [
      el("span", { class: "result-label", text: label }),
      el("span", { class: "bar" }, [el("span", { class: "fill", style: { width: `${Math.max(score * 100, 0.5)}%` } })]),
      el("span", { class: "result-score", "data-score": String(score), text: `${pct}%` }),
    ]));
  }
  $("latency").textContent = `latency ${clientMs.toFixed(0)} ms (server ${resp.latency_ms.toFixed(1)} ms)`;
  setStatus(p.warning ? `warning: ${p.warning}` : "");
  $("explain").hidden = !lastInput || current.explain === false;  // the server may be run with --no-explain
}

// --- explanations: the heatmap over the image, or the text with each word coloured by its score -------------
function clearExplanation() {
  $("explain").hidden = true;
  $("explain-image").hidden = true;
  $("heatmap-switch").hidden = true;
  $("explain-text").hidden = true;
  $("explain-text").replaceChildren();
  $("explain-heatmap").removeAttribute("src");
  $("explain-legend").textContent = "";
  $("explain-status").textContent = "";
  $("explain-status").className = "";
}

function shade(score, top) {  // red: speaks for the class explained, blue: against it (render._shade's colours)
  const v = top ? Math.max(-1, Math.min(1, score / top)) : 0;
  return v >= 0 ? `rgba(220, 40, 40, ${v.toFixed(2)})` : `rgba(40, 90, 220, ${(-v).toFixed(2)})`;
}

function showTokens(text, tokens) {
  // offsets count Unicode code points (the server's Python strings), so the text is cut as code points too
  const chars = Array.from(text);
  const top = Math.max(0, ...tokens.map((t) => Math.abs(t.score)));
  const parts = [];
  let at = 0;
  for (const t of [...tokens].sort((a, b) => a.start - b.start)) {
    if (t.start < at) continue;
    if (t.start > at) parts.push(document.createTextNode(chars.slice(at, t.start).join("")));
    const span = el("span", { class: "token", title: `${t.score >= 0 ? "+" : ""}${t.score.toFixed(4)}`,
                              "data-score": String(t.score), text: chars.slice(t.start, t.end).join("") });
    span.style.backgroundColor = shade(t.score, top);
    parts.push(span);
    at = t.end;
  }
  if (at < chars.length) parts.push(document.createTextNode(chars.slice(at).join("")));
  $("explain-text").replaceChildren(...parts);
  $("explain-text").hidden = false;
}

function showHeatmap(file, x) {
  const base = $("explain-base");
  if (base.src) URL.revokeObjectURL(base.src);
  base.onload = () => base.classList.toggle("small", base.naturalWidth < base.clientWidth);
  base.src = URL.createObjectURL(file);
  $("explain-heatmap").src = `data:image/png;base64,${x.heatmap_png}`;
  $("explain-heatmap").hidden = !$("heatmap-toggle").checked;
  $("explain-image").hidden = false;
  $("heatmap-switch").hidden = false;
}

async function explain() {
  if (!current || !lastInput) return;
  const status = $("explain-status");
  status.className = "";
  status.textContent = "explaining...";
  const button = $("explain-button");
  button.disabled = true;
  const input = lastInput;
  let options;
  if (input.file) {
    const form = new FormData();
    form.append("file", input.file, input.file.name || "image");
    options = { body: form };
  } else {
    options = { headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text: input.text }) };
  }
  const method = $("explain-method").value || "auto";
  if (input.file) options.body.append("method", method);
  else options.body = JSON.stringify({ text: input.text, method });
  try {
    const resp = await api(`/v1/models/${encodeURIComponent(current.name)}/explain`, { method: "POST", ...options });
    if (input !== lastInput) return;  // a newer prediction came meanwhile
    const x = resp.explanations[0];
    if (x.error) throw new Error(x.error);
    if (input.file) showHeatmap(input.file, x);
    else showTokens(input.text, x.tokens || []);
    const colours = x.method === "gradcam" || x.method === "gradcam++"
      ? "bright: where the model found evidence for it"
      : "red: speaks for it, blue: against it";
    $("explain-legend").textContent = `${x.method}: why ${x.target} (p = ${x.score.toFixed(3)}); ${colours}`;
    status.textContent = "";
  } catch (e) {
    status.textContent = e.message;
    status.className = "error";
  } finally {
    button.disabled = false;
  }
}

async function predict(options) {
  if (!current) return;
  setStatus("predicting...");
  $("results").replaceChildren();
  $("verdict").hidden = true;
  $("prediction-set").hidden = true;
  $("latency").textContent = "";
  clearExplanation();
  const t0 = performance.now();
  try {
    const resp = await api(`/v1/models/${encodeURIComponent(current.name)}/predict`, { method: "POST", ...options });
    showResults(resp, performance.now() - t0);
  } catch (e) {
    setStatus(e.message, true);
  }
}

function predictImage(file) {
  if (!file) return;
  const preview = $("preview");
  if (preview.src) URL.revokeObjectURL(preview.src);
  preview.src = URL.createObjectURL(file);
  preview.hidden = false;
  lastInput = { file };
  const form = new FormData();
  form.append("file", file, file.name || "image");
  form.append("top_k", String(topK()));
  predict({ body: form });
}

function predictText() {
  const text = $("text").value;
  lastInput = { text };
  predict({ headers: { "Content-Type": "application/json" }, body: JSON.stringify({ text, top_k: topK() }) });
}

function showCard(m) {
  $("card-name").textContent = m.name;
  $("card-model").textContent = `${m.model} · ${m.task} · ${m.classes.length} classes · backend ${m.backend}`;
  $("card-classes").replaceChildren(...m.classes.map((c) => el("li", { class: "class", text: c })));
  const tbody = $("card-metrics").querySelector("tbody");
  tbody.replaceChildren();
  const test = (m.metrics && (m.metrics.test || m.metrics.valid)) || {};
  const split = m.metrics && m.metrics.test ? "test" : "valid";
  const intervals = (m.intervals && m.intervals[split]) || {};
  const keys = ["accuracy", "balanced_accuracy", "roc_auc", "average_precision", "sensitivity", "specificity",
                "f1_macro", "f1_weighted", "precision_macro", "recall_macro", "n"];
  for (const k of keys) {
    if (!(k in test)) continue;
    const v = test[k];
    const iv = intervals[k];
    const text = k === "n" ? String(v) : v.toFixed(4) + (iv ? ` [${iv.low.toFixed(4)}, ${iv.high.toFixed(4)}]` : "");
    tbody.appendChild(el("tr", {}, [el("th", { text: k }), el("td", { text })]));
  }
  const cal = m.calibration || {};
  if (cal.ece && cal.ece[split] !== undefined && cal.ece[split] !== null) {
    tbody.appendChild(el("tr", {}, [el("th", { text: "ECE" }),
      el("td", { text: `${cal.ece[split].toFixed(4)} (temperature ${cal.temperature.toFixed(3)})` })]));
  }
  if (!tbody.children.length) tbody.appendChild(el("tr", {}, [el("td", { text: "no metrics.json in the model folder" })]));
  for (const [plot, id] of [["confusion_matrix", "card-confusion"], ["curves", "card-curves"],
                            ["reliability", "card-reliability"], ["roc_pr", "card-roc"]]) {
    const fig = $(id);
    const url = m.plots && m.plots[plot];
    fig.hidden = !url;
    fig.querySelector("img").src = url || "";
  }
}

function selectModel(name) {
  current = models.find((m) => m.name === name) || null;
  if (!current) return;
  $("image-input").hidden = current.task !== "image";
  $("text-input").hidden = current.task !== "text";
  $("results").replaceChildren();
  $("verdict").hidden = true;
  $("prediction-set").hidden = true;
  $("latency").textContent = "";
  lastInput = null;
  clearExplanation();
  // the methods this model has on this server (the card lists them; auto first)
  $("explain-method").replaceChildren(...(current.explain_methods || ["auto"]).map(
    (m) => el("option", { value: m, text: m })));
  setStatus("");
  showCard(current);
}

async function init() {
  try {
    const listing = await api("/v1/models");
    models = listing.models;
    $("logout").hidden = !listing.token_required;
  } catch (e) {
    setStatus(`cannot list the models: ${e.message}`, true);
    return;
  }
  const select = $("model-select");
  select.replaceChildren(...models.map((m) => el("option", { value: m.name, text: `${m.name} (${m.task})` })));
  select.addEventListener("change", () => selectModel(select.value));
  if (models.length) selectModel(models[0].name);

  const zone = $("drop-zone");
  const input = $("file-input");
  zone.addEventListener("click", () => input.click());
  zone.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") input.click(); });
  input.addEventListener("change", () => predictImage(input.files[0]));
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) predictImage(e.dataTransfer.files[0]);
  });
  $("predict-text").addEventListener("click", predictText);
  $("explain-button").addEventListener("click", explain);
  $("heatmap-toggle").addEventListener("change", () => {
    $("explain-heatmap").hidden = !$("heatmap-toggle").checked;
  });
  $("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) predictText(); });
}

document.addEventListener("DOMContentLoaded", init);
