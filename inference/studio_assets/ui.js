// DOM helpers. Every text from the user or the server goes in through textContent or an attribute, never as
// markup, so nothing a prompt or a file name holds can become HTML.

export const $ = (id) => document.getElementById(id);

// el("button", {type: "button", onclick: fn, "aria-label": "x"}, "text", childNode, ...)
export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export function svg(tag, attrs = {}, ...children) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  return node;
}

export function showAlert(message) {
  const box = $("alert");
  box.textContent = message;
  box.hidden = !message;
}

export function setState(message) {
  $("state").textContent = message;
  $("state").classList.toggle("busy", Boolean(message) && message.endsWith("…"));
}

export function download(blob, name) {
  const url = URL.createObjectURL(blob);
  const a = el("a", { href: url, download: name, className: "visually-hidden" });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// The clipboard needs a secure context (localhost or https); elsewhere the text is shown selected for Ctrl+C.
export async function copyText(text, what) {
  try {
    await navigator.clipboard.writeText(text);
    setState(`Copied ${what} to the clipboard.`);
  } catch (e) {
    const area = $("copy-fallback");
    area.value = text;
    area.hidden = false;
    area.focus();
    area.select();
    setState(`Press Ctrl+C (or ⌘C) to copy ${what}; Escape closes the box.`);
    area.onkeydown = (ev) => { if (ev.key === "Escape") area.hidden = true; };
    area.onblur = () => { area.hidden = true; };
  }
}

// Tabs with arrow-key navigation (WAI-ARIA tabs pattern).
export function setupTabs(onShow) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const select = (tab, focus) => {
    for (const t of tabs) {
      const on = t === tab;
      t.setAttribute("aria-selected", String(on));
      t.tabIndex = on ? 0 : -1;
      $(t.getAttribute("aria-controls")).hidden = !on;
    }
    if (focus) tab.focus();
    onShow(tab.id.replace("tab-", ""));
  };
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => select(tab, false));
    tab.addEventListener("keydown", (ev) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[ev.key];
      if (step) select(tabs[(i + step + tabs.length) % tabs.length], true);
      if (ev.key === "Home") select(tabs[0], true);
      if (ev.key === "End") select(tabs[tabs.length - 1], true);
    });
  });
  return (name) => select($(`tab-${name}`), true);
}

// A before/after slider: the result drawn over the input, cut at the range input's position (before on the left).
export function beforeAfter(beforeUrl, afterUrl, label) {
  const after = el("img", { src: afterUrl, alt: `After: ${label}`, className: "after" });
  const box = el("div", { className: "compare" }, el("img", { src: beforeUrl, alt: `Before: ${label}`, className: "before" }), after,
    el("span", { className: "tag tag-before", "aria-hidden": "true" }, "Before"),
    el("span", { className: "tag tag-after", "aria-hidden": "true" }, "After"));
  const range = el("input", { type: "range", min: 0, max: 100, value: 50, "aria-label": "Before / after split (percent of the image showing before)" });
  const update = () => box.style.setProperty("--split", `${range.value}%`);
  range.addEventListener("input", update);
  update();
  return el("div", { className: "compare-wrap" }, box, range);
}
