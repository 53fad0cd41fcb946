// The images to edit (pick or drop 1..10 JPEG/PNG/WebP) and, when the server has masked edits, a mask painted
// over the last image (the one edited) or uploaded. The mask is kept at the image's own size: white = may change.

import { blobToBase64 } from "./api.js";
import { $, el, showAlert } from "./ui.js";

export const ACCEPTED = ["image/jpeg", "image/png", "image/webp"];
export const MAX_IMAGES = 10;
const PAINT = "rgba(255, 64, 64, 0.55)";

export const edit = { files: [], urls: [], painted: false };
let canvas, ctx, drawing = false, last = null;

export function setupEditor() {
  const input = $("edit-files");
  input.addEventListener("change", () => { addFiles([...input.files]); input.value = ""; });
  const zone = $("drop-zone");
  zone.addEventListener("dragover", (ev) => { ev.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (ev) => {
    ev.preventDefault();
    zone.classList.remove("over");
    addFiles([...ev.dataTransfer.files]);
  });
  canvas = $("mask-canvas");
  ctx = canvas.getContext("2d");
  canvas.addEventListener("pointerdown", (ev) => { drawing = true; last = null; canvas.setPointerCapture(ev.pointerId); paint(ev); });
  canvas.addEventListener("pointermove", (ev) => { if (drawing) paint(ev); });
  canvas.addEventListener("pointerup", () => { drawing = false; });
  $("mask-clear").addEventListener("click", clearMask);
  $("mask-file").addEventListener("change", async () => {
    const file = $("mask-file").files[0];
    $("mask-file").value = "";
    if (file) await loadMask(file);
  });
}

// The browser's file type comes from the name alone; decoding the file is what tells a picture from a renamed text
// file. The server still checks the bytes (it reads fewer formats than a browser does).
export async function isImage(file) {
  try {
    (await createImageBitmap(file)).close();
    return true;
  } catch (e) {
    return false;
  }
}

export function notImages(names) {
  return names.length === 1 ? `${names[0]} is not an image.` : `${names.join(", ")} are not images.`;
}

// Files of another type, or that do not decode, are refused here, by name.
export async function addFiles(files) {
  const wrongType = files.filter((f) => !ACCEPTED.includes(f.type)).map((f) => f.name);
  const ok = [], unreadable = [];
  for (const file of files.filter((f) => ACCEPTED.includes(f.type))) (await isImage(file) ? ok : unreadable).push(file);
  const room = MAX_IMAGES - edit.files.length; // after the awaits: another pick may have added files meanwhile
  const messages = [];
  if (unreadable.length) messages.push(notImages(unreadable.map((f) => f.name)));
  if (wrongType.length) messages.push(`Not a JPEG, PNG or WebP image: ${wrongType.join(", ")}.`);
  if (ok.length > room) messages.push(`An edit takes at most ${MAX_IMAGES} images; ${ok.length - room} left out.`);
  showAlert(messages.join(" "));
  for (const file of ok.slice(0, Math.max(room, 0))) {
    edit.files.push(file);
    edit.urls.push(URL.createObjectURL(file));
  }
  renderThumbs();
}

function removeAt(i) {
  URL.revokeObjectURL(edit.urls[i]);
  edit.files.splice(i, 1);
  edit.urls.splice(i, 1);
  renderThumbs();
}

function renderThumbs() {
  const list = $("edit-thumbs");
  list.replaceChildren(...edit.files.map((file, i) => el("li", {},
    el("img", { src: edit.urls[i], alt: file.name }),
    el("span", { className: "name" }, file.name),
    el("button", { type: "button", onclick: () => removeAt(i), "aria-label": `Remove ${file.name}` }, "×"))));
  resetMaskStage();
}

function resetMaskStage() {
  const base = $("mask-base");
  edit.painted = false;
  if (!edit.files.length) {
    base.removeAttribute("src");
    canvas.width = canvas.height = 0;
    return;
  }
  base.onload = () => {
    canvas.width = base.naturalWidth;
    canvas.height = base.naturalHeight;
    clearMask();
  };
  base.src = edit.urls[edit.urls.length - 1];
}

function clearMask() {
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  edit.painted = false;
}

function paint(ev) {
  const rect = canvas.getBoundingClientRect();
  const scale = canvas.width / rect.width;
  const point = [(ev.clientX - rect.left) * scale, (ev.clientY - rect.top) * scale];
  ctx.globalCompositeOperation = $("erase").checked ? "destination-out" : "source-over";
  ctx.strokeStyle = ctx.fillStyle = PAINT;
  ctx.lineWidth = Number($("brush").value) * scale;
  ctx.lineCap = "round";
  ctx.beginPath();
  ctx.moveTo(...(last || point));
  ctx.lineTo(...point);
  ctx.stroke();
  last = point;
  edit.painted = true;
}

// An uploaded mask is drawn over the image at its size: light pixels become painted ones.
async function loadMask(file) {
  if (!ACCEPTED.includes(file.type)) return showAlert(`The mask “${file.name}” is not a JPEG, PNG or WebP image.`);
  const bitmap = await createImageBitmap(file).catch(() => null);
  if (!bitmap) return showAlert(`The mask “${file.name}” could not be read as an image.`);
  const scratch = new OffscreenCanvas(canvas.width, canvas.height).getContext("2d");
  scratch.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  const data = scratch.getImageData(0, 0, canvas.width, canvas.height);
  const px = data.data;
  for (let i = 0; i < px.length; i += 4) {
    const on = px[i] * 0.299 + px[i + 1] * 0.587 + px[i + 2] * 0.114 > 127;
    [px[i], px[i + 1], px[i + 2], px[i + 3]] = on ? [255, 64, 64, 140] : [0, 0, 0, 0];
  }
  ctx.putImageData(data, 0, 0);
  edit.painted = true;
  showAlert("");
}

// The painted area as a black/white PNG (base64), or null when nothing is painted.
export async function maskBase64() {
  if (!edit.painted || !canvas.width) return null;
  const painted = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const out = new OffscreenCanvas(canvas.width, canvas.height);
  const octx = out.getContext("2d");
  const data = octx.createImageData(canvas.width, canvas.height);
  for (let i = 0; i < data.data.length; i += 4) {
    const v = painted.data[i + 3] > 0 ? 255 : 0;
    data.data.set([v, v, v, 255], i);
  }
  octx.putImageData(data, 0, 0);
  return blobToBase64(await out.convertToBlob({ type: "image/png" }));
}

export async function imagesBase64() {
  return Promise.all(edit.files.map((f) => blobToBase64(f)));
}
