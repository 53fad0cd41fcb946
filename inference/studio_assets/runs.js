// Runs (read-only): the training run folders under serve.runs_dir, each with its loss curve, validation samples by
// step, model card and evaluation report, and a way to try the run's adapter when the service has it loaded.

import { call, json } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { $, download, el, showAlert, svg } from "./ui.js";

let options;
let adapters = [];

export function setupRuns(opts) {
  options = opts;
}

export async function showRuns() {
  try {
    const [answer, loaded] = await Promise.all([json("/v1/runs"), json("/v1/adapters")]);
    adapters = loaded.adapters;
    const list = $("run-list");
    if (!answer.configured) return list.replaceChildren(el("li", { className: "note" }, "The service has no serve.runs_dir."));
    if (!answer.runs.length) return list.replaceChildren(el("li", { className: "note" }, "No run folders yet."));
    list.replaceChildren(...answer.runs.map((r) => el("li", {},
      el("button", { type: "button", onclick: () => showRun(r.name) }, r.name),
      el("span", { className: "note" }, ` ${new Date(r.modified * 1000).toLocaleString()}`),
      r.progress ? el("span", { className: `note run-state ${r.progress.state}` }, progressText(r.progress)) : null)));
  } catch (e) {
    showAlert(e.message);
  }
}

async function blobUrl(run, path) {
  const response = await call(`/v1/runs/${encodeURIComponent(run)}/files/${path.split("/").map(encodeURIComponent).join("/")}`);
  return URL.createObjectURL(await response.blob());
}

async function showRun(name) {
  const box = $("run-detail");
  let run;
  try {
    run = await json(`/v1/runs/${encodeURIComponent(name)}`);
  } catch (e) {
    return showAlert(e.message);
  }
  const heading = el("h2", { tabindex: -1 }, `Run ${run.name}`);
  const parts = [heading];
  const meta = run.metadata || {};
  if (run.progress && run.progress.state !== "finished") parts.push(el("p", { className: `run-state ${run.progress.state}` }, progressDetail(run.progress)));
  else if (meta.steps !== undefined) {
    parts.push(el("p", {}, `${meta.steps} steps; loss ${fmt(meta.first_loss)} (first 10) → ${fmt(meta.final_loss)} (last 10).`));
  }
  for (const a of adapters.filter((x) => x.run === run.name)) {
    parts.push(el("button", { type: "button", onclick: () => options.tryAdapter(a.name) }, `Try adapter “${a.name}”`));
  }
  parts.push(el("h3", {}, "Loss"), run.losses.length ? lossChart(run.losses) : el("p", { className: "note" }, "No losses.jsonl yet."));
  parts.push(el("h3", {}, "Validation samples"), await samples(run));
  parts.push(el("h3", {}, "Evaluation report"), await report(run));
  if (run.card_text !== null && run.card_text !== undefined) { // the card with this machine's paths shortened
    parts.push(el("h3", {}, "Model card"), el("div", { className: "card-text" }, ...renderMarkdown(run.card_text)));
  }
  box.replaceChildren(...parts);
  heading.focus();
}

const count = (n) => Number(n).toLocaleString("en");
const ofTarget = (p) => `step ${count(p.step)}${p.max_steps ? ` of ${count(p.max_steps)}` : ""}`;

// The server tells finished, training (a trainer holds the folder) and interrupted (neither) apart.
function progressText(p) {
  if (p.state === "finished") return ` finished, ${count(p.step)} steps`;
  if (p.state === "training") return ` training: ${ofTarget(p)}`;
  if (p.state === "interrupted") return ` interrupted at ${ofTarget(p)}`;
  return ` not finished: ${ofTarget(p)}`;
}

function progressDetail(p) {
  const resume = p.checkpoint
    ? ` Its last checkpoint is step ${count(p.checkpoint)}: train again with --resume latest to continue from there.`
    : " It saved no checkpoint, so training again starts from step 0.";
  if (p.state === "training") return `Training: ${ofTarget(p)} so far.`;
  if (p.state === "interrupted") return `Interrupted at ${ofTarget(p)}.${resume}`;
  return `Not finished: ${ofTarget(p)} (still training, or interrupted).${resume}`;
}

function fmt(x) {
  return typeof x === "number" ? x.toFixed(4) : "–";
}

// An SVG line (no script, no inline style): steps on x, loss on y, with a text summary for screen readers.
export function lossChart(points) {
  const W = 600, H = 220, P = 40, L = 64; // L: room for the loss labels left of the axis
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const [x0, x1, y0, y1] = [Math.min(...xs), Math.max(...xs), Math.min(...ys), Math.max(...ys)];
  const sx = (x) => L + ((x - x0) / (x1 - x0 || 1)) * (W - L - P);
  const sy = (y) => H - P - ((y - y0) / (y1 - y0 || 1)) * (H - 2 * P);
  const line = points.map((p) => `${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join(" ");
  const summary = `Loss over ${points.length} logged steps: ${fmt(ys[0])} at step ${xs[0]}, ` +
    `${fmt(ys[ys.length - 1])} at step ${xs[xs.length - 1]}; lowest ${fmt(y0)}.`;
  return el("figure", { className: "chart" },
    svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": summary },
      svg("line", { x1: L, y1: H - P, x2: W - P, y2: H - P, class: "axis" }),
      svg("line", { x1: L, y1: P, x2: L, y2: H - P, class: "axis" }),
      svg("text", { x: L - 6, y: P + 4, class: "tick end" }, fmt(y1)),
      svg("text", { x: L - 6, y: H - P, class: "tick end" }, fmt(y0)),
      svg("text", { x: L, y: H - P + 16, class: "tick" }, `step ${x0}`),
      svg("text", { x: W - P, y: H - P + 16, class: "tick end" }, `step ${x1}`),
      svg("polyline", { points: line, class: "loss" })),
    el("figcaption", { className: "note" }, summary));
}

async function samples(run) {
  if (!run.samples.length) return el("p", { className: "note" }, "No validation samples.");
  const select = el("select", { id: "sample-step" },
    ...run.samples.map((s, i) => el("option", { value: i }, `step ${s.step}`)));
  const grid = el("div", { className: "sample-grid", "aria-live": "polite" });
  const show = async () => {
    const entry = run.samples[Number(select.value)];
    const images = await Promise.all(entry.files.map(async (f) => el("figure", {},
      el("img", { src: await blobUrl(run.name, f), alt: `${f.split("/").pop()} at step ${entry.step}` }),
      el("figcaption", {}, f.split("/").pop()))));
    grid.replaceChildren(...images);
  };
  select.value = String(run.samples.length - 1);
  select.addEventListener("change", show);
  await show();
  return el("div", {}, el("label", { for: "sample-step" }, "Step "), select, grid);
}

async function report(run) {
  if (!run.report_json) return el("p", { className: "note" }, "No evaluation report (run `qwen-lora eval`).");
  const data = await json(`/v1/runs/${encodeURIComponent(run.name)}/files/${run.report_json}`);
  const variants = data.variants || [];
  const rows = Object.entries(data.metrics || {}).map(([, m]) => el("tr", {},
    el("th", { scope: "row" }, `${m.label}${m.higher_is_better ? " ↑" : " ↓"}`),
    ...variants.map((v) => {
      const x = m.variants?.[v];
      return el("td", {}, x && x.mean !== null ? `${fmt(x.mean)} [${fmt(x.low)}, ${fmt(x.high)}]` : "–");
    })));
  const verdicts = Object.values(data.verdicts || {}).map((v) => el("li", {}, v.line));
  const parts = [verdicts.length ? el("ul", { className: "verdicts" }, ...verdicts) : null,
    el("table", {}, el("caption", {}, "Means with 95% intervals"),
    el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"), ...variants.map((v) => el("th", { scope: "col" }, v)))),
    el("tbody", {}, ...rows))];
  if (data.best_checkpoint) parts.push(el("p", {}, `Best checkpoint by held-out loss: ${data.best_checkpoint}`));
  if (run.report_html) {
    parts.push(el("button", { type: "button", onclick: async () => {
      const response = await call(`/v1/runs/${encodeURIComponent(run.name)}/files/${run.report_html}`);
      download(await response.blob(), `${run.name}-report.html`);
    } }, "Download the full report (HTML)"));
  }
  return el("div", {}, ...parts);
}
