"use strict";
// The explorer page's script (patchmap/explorer.py inlines it, with the data it reads). It unpacks plotly.js
// and the run's numbers from the page, draws the heatmap, the selected site's per-layer line and a clicked
// cell's examples, and computes every mean again over the examples the filters choose. The arrays are in
// C order: metrics (example, site, layer), top tokens (example, site, layer, rank), as in divergence.nc.

const Z95 = 1.959963984540054;  // the standard normal distribution's 97.5% quantile
const BLUES = [[0, "#f7fbff"], [0.125, "#deebf7"], [0.25, "#c6dbef"], [0.375, "#9ecae1"], [0.5, "#6baed6"],
               [0.625, "#4292c6"], [0.75, "#2171b5"], [0.875, "#08519c"], [1, "#08306b"]];  // heatmap.png's Blues
const TYPES = {float32: Float32Array, int32: Int32Array, uint32: Uint32Array, uint16: Uint16Array, uint8: Uint8Array};
const PLOT_CONFIG = {displaylogo: false, responsive: true};

// ---- unpacking

function base64Bytes(text) {
  if (Uint8Array.fromBase64) return Uint8Array.fromBase64(text);
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

async function inflate(id) {
  if (typeof DecompressionStream === "undefined") {
    throw new Error("this browser cannot unpack the page (it has no DecompressionStream): open it in a current " +
                    "Chrome, Edge, Firefox or Safari");
  }
  const bytes = base64Bytes(document.getElementById(id).textContent.trim());
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

// [header length, uint32 little-endian][header JSON][arrays, each as byte planes at its offset]
function unpack(bytes) {
  const length = new DataView(bytes.buffer, bytes.byteOffset, 4).getUint32(0, true);
  const header = JSON.parse(new TextDecoder().decode(bytes.subarray(4, 4 + length)));
  const arrays = {};
  for (const [name, spec] of Object.entries(header.arrays)) {
    const Type = TYPES[spec.dtype];
    const count = spec.shape.reduce((a, b) => a * b, 1);
    arrays[name] = new Type(interleaved(bytes.subarray(4 + length + spec.offset), count, Type.BYTES_PER_ELEMENT));
  }
  return {header, arrays};
}

function interleaved(planes, count, size) {
  const out = new Uint8Array(count * size);
  for (let b = 0; b < size; b++) {
    for (let i = 0, at = b * count; i < count; i++) out[i * size + b] = planes[at + i];
  }
  return out.buffer;
}

function runScript(source) {
  const script = document.createElement("script");
  script.textContent = source;
  document.head.appendChild(script);
}

// ---- statistics

// Per cell (site, layer) of one metric, over the chosen examples with a finite value: n, mean and sd (n - 1).
function cellStats(values, chosen, cells) {
  const n = new Float64Array(cells), mean = new Float64Array(cells), squares = new Float64Array(cells);
  for (const e of chosen) {
    for (let c = 0, at = e * cells; c < cells; c++) {
      const v = values[at + c];
      if (Number.isFinite(v)) { n[c] += 1; mean[c] += v; }
    }
  }
  for (let c = 0; c < cells; c++) mean[c] = n[c] ? mean[c] / n[c] : NaN;
  for (const e of chosen) {
    for (let c = 0, at = e * cells; c < cells; c++) {
      const v = values[at + c];
      if (Number.isFinite(v)) squares[c] += (v - mean[c]) ** 2;
    }
  }
  const sd = squares.map((s, c) => (n[c] > 1 ? Math.sqrt(s / (n[c] - 1)) : NaN));
  return {n, mean, sd};
}

// Wilson's score interval of a proportion
function wilson(p, n) {
  const z2 = Z95 * Z95, centre = (p + z2 / (2 * n)) / (1 + z2 / n);
  const half = (Z95 / (1 + z2 / n)) * Math.sqrt((p * (1 - p)) / n + z2 / (4 * n * n));
  return [centre - half, centre + half];
}

// ---- formatting and elements

function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return "n/a";
  if (v !== 0 && Math.abs(v) < 1e-3) return v.toExponential(3);
  return v.toPrecision(4);
}

function plural(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

function unitText(unit) {
  return unit === "bits" || unit === "nats" ? " " + unit : "";
}

// a metric's name with its unit, for titles and headers
function labelWithUnit(m) {
  return m.unit === "bits" || m.unit === "nats" ? `${m.label} (${m.unit})` : m.label;
}

function escapeHtml(text) {
  return String(text).replace(/&/g, "&amp;").replace(/</g, "&lt;").replace(/>/g, "&gt;");
}

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) node.append(child);
  return node;
}

function marked(prompt, span) {
  if (!span) return el("span", {className: "prompt"}, prompt);
  return el("span", {className: "prompt"}, prompt.slice(0, span[0]),
            el("mark", {title: "subject"}, prompt.slice(span[0], span[1])), prompt.slice(span[1]));
}

function tokenCode(text) {
  return el("code", {className: "token"}, text.replace(/\n/g, "\\n").replace(/\t/g, "\\t"));
}

// ---- the page

class Explorer {
  constructor({header, arrays}) {
    this.h = header;
    this.a = arrays;
    this.E = header.examples.id.length;
    this.S = header.sites.length;
    this.L = header.layers.length;
    this.cells = this.S * this.L;
    this.K = header.tokens ? header.arrays.top_prob.shape[3] : 0;
    this.metric = header.metrics[0].name;
    this.relation = "";
    this.text = "";
    this.site = 0;
    this.layer = null;
    const ex = header.examples;
    this.haystack = ex.id.map((id, e) => [id, ex.relation[e], ex.target_prompt[e], ex.source_prompt[e],
                                          ex.target_attribute[e], ex.source_attribute[e]].join("\n").toLowerCase());
    this.heatmap = document.getElementById("heatmap");
    this.line = document.getElementById("line");
  }

  metricInfo() { return this.h.metrics.find((m) => m.name === this.metric); }

  chooseExamples() {
    const ex = this.h.examples, text = this.text.trim().toLowerCase(), chosen = [];
    for (let e = 0; e < this.E; e++) {
      if (this.relation && ex.relation[e] !== this.relation) continue;
      if (text && !this.haystack[e].includes(text)) continue;
      chosen.push(e);
    }
    return chosen;
  }

  // [low, high, how] of a cell's 95% interval, or null
  interval(c) {
    const n = this.stats.n[c], mean = this.stats.mean[c];
    if (this.metric === "js" && this.chosen.length === this.E) {
      const s = Math.floor(c / this.L), l = c % this.L, low = this.h.bootstrap.low[s][l];
      if (low !== null && n === this.E) return [low, this.h.bootstrap.high[s][l], "bootstrap, divergence.nc"];
    }
    if (n < 2) return null;
    if (this.metric === "flip") return [...wilson(mean, n), "Wilson"];
    const half = (Z95 * this.stats.sd[c]) / Math.sqrt(n);
    return [mean - half, mean + half, "normal approximation"];
  }

  setUp() {
    const metric = document.getElementById("metric");
    for (const m of this.h.metrics) metric.append(el("option", {value: m.name, title: m.description}, m.label));
    metric.addEventListener("change", () => { this.metric = metric.value; this.update(); });
    const relation = document.getElementById("relation"), counts = new Map();
    for (const r of this.h.examples.relation) counts.set(r, (counts.get(r) || 0) + 1);
    relation.append(el("option", {value: ""}, `all (${this.E})`));
    for (const r of [...counts.keys()].sort()) relation.append(el("option", {value: r}, `${r || "(none)"} (${counts.get(r)})`));
    relation.addEventListener("change", () => { this.relation = relation.value; this.update(); });
    const text = document.getElementById("text");
    let pending = null;
    text.addEventListener("input", () => {
      clearTimeout(pending);
      pending = setTimeout(() => { this.text = text.value; this.update(); }, 150);
    });
  }

  async update() {
    this.chosen = this.chooseExamples();
    this.values = this.a[this.metric];
    this.stats = cellStats(this.values, this.chosen, this.cells);
    document.getElementById("chosen").textContent = `${this.chosen.length} of ${this.E} examples chosen`;
    await Promise.all([this.drawHeatmap(), this.drawLine()]);
    this.drawTable();
  }

  hoverText(s, l) {
    const c = s * this.L + l, m = this.metricInfo(), n = this.stats.n[c];
    const detail = this.h.site_details ? ` (${escapeHtml(this.h.site_details[s])})` : "";
    const where = `<b>${escapeHtml(this.h.sites[s])}</b>${detail}, layer ${this.h.layers[l]}`;
    if (!n) return `${where}<br>no chosen example has a finite ${escapeHtml(m.label)}`;
    const ci = this.interval(c);
    const range = ci ? `95% interval ${fmt(ci[0])} to ${fmt(ci[1])} (${ci[2]})` : "no interval (one example)";
    return `${where}<br>mean ${escapeHtml(m.label)}: ${fmt(this.stats.mean[c])}${unitText(m.unit)}<br>${range}` +
           `<br>n = ${plural(n, "example")}`;
  }

  drawHeatmap() {
    const z = [], text = [], m = this.metricInfo();
    let top = 0;
    for (let s = 0; s < this.S; s++) {
      z.push([]);
      text.push([]);
      for (let l = 0; l < this.L; l++) {
        const c = s * this.L + l, value = this.stats.n[c] ? this.stats.mean[c] : null;
        z[s].push(value);
        text[s].push(this.hoverText(s, l));
        if (value !== null && value > top) top = value;
      }
    }
    const cellOutline = this.layer === null ? [] : [{type: "rect", x0: this.layer - 0.5, x1: this.layer + 0.5,
      y0: this.site - 0.5, y1: this.site + 0.5, line: {color: "#d62728", width: 3}}];
    const trace = {type: "heatmap", z, text, x: [...Array(this.L).keys()], y: [...Array(this.S).keys()],
      hovertemplate: "%{text}<extra></extra>", colorscale: BLUES, zmin: 0, zmax: top || 1, xgap: 1, ygap: 1,
      colorbar: {title: {text: `mean ${escapeHtml(labelWithUnit(m))}`, side: "right"}, exponentformat: "e"}};
    const layout = {
      height: 130 + 34 * this.S, margin: {l: 110, r: 20, t: 30, b: 45},
      title: {text: `mean ${escapeHtml(m.label)} over ${plural(this.chosen.length, "example")}`, font: {size: 14}},
      xaxis: {title: {text: "layer"}, tickvals: [...Array(this.L).keys()], ticktext: this.h.layers.map(String),
              fixedrange: true},
      yaxis: {tickvals: [...Array(this.S).keys()], ticktext: this.h.sites.map(escapeHtml), autorange: "reversed",
              fixedrange: true},
      shapes: cellOutline,
    };
    return Plotly.react(this.heatmap, [trace], layout, PLOT_CONFIG);
  }

  drawLine() {
    const m = this.metricInfo(), x = this.h.layers, mean = [], low = [], high = [], text = [];
    for (let l = 0; l < this.L; l++) {
      const c = this.site * this.L + l, ci = this.stats.n[c] ? this.interval(c) : null;
      mean.push(this.stats.n[c] ? this.stats.mean[c] : null);
      low.push(ci ? ci[0] : null);
      high.push(ci ? ci[1] : null);
      text.push(this.hoverText(this.site, l));
    }
    const traces = [
      {x, y: high, mode: "lines", line: {width: 0}, hoverinfo: "skip", showlegend: false},
      {x, y: low, mode: "lines", line: {width: 0}, fill: "tonexty", fillcolor: "rgba(33,113,181,0.22)",
       name: "95% interval", hoverinfo: "skip"},
      {x, y: mean, mode: "lines+markers", name: "mean", line: {color: "#2171b5"}, marker: {size: 5}, text,
       hovertemplate: "%{text}<extra></extra>"},
    ];
    const marker = this.layer === null ? [] : [{type: "line", x0: x[this.layer], x1: x[this.layer], yref: "paper",
      y0: 0, y1: 1, line: {color: "#d62728", width: 1, dash: "dot"}}];
    const layout = {
      height: 300, margin: {l: 60, r: 20, t: 40, b: 45}, shapes: marker,
      title: {text: `${escapeHtml(this.h.sites[this.site])}: mean ${escapeHtml(m.label)} per layer, with its 95% ` +
                    "interval", font: {size: 14}},
      xaxis: {title: {text: "layer"}, tickvals: x, zeroline: false, fixedrange: true},
      yaxis: {title: {text: escapeHtml(labelWithUnit(m))}, exponentformat: "e", fixedrange: true},
      legend: {orientation: "h", x: 0, y: 1.12},
    };
    return Plotly.react(this.line, traces, layout, PLOT_CONFIG);
  }

  select(site, layer) {
    this.site = site;
    this.layer = layer;
    return this.update();
  }

  // the chosen examples' indices at a cell, by the metric's value, highest first (ties: example order; n/a last)
  sortedAt(c) {
    const value = (e) => this.values[e * this.cells + c];
    return [...this.chosen].sort((a, b) => {
      const va = value(a), vb = value(b);
      if (!Number.isFinite(va) || !Number.isFinite(vb)) return Number.isFinite(vb) - Number.isFinite(va) || a - b;
      return vb - va || a - b;
    });
  }

  drawTable() {
    const table = document.getElementById("example-table");
    if (this.layer === null) return;
    const m = this.metricInfo(), s = this.site, l = this.layer, c = s * this.L + l;
    document.getElementById("cell-title").textContent =
      `${this.h.sites[s]}, layer ${this.h.layers[l]}: ${plural(this.chosen.length, "example")} by ${m.label}, highest first`;
    const unpatched = this.h.intervention === "noise" ? "clean" : "unpatched";
    const heads = ["#", "example", "target prompt (subject marked)", this.h.source_note ? "source" : "source prompt",
                   "answers", labelWithUnit(m), `p(target answer) ${unpatched} → patched`,
                   "p(source answer) patched"];
    if (this.h.tokens) heads.push("top tokens patched", `top tokens ${unpatched}`);
    table.tHead.replaceChildren(el("tr", {}, ...heads.map((h) => el("th", {}, h))));
    const rows = this.sortedAt(c).map((e, i) => this.row(e, i, c));
    table.tBodies[0].replaceChildren(...rows);
    table.hidden = false;
  }

  row(e, i, c) {
    const ex = this.h.examples, at = e * this.cells + c, value = this.values[at];
    const source = this.h.source_note
      ? el("span", {className: "note"}, this.h.source_note + (ex.noise_seed ? `; noise seed ${ex.noise_seed[e]}` : ""))
      : marked(ex.source_prompt[e], ex.source_span[e]);
    const cells = [
      el("td", {className: "num"}, String(i + 1)),
      el("td", {}, el("div", {}, ex.id[e]), el("div", {className: "relation"}, ex.relation[e])),
      el("td", {}, marked(ex.target_prompt[e], ex.target_span[e])),
      el("td", {}, source),
      el("td", {}, this.answer("target", e), this.answer("source", e)),
      el("td", {className: "num value"}, fmt(value)),
      el("td", {className: "num"}, `${fmt(this.a.p_target_unpatched[e])} → ${fmt(this.a.p_target_answer[at])}`),
      el("td", {className: "num"}, fmt(this.a.p_source_answer[at])),
    ];
    if (this.h.tokens) {
      cells.push(el("td", {className: "top patched"}, ...this.tokens(this.a.top_index, this.a.top_prob, at * this.K)),
                 el("td", {className: "top unpatched"},
                    ...this.tokens(this.a.target_top_index, this.a.target_top_prob, e * this.K)));
    }
    const row = el("tr", {}, ...cells);
    row.dataset.example = ex.id[e];
    row.dataset.value = String(value);
    return row;
  }

  answer(role, e) {
    const line = el("div", {className: "answer"}, `${role}: ${this.h.examples[`${role}_attribute`][e]}`);
    if (this.h.tokens) {
      const token = this.h.tokens.texts[this.a[`${role}_answer_index`][e]];
      line.append(" ", Object.assign(tokenCode(token), {title: "the answer's token"}));
    }
    return line;
  }

  tokens(index, prob, start) {
    const out = [];
    for (let k = 0; k < this.K; k++) {
      const item = el("div", {className: "top-token"}, tokenCode(this.h.tokens.texts[index[start + k]]),
                      " " + fmt(prob[start + k]));
      item.dataset.p = String(prob[start + k]);
      item.title = `token id ${this.h.tokens.ids[index[start + k]]}`;
      out.push(item);
    }
    return out;
  }
}

async function main() {
  const status = document.getElementById("status");
  try {
    const [plotly, data] = await Promise.all([inflate("plotly-js"), inflate("run-data")]);
    runScript(new TextDecoder().decode(plotly));
    performance.mark("explorer-plotly-loaded");  // benchmarks/explorer_page.py reads it
    const app = new Explorer(unpack(data));
    document.getElementById("app").hidden = false;
    app.setUp();
    await app.update();
    app.heatmap.on("plotly_click", (event) => {
      const point = event.points[0];
      app.select(point.y, point.x);
    });
    status.hidden = true;
    window.explorerReady = performance.now();
  } catch (error) {
    status.textContent = `The explorer could not start: ${error.message}`;
    status.className = "notice";
    throw error;
  }
}

main();
