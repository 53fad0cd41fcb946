// Batch: images (or a folder) + one instruction, a CSV naming images, or a JSONL of jobs (the API's fields, or the
// `qwen-lora batch` job format). One request at a time through the same API; a full queue is waited out for its
// Retry-After; failures can be retried; the results download as a ZIP with a manifest.json.

import { blobToBase64, call, randomSeed, watchQueue } from "./api.js";
import { ACCEPTED, isImage, notImages } from "./editor.js";
import { $, el, download, showAlert } from "./ui.js";
import { zip } from "./zip.js";

const EXT = { png: "png", jpeg: "jpg", webp: "webp" };
const FORMAT_OF = { png: "png", jpg: "jpeg", jpeg: "jpeg", webp: "webp" }; // `qwen-lora batch`'s rule: by extension
const FIELDS = ["prompt", "negative_prompt", "num_inference_steps", "guidance_scale", "seed", "width", "height",
  "aspect_ratio", "output_format", "quality", "loras", "mask_feather"];
// Named files, URLs or the job's name (not sent as they are), and an API line's response_format (the page always
// takes the image itself, as "bytes" gives it)
const REFS = ["id", "image", "images", "mask", "output", "response_format"];
const CSV_COLUMNS = ["image", "prompt", "seed", "id", "mask"];
let jobs = [];
let stopping = false;
let running = false;
let hooks;

export function setupBatch(options) {
  hooks = options;
  $("batch-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const files = [...$("batch-files").files, ...$("batch-folder").files];
    if (!files.length) return showAlert("Choose images, a folder, a CSV or a JSONL file for the batch.");
    let defaults;
    try {
      defaults = hooks.settings();
    } catch (e) {
      return showAlert(e.message); // e.g. a seed that is not a whole number
    }
    jobs = await readJobs(files, $("batch-prompt").value.trim(), defaults);
    render();
    run();
  });
  $("batch-stop").addEventListener("click", () => { stopping = true; });
  $("batch-retry").addEventListener("click", () => {
    jobs.filter((j) => j.status === "failed" && !j.invalid).forEach((j) => { j.status = "pending"; j.error = ""; });
    render();
    run();
  });
  $("batch-zip").addEventListener("click", downloadZip);
}

async function readJobs(files, instruction, defaults) {
  const images = new Map(), unreadable = [];
  for (const file of files.filter((f) => ACCEPTED.includes(f.type))) { // one at a time: a folder may hold hundreds
    if (await isImage(file)) images.set(file.name, file);
    else unreadable.push(file.name);
  }
  const tables = files.filter((f) => /\.(csv|jsonl)$/i.test(f.name));
  const skipped = files.filter((f) => !ACCEPTED.includes(f.type) && !tables.includes(f)).map((f) => f.name);
  showAlert([unreadable.length ? `Skipped: ${notImages(unreadable)}` : "",
    skipped.length ? `Skipped (not a JPEG/PNG/WebP image, CSV or JSONL): ${skipped.join(", ")}.` : ""].filter(Boolean).join(" "));
  const out = [];
  const add = (id, fields, refs, where) => out.push(makeJob(id, fields, refs, images, instruction, defaults, where));
  for (const table of tables) {
    const text = await table.text();
    if (/\.jsonl$/i.test(table.name)) {
      text.split(/\r?\n/).forEach((line, i) => {
        if (!line.trim()) return;
        let row;
        try {
          row = JSON.parse(line);
        } catch (e) {
          row = null;
        }
        const where = `${table.name}:${i + 1}`;
        if (!row || typeof row !== "object" || Array.isArray(row)) return add(where, {}, [], `${where}: not a JSON object`);
        // A misspelt field was dropped without a word (the API and `qwen-lora batch` refuse it), and a mask with it.
        const unknown = Object.keys(row).filter((k) => !FIELDS.includes(k) && !REFS.includes(k));
        const id = row.id ?? (typeof row.output === "string" ? row.output.replace(/\.[^.]+$/, "") : where);
        // A batch line's output is the file's name and its format, as `qwen-lora batch` reads it (sku.webp was
        // rendered as a PNG, and named after the job's id).
        const badOutput = row.output === undefined ? null : outputProblem(row);
        if (row.output !== undefined && !badOutput) {
          row.output = row.output.normalize("NFC");
          row.output_format = formatOf(row.output);
        }
        add(id, row, [].concat(row.image ?? row.images ?? []), (badOutput && `${where}: ${badOutput}`) ||
          (unknown.length ? `${where}: unknown field(s) ${unknown.join(", ")}; a job takes ${[...FIELDS, ...REFS].join(", ")}` : null));
      });
    } else {
      const rows = parseCsv(text);
      const header = (rows.shift() || []).map((h) => h.trim().toLowerCase());
      if (!header.includes("image")) { showAlert(`${table.name}: the first row must name an “image” column.`); continue; }
      const unknown = header.filter((h) => !CSV_COLUMNS.includes(h));
      if (unknown.length) { showAlert(`${table.name}: unknown column(s) ${unknown.join(", ")}; the columns are ${CSV_COLUMNS.join(", ")}.`); continue; }
      rows.forEach((r, i) => {
        if (!r.some((c) => c.trim())) return;
        const row = Object.fromEntries(header.map((h, k) => [h, (r[k] ?? "").trim()]));
        const where = `${table.name}:${i + 2}`;
        const fields = { ...(row.prompt ? { prompt: row.prompt } : {}), ...(row.mask ? { mask: row.mask } : {}) };
        const seed = Number(row.seed); // "12x" was NaN, sent as null: a random seed where the row named one
        if (row.seed) fields.seed = seed;
        const bad = row.seed && !(Number.isSafeInteger(seed) && seed >= 0) ? `${where}: seed “${row.seed}” is not a whole number` : null;
        add(row.id || row.image.replace(/\.[^.]+$/, "") || where, fields, [row.image], bad);
      });
    }
  }
  if (!tables.length) for (const [name, file] of images) add(name.replace(/\.[^.]+$/, ""), {}, [file.name], null);
  const seen = new Set(), outputs = new Set(); // case-blind: one file on macOS and Windows, where a ZIP is extracted
  for (const job of out) { // ids name the files in the ZIP unless a line names its output: safe and unique
    let id = safeName(job.id);
    while (seen.has(id.toLowerCase())) id += "_";
    seen.add(id.toLowerCase());
    job.id = id;
    if (job.output && outputs.has(job.output.toLowerCase()) && !job.invalid) {
      job.invalid = `output “${job.output}” is another job's too`; // `qwen-lora batch` refuses it
      Object.assign(job, { status: "failed", error: job.invalid });
    }
    if (job.output) outputs.add(job.output.toLowerCase());
  }
  return out;
}

// The output format a file name's extension names (undefined for another extension).
const formatOf = (name) => FORMAT_OF[(name.match(/\.([^.]+)$/)?.[1] || "").toLowerCase()];

// Why a batch line's `output` cannot name its file, or null: the rule of `qwen-lora batch`.
function outputProblem(row) {
  if (typeof row.output !== "string" || /[\\/]/.test(row.output) || !/^[\p{L}\p{N}]/u.test(row.output)) {
    return `output ${JSON.stringify(row.output)} must be a plain file name, a letter or digit first`;
  }
  const format = formatOf(row.output);
  if (!format) return `output “${row.output}”: use .png, .jpg or .webp`;
  if (row.output_format && row.output_format !== format) {
    return `output “${row.output}” and output_format “${row.output_format}” name two formats; give one`;
  }
  return null;
}

// A job's name as a file name in the ZIP: NFC, letters with their marks, digits, '.', '_', '-', a letter or digit
// first, and room for its extension in a file name's 255 bytes (as `qwen-lora batch`'s names).
function safeName(text) {
  let name = String(text).normalize("NFC").replace(/[^\p{L}\p{M}\p{N}._-]+/gu, "_").replace(/^[^\p{L}\p{N}]+/u, "");
  const bytes = new TextEncoder();
  while (bytes.encode(name).length > 200) name = [...name].slice(0, -1).join("");
  return name || "job";
}

function makeJob(id, row, refs, images, instruction, defaults, invalid) {
  const fields = Object.fromEntries(Object.entries(row).filter(([k, v]) => FIELDS.includes(k) && v !== null));
  if (fields.loras && !Array.isArray(fields.loras)) { // the CLI batch format: {"name": weight}
    fields.loras = Object.entries(fields.loras).map(([name, weight]) => ({ name, weight }));
  }
  const body = { ...defaults, ...fields };
  if (body.seed === null || body.seed === undefined) body.seed = randomSeed();
  if (!body.prompt) body.prompt = instruction;
  const output = typeof row.output === "string" && !invalid ? row.output : null;
  const job = { id, body, output, refs: [], names: [], mask: null, status: "pending", error: "", invalid };
  const resolve = (ref, what) => { // a URL or data: URL as it is, else one of the chosen files by name
    const name = String(ref);
    if (/^(https?:|data:)/.test(name)) return [name, name.slice(0, 60)];
    const file = images.get(name.split(/[\\/]/).pop());
    if (!file) job.invalid = job.invalid || `${what} “${name}” is not among the chosen files`;
    return file ? [file, file.name] : [null, null];
  };
  for (const ref of refs) {
    const [found, name] = resolve(ref, "image");
    if (found) { job.refs.push(found); job.names.push(name); }
  }
  if (row.mask) { // a masked edit sent without its mask changed the pixels it was to keep
    [job.mask] = resolve(row.mask, "mask");
    if (!refs.length) job.invalid = job.invalid || "a mask applies to an edit: give the job an image";
  }
  if (!body.prompt) job.invalid = job.invalid || "no prompt: write an instruction for the batch";
  if (job.invalid) Object.assign(job, { status: "failed", error: job.invalid });
  return job;
}

// RFC 4180 CSV: quoted fields, doubled quotes, commas and newlines inside quotes.
export function parseCsv(text) {
  const rows = [[]];
  let field = "", quoted = false;
  for (let i = 0; i < text.length; i++) {
    const c = text[i];
    if (quoted) {
      if (c === '"' && text[i + 1] === '"') { field += '"'; i++; } else if (c === '"') quoted = false; else field += c;
    } else if (c === '"') quoted = true;
    else if (c === ",") { rows[rows.length - 1].push(field); field = ""; }
    else if (c === "\n" || c === "\r") {
      if (c === "\r" && text[i + 1] === "\n") i++;
      rows[rows.length - 1].push(field); field = ""; rows.push([]);
    } else field += c;
  }
  rows[rows.length - 1].push(field);
  return rows;
}

async function run() {
  if (running) return;
  running = true;
  stopping = false;
  $("batch-stop").disabled = false;
  $("batch-start").disabled = $("batch-retry").disabled = true;
  for (const job of jobs) {
    if (stopping) break;
    if (job.status !== "pending") continue;
    await runJob(job);
    render();
  }
  running = false;
  $("batch-stop").disabled = true;
  $("batch-start").disabled = false;
  render();
}

// A job is pending, running (`note` says queued, generating or waiting out a full queue), done or failed.
async function runJob(job) {
  const setStatus = (text) => { Object.assign(job, { status: "running", note: text }); render(); };
  try {
    const body = { ...job.body };
    const encoded = (r) => (typeof r === "string" ? r : blobToBase64(r));
    if (job.refs.length) body.image = await Promise.all(job.refs.map(encoded));
    if (job.mask) body.mask = await encoded(job.mask);
    for (;;) {
      try {
        const started = performance.now();
        const response = await watchQueue(call("/v1/images", { method: "POST", body, names: job.names }), setStatus);
        job.blob = await response.blob();
        job.seed = Number(response.headers.get("x-seed") ?? body.seed);
        job.file = job.output || `${job.id}.${EXT[body.output_format] || "png"}`;
        Object.assign(job, { status: "done", error: "" });
        hooks.onResult({ body, names: job.names, maskName: maskName(job), blob: job.blob, seed: job.seed, mode: job.refs.length ? "edit" : "t2i",
          seconds: (performance.now() - started) / 1000 });
        return;
      } catch (e) {
        if (e.status !== 429 || stopping) throw e;
        setStatus(`Queue full: retrying in ${e.retryAfter || 1} s…`);
        await new Promise((resolve) => setTimeout(resolve, 1000 * (e.retryAfter || 1)));
      }
    }
  } catch (e) {
    Object.assign(job, { status: "failed", error: e.message });
  }
}

function maskName(job) {
  return job.mask ? job.mask.name ?? String(job.mask).slice(0, 60) : undefined;
}

function render() {
  const done = jobs.filter((j) => j.status === "done").length;
  const failed = jobs.filter((j) => j.status === "failed").length;
  $("batch-progress").max = Math.max(jobs.length, 1);
  $("batch-progress").value = done + failed;
  $("batch-summary").textContent = `${done} of ${jobs.length} done, ${failed} failed.`;
  $("batch-retry").disabled = running || !jobs.some((j) => j.status === "failed" && !j.invalid);
  $("batch-zip").disabled = !jobs.some((j) => j.status === "done");
  $("batch-jobs").replaceChildren(...jobs.map((job) => el("tr", { className: job.status === "failed" ? "failed" : "" },
    el("th", { scope: "row" }, job.id),
    el("td", {}, job.status === "failed" ? `Failed: ${job.error}` : job.status === "running" ? job.note : job.status),
    el("td", {}, job.blob ? el("img", { src: (job.url ||= URL.createObjectURL(job.blob)), alt: `Result of ${job.id}`, className: "mini" }) : ""),
    el("td", {}, job.status === "failed" && !job.invalid
      ? el("button", { type: "button", onclick: () => { job.status = "pending"; render(); run(); } }, `Retry ${job.id}`) : ""))));
}

async function downloadZip() {
  const files = [];
  const manifest = { created: new Date().toISOString(), jobs: [] };
  for (const job of jobs) {
    const { image, mask, ...request } = job.body;
    if (job.refs.length) request.image = job.names;
    if (job.mask) request.mask = maskName(job);
    // A ZIP taken mid-run records each job as it stands: running and pending jobs are not failures.
    manifest.jobs.push({ id: job.id, status: job.status, file: job.file || null,
      error: job.status === "failed" ? job.error : null, seed: job.seed ?? job.body.seed, request });
    if (job.blob) files.push({ name: job.file, data: new Uint8Array(await job.blob.arrayBuffer()) });
  }
  files.push({ name: "manifest.json", data: new TextEncoder().encode(JSON.stringify(manifest, null, 2)) });
  download(zip(files), "batch.zip");
}
