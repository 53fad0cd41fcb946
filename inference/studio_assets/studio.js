// The studio page: key, create (text-to-image and edits, adapters, base-vs-adapter), results and history.
// Batch and Runs live in their own modules; every request goes through api.js.

import { ApiError, asCurl, call, capabilities, json, key, randomSeed, watchQueue } from "./api.js";
import { setupBatch } from "./batch.js";
import { edit, imagesBase64, maskBase64, setupEditor } from "./editor.js";
import { setupRuns, showRuns } from "./runs.js";
import { $, beforeAfter, copyText, download, el, setState, setupTabs, showAlert } from "./ui.js";

const EXT = { png: "png", jpeg: "jpg", webp: "webp" };
const NARROW = matchMedia("(max-width: 760px)"); // studio.css stacks the results under the form below this width
const history = [];
let caps = null;
let adapters = [];
let busy = false;
let keyEnv; // the variable the server reads its keys from, for "Copy as curl"
let showTab = () => {};

async function start() {
  showTab = setupTabs((name) => {
    showAlert(""); // a message belongs to the section it came from
    setState("");
    if (name === "runs" && key.get()) showRuns();
  });
  setupEditor();
  setupRuns({ tryAdapter });
  setupBatch({ settings: batchSettings, onResult: (r) => addHistory(r) });
  $("key-form").addEventListener("submit", (ev) => { ev.preventDefault(); useKey($("api-key").value.trim()); });
  $("key-forget").addEventListener("click", () => { key.clear(); $("api-key").value = ""; renderAdapters([]); setState("Key forgotten."); });
  for (const radio of document.querySelectorAll('input[name="mode"]')) radio.addEventListener("change", applyMode);
  $("negative").addEventListener("input", applyGuidance);
  $("gen-form").addEventListener("submit", (ev) => { ev.preventDefault(); generate(); });
  $("compare").addEventListener("click", compare);
  $("seed-random").addEventListener("click", () => { $("seed").value = ""; setState("A new random seed for each image."); });
  $("layers").addEventListener("click", downloadLayers);
  caps = await capabilities();
  // The service's limits, and the form's defaults within them: 40 steps under a max_steps of 10 kept Generate off.
  for (const [id, max] of [["steps", caps.maxSteps], ["guidance", caps.maxGuidance]]) {
    $(id).max = max;
    if (Number($(id).value) > max) $(id).value = max;
  }
  $("aspect").replaceChildren(...caps.aspects.map((a) => el("option", { value: a }, a)));
  if (caps.layers) {
    $("layers-format").replaceChildren(...caps.layers.formats.map((f) => el("option", { value: f }, f.toUpperCase())));
  }
  applyMode();
  applyGuidance();
  if (key.get()) useKey(key.get());
  else $("api-key").focus();
}

async function useKey(value) {
  if (!value) return showAlert("Enter an API key.");
  key.set(value);
  $("api-key").value = value;
  try {
    const answer = await json("/v1/adapters");
    showAlert("");
    renderAdapters(answer.adapters);
    keyEnv = answer.api_keys_env;
    setState(`Connected: ${answer.adapters.length} adapter(s) available.`);
    if ($("tab-runs").getAttribute("aria-selected") === "true") showRuns();
  } catch (e) {
    if (e.status === 401) key.clear();
    showAlert(e.message);
    $("api-key").focus();
  }
}

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

function applyMode() {
  const editing = mode() === "edit";
  $("edit-inputs").hidden = !editing;
  $("aspect-box").hidden = editing; // edits come back at the input's size
  $("prompt-label").textContent = editing ? "Instruction" : "Prompt";
  $("mask-tools").hidden = !(editing && caps?.mask);
  $("layers-box").hidden = !(editing && caps?.layers);
}

// Guidance steers away from the negative prompt; without one the server runs none, so the field is off.
function applyGuidance() {
  const on = Boolean($("negative").value.trim());
  $("guidance").disabled = !on;
  $("guidance-note").hidden = on;
}

// ------------------------------------------------------------------------------------------ adapters

function renderAdapters(list) {
  adapters = list;
  const items = list.map((a) => {
    const id = `w-${a.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
    // The service's whole range: from 0 up, a weight configured below 0 showed (and was sent) as off.
    const range = el("input", { type: "range", id, min: -caps.maxWeight, max: caps.maxWeight, step: 0.05, value: a.weight });
    const out = el("output", { for: id }, Number(a.weight).toFixed(2));
    const update = () => {
      out.textContent = Number(range.value).toFixed(2);
      range.setAttribute("aria-valuetext", Number(range.value) === 0 ? "off" : `weight ${range.value}`);
    };
    range.addEventListener("input", update);
    update();
    a.input = range;
    return el("li", {}, el("label", { for: id }, a.name), range, out, a.run ? el("span", { className: "note" }, `run ${a.run}`) : null);
  });
  $("adapter-list").replaceChildren(...(items.length ? items : [el("li", { className: "note" }, "No adapters: the base model only.")]));
}

function selectedLoras() {
  return adapters.filter((a) => Number(a.input.value) !== 0).map((a) => ({ name: a.name, weight: Number(a.input.value) }));
}

function tryAdapter(name) {
  // Off: on at its configured weight (a negative one stays negative), else 1; on: left as it is.
  for (const a of adapters) if (a.name === name && Number(a.input.value) === 0) a.input.value = a.weight || 1;
  adapters.forEach((a) => a.input.dispatchEvent(new Event("input")));
  showTab("create");
  adapters.find((a) => a.name === name)?.input.focus();
}

// ------------------------------------------------------------------------------------------ requests

// The request as sent, which is also what "Exact settings" records: so only settings that act are in it.
function settings() {
  const body = { prompt: $("prompt").value.trim(), num_inference_steps: Number($("steps").value),
    output_format: $("format").value, loras: selectedLoras() };
  if ($("negative").value.trim()) {
    body.negative_prompt = $("negative").value.trim();
    body.guidance_scale = Number($("guidance").value);
  }
  if (mode() === "t2i") body.aspect_ratio = $("aspect").value;
  return body;
}

function batchSettings() {
  const { prompt, aspect_ratio, ...rest } = settings();
  return { ...rest, seed: typedSeed() };
}

// The seed field as typed (null when blank: random). Variations count up from a typed seed.
function typedSeed() {
  const field = $("seed");
  const seed = field.value.trim() === "" ? null : Number(field.value);
  if (field.validity.badInput || (seed !== null && !(Number.isSafeInteger(seed) && seed >= 0))) {
    throw new ApiError(0, `Seed: a whole number from 0 to ${Number.MAX_SAFE_INTEGER}, or blank for a random one.`);
  }
  return seed;
}

function nextSeed(i) {
  const seed = typedSeed();
  return seed === null ? randomSeed() : seed + i;
}

async function requestBody() {
  const body = settings();
  if (!body.prompt) throw new ApiError(0, mode() === "edit" ? "Write an instruction for the edit." : "Write a prompt.");
  if (mode() === "edit") {
    if (!edit.files.length) throw new ApiError(0, "Choose 1 to 10 images to edit.");
    body.image = await imagesBase64();
    const mask = caps.mask ? await maskBase64() : null;
    if (mask) Object.assign(body, { mask, mask_feather: Number($("mask-feather").value) });
  }
  return body;
}

async function send(path, body, names) {
  const started = performance.now();
  const response = await watchQueue(call(path, { method: "POST", body, names }), setState);
  const blob = await response.blob();
  return { blob, seconds: (performance.now() - started) / 1000, seed: Number(response.headers.get("x-seed") ?? body.seed) };
}

async function guarded(work) {
  if (busy) return;
  busy = true;
  showAlert("");
  document.querySelectorAll("#gen-form button").forEach((b) => { b.disabled = true; });
  try {
    await work();
    setState("Done.");
  } catch (e) {
    setState("");
    showAlert(e.message);
    if (e.status === 401) $("api-key").focus();
  } finally {
    busy = false;
    document.querySelectorAll("#gen-form button").forEach((b) => { b.disabled = false; });
  }
}

function generate() {
  return guarded(async () => {
    const base = await requestBody();
    const names = edit.files.map((f) => f.name);
    const before = mode() === "edit" ? edit.urls[edit.urls.length - 1] : null;
    const count = Math.min(Math.max(Number($("variations").value) || 1, 1), 8);
    for (let i = 0; i < count; i++) {
      const body = { ...base, seed: nextSeed(i) };
      const { blob, seconds, seed } = await send("/v1/images", body, names);
      addResult({ body, names, blob, seed, seconds, before, mode: mode() });
    }
  });
}

// The same seed and settings twice: without adapters and with the chosen ones, shown side by side.
function compare() {
  return guarded(async () => {
    const loras = selectedLoras();
    if (!loras.length) throw new ApiError(0, "Give at least one adapter a weight above 0 to compare with the base model.");
    const body = { ...(await requestBody()), seed: nextSeed(0) };
    const names = edit.files.map((f) => f.name);
    const base = await send("/v1/images", { ...body, loras: [] }, names);
    const tuned = await send("/v1/images", body, names);
    const label = loras.map((l) => `${l.name} ${l.weight}`).join(", ");
    const pair = [addResult({ body: { ...body, loras: [] }, names, ...base, mode: mode(), pairLabel: "Base model" }, false),
      addResult({ body, names, ...tuned, mode: mode(), pairLabel: `With ${label}` }, false)];
    const row = el("li", { className: "pair-row" }, el("h3", {}, `Base vs ${label} (seed ${body.seed})`),
      el("ul", { className: "cards pair" }, ...pair.map((r) => card(r, false))));
    $("results").prepend(row);
    reveal(row);
  });
}

function downloadLayers() {
  return guarded(async () => {
    if (!edit.files.length) throw new ApiError(0, "Choose the image to split into layers.");
    const fields = caps.layers.fields;
    // The page's settings as Generate sends them: without them the server used every adapter at its configured
    // weight (sliders at 0 included), its default steps and a seed of its own.
    const { output_format, aspect_ratio, ...sampling } = settings();
    const body = Object.fromEntries(Object.entries({ ...sampling, seed: nextSeed(0) }).filter(([k, v]) => fields.includes(k) && v !== ""));
    const images = await imagesBase64();
    body.image = images[images.length - 1];
    const mask = caps.mask ? await maskBase64() : null;
    if (mask && fields.includes("mask")) Object.assign(body, { mask, mask_feather: Number($("mask-feather").value) });
    const format = $("layers-format").value;
    if (caps.layers.formatField) body[caps.layers.formatField] = format;
    const { blob, seed } = await send("/v1/layers", body, edit.files.slice(-1).map((f) => f.name));
    download(blob, `layers-seed${seed}.${format || "zip"}`);
  });
}

// ------------------------------------------------------------------------------------------ results

function addResult(result, show = true) {
  result.id = history.length + 1;
  result.url = URL.createObjectURL(result.blob);
  result.file = `result-${result.id}-seed${result.seed}.${EXT[result.body.output_format] || "png"}`;
  addHistory(result);
  if (show) reveal($("results").insertBefore(card(result, false), $("results").firstChild));
  setState(`Result ${result.id} ready (seed ${result.seed}, ${result.seconds.toFixed(1)} s).`);
  return result;
}

// On a phone the results sit below the long form, out of sight: bring the new one into view.
function reveal(node) {
  if (NARROW.matches) node.scrollIntoView({ block: "start" });
}

function addHistory(result) {
  if (!result.id) {
    result.id = history.length + 1;
    result.url = result.url || URL.createObjectURL(result.blob);
  }
  history.push(result);
  $("history").prepend(card(result, true));
}

function describeBody(body, names, maskName) {
  const { image, mask, ...rest } = body;
  if (image) rest.image = names.length ? names : `${[].concat(image).length} image(s)`;
  if (mask) rest.mask = maskName || "painted mask";
  return rest;
}

function card(r, detailed) {
  const label = `${r.pairLabel ? `${r.pairLabel}: ` : ""}${r.body.prompt} (seed ${r.seed})`;
  const picture = r.before ? beforeAfter(r.before, r.url, label) : el("img", { src: r.url, alt: `Result ${r.id}: ${label}` });
  const reuse = () => {
    $("seed").value = r.seed;
    showTab("create");
    $("seed").focus();
    setState(`Seed ${r.seed} set: the next images use it.`);
  };
  const buttons = el("div", { className: "actions" },
    el("button", { type: "button", onclick: () => download(r.blob, r.file) }, "Download"),
    el("button", { type: "button", onclick: reuse }, "Reuse this seed"),
    el("button", { type: "button", onclick: () => copyText(asCurl(r.path || "/v1/images", r.body, r.file, keyEnv), "the curl command") }, "Copy as curl"),
    el("button", { type: "button", onclick: () => copyText(JSON.stringify(r.body, null, 2), "the request JSON") }, "Copy as JSON"));
  const adapterText = r.body.loras?.length ? r.body.loras.map((l) => `${l.name} ${l.weight}`).join(", ") : "none (base model)";
  const caption = el("figcaption", {},
    el("strong", {}, `#${r.id} ${r.pairLabel || (r.mode === "edit" ? "Edit" : "Text to image")}`), " ",
    el("span", { className: "prompt" }, r.body.prompt),
    el("span", { className: "note" }, ` seed ${r.seed} · adapters: ${adapterText}${r.seconds ? ` · ${r.seconds.toFixed(1)} s` : ""}`));
  const settingsList = detailed
    ? el("details", {}, el("summary", {}, "Exact settings"), el("pre", {}, JSON.stringify(describeBody(r.body, r.names || [], r.maskName), null, 2)))
    : null;
  return el("li", { className: "card" }, el("figure", {}, picture, caption), buttons, settingsList);
}

start();
