// A small Markdown subset for model cards: headings, paragraphs, fenced code, lists and tables, with inline code,
// bold and italics; links and images keep only their text. Every piece goes in as a text node (el), never as
// markup, so whatever a card holds is shown, not run. YAML front matter (metadata for model hubs) is left out.

import { el } from "./ui.js";

const LIST = /^\s*([-*+]|\d+[.)])\s+/;
const TABLE = /^\s*\|/;
const FENCE = /^\s*(```|~~~)/;
const HEADING = /^(#{1,6})\s+(.*?)\s*#*\s*$/;
const INLINE = /`([^`]+)`|!?\[([^\]]*)\]\([^)]*\)|\*\*([^*]+)\*\*|\*([^*\s][^*]*)\*/g;

// text -> block nodes; `top` is the heading level a card's "#" becomes (its place under the page's own headings).
export function renderMarkdown(text, top = 4) {
  const lines = text.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  if (lines[0]?.trim() === "---") {
    const end = lines.findIndex((line, k) => k > 0 && line.trim() === "---");
    if (end > 0) i = end + 1;
  }
  const out = [];
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(FENCE);
    const heading = line.match(HEADING);
    if (!line.trim()) {
      i++;
    } else if (fence) {
      const body = [];
      for (i++; i < lines.length && !lines[i].trimStart().startsWith(fence[1]); i++) body.push(lines[i]);
      i++; // the closing fence
      out.push(el("pre", {}, el("code", {}, body.join("\n"))));
    } else if (heading) {
      out.push(el(`h${Math.min(top + heading[1].length - 1, 6)}`, {}, ...inline(heading[2])));
      i++;
    } else if (LIST.test(line)) {
      const items = [];
      for (; i < lines.length && LIST.test(lines[i]); i++) items.push(el("li", {}, ...inline(lines[i].replace(LIST, ""))));
      out.push(el(/^\s*\d/.test(line) ? "ol" : "ul", {}, ...items));
    } else if (TABLE.test(line)) {
      const rows = [];
      for (; i < lines.length && TABLE.test(lines[i]); i++) rows.push(lines[i]);
      out.push(table(rows));
    } else {
      const parts = [];
      do { // a line ending in two spaces is a line break
        if (parts.length) parts.push(lines[i - 1].endsWith("  ") ? el("br") : " ");
        parts.push(...inline(lines[i].trim()));
        i++;
      } while (i < lines.length && lines[i].trim() && ![FENCE, HEADING, LIST, TABLE].some((re) => re.test(lines[i])));
      out.push(el("p", {}, ...parts));
    }
  }
  return out;
}

function inline(text) {
  const nodes = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > last) nodes.push(text.slice(last, m.index));
    if (m[1] !== undefined) nodes.push(el("code", {}, m[1]));
    else if (m[2] !== undefined) nodes.push(m[2]);
    else if (m[3] !== undefined) nodes.push(el("strong", {}, m[3]));
    else nodes.push(el("em", {}, m[4]));
    last = m.index + m[0].length;
  }
  if (last < text.length) nodes.push(text.slice(last));
  return nodes;
}

function table(lines) {
  const rows = lines.map((line) => line.trim().replace(/^\|/, "").replace(/\|$/, "").split("|").map((c) => c.trim()));
  const head = rows.length > 1 && rows[1].every((c) => /^:?-+:?$/.test(c)) ? rows.splice(0, 2)[0] : null;
  return el("table", {},
    head ? el("thead", {}, el("tr", {}, ...head.map((c) => el("th", { scope: "col" }, ...inline(c))))) : null,
    el("tbody", {}, ...rows.map((r) => el("tr", {}, ...r.map((c) => el("td", {}, ...inline(c)))))));
}
