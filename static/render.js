/* Rendering helpers for the groundloop page: DOM building, a small streaming
 * Markdown renderer for model text, and MIME bundle rendering.
 *
 * Safety rule of this file: text from the server (program output, model text,
 * file contents) only ever reaches the DOM as text nodes. The one exception is
 * a `text/html` result, which is shown inside `<iframe sandbox="">` via srcdoc:
 * an empty sandbox attribute gives the frame an opaque origin and no scripts,
 * forms, popups or top navigation, so nothing in it can reach this page.
 */

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  if (attrs) {
    for (const [k, v] of Object.entries(attrs)) {
      if (v === undefined || v === null || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on") && typeof v === "function") node.addEventListener(k.slice(2), v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

function formatMs(ms) {
  if (ms === undefined || ms === null || Number.isNaN(ms)) return "";
  if (ms < 1) return `${ms.toFixed(2)} ms`;
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 60000) return `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
  const m = Math.floor(ms / 60000);
  return `${m} min ${Math.round((ms % 60000) / 1000)} s`;
}

function formatBytes(n) {
  if (typeof n !== "number") return "";
  if (n < 1024) return `${n} B`;
  if (n < 1 << 20) return `${(n / 1024).toFixed(1)} KB`;
  return `${(n / (1 << 20)).toFixed(1)} MB`;
}

const MODES = { python: "python", py: "python", javascript: "javascript", js: "javascript", node: "javascript",
  bash: "shell", sh: "shell", shell: "shell", console: "shell", json: { name: "javascript", json: true } };

/** Fill `pre` with `code`, syntax-highlighted by CodeMirror's runMode when available. */
function highlight(pre, code, lang) {
  pre.textContent = "";
  const mode = MODES[(lang || "").toLowerCase()];
  const CM = globalThis.CodeMirror;  // vendored as classic scripts; absent, code stays plain text
  if (mode && CM && CM.runMode) {
    CM.runMode(code, mode, pre);
    pre.classList.add("cm-s-groundloop");
  } else {
    pre.textContent = code;
  }
  return pre;
}

/* ---- Markdown: fences, inline code, bold, headings --------------------- */

/**
 * Split text into parts: {kind:"prose", text} and {kind:"code", lang, code,
 * closed, end}. `end` is the offset just after the closing fence line, so a
 * caller can cut the text after the last complete block.
 */
function parseFences(text) {
  const parts = [];
  let pos = 0;
  let prose = "";
  let open = null;   // {ch, len, indent, lang, lines}
  while (pos < text.length) {
    const nl = text.indexOf("\n", pos);
    const end = nl === -1 ? text.length : nl + 1;
    const line = text.slice(pos, nl === -1 ? text.length : nl);
    const complete = nl !== -1;
    if (!open) {
      const m = /^( {0,3})(`{3,}|~{3,})(.*)$/.exec(line);
      if (m && complete && !(m[2][0] === "`" && m[3].includes("`"))) {
        if (prose) parts.push({ kind: "prose", text: prose });
        prose = "";
        open = { ch: m[2][0], len: m[2].length, indent: m[1].length, lang: m[3].trim().split(/\s+/)[0] || "", lines: [] };
      } else {
        prose += text.slice(pos, end);
      }
    } else {
      const m = /^ {0,3}(`{3,}|~{3,})\s*$/.exec(line);
      if (m && complete && m[1][0] === open.ch && m[1].length >= open.len) {
        parts.push({ kind: "code", lang: open.lang, code: open.lines.join(""), closed: true, end });
        open = null;
      } else {
        let l = text.slice(pos, end);
        for (let i = 0; i < open.indent && l[0] === " "; i++) l = l.slice(1);
        open.lines.push(l);
      }
    }
    pos = end;
  }
  if (open) parts.push({ kind: "code", lang: open.lang, code: open.lines.join(""), closed: false, end: text.length });
  else if (prose) parts.push({ kind: "prose", text: prose });
  return parts;
}

/** Offset just after the last complete fenced block of `text`, or -1. */
function endOfLastFence(text) {
  let end = -1;
  for (const p of parseFences(text)) if (p.kind === "code" && p.closed) end = p.end;
  return end;
}

function renderInline(parent, text) {
  // Code, **bold** and *italics* (an asterisk next to a space, as in `2 * 3 * 4`, is no emphasis).
  const re = /(`[^`\n]+`|\*\*[^*\n]+\*\*|\*(?![\s*])[^*\n]+?(?<!\s)\*)/g;
  let last = 0;
  let m;
  while ((m = re.exec(text))) {
    if (m.index > last) parent.append(text.slice(last, m.index));
    const tok = m[0];
    if (tok[0] === "`") parent.append(el("code", { class: "md-code" }, tok.slice(1, -1)));
    else if (tok.startsWith("**")) parent.append(el("strong", null, tok.slice(2, -2)));
    else parent.append(el("em", null, tok.slice(1, -1)));
    last = m.index + tok.length;
  }
  if (last < text.length) parent.append(text.slice(last));
}

function renderProse(parent, text) {
  for (const line of text.split(/(?<=\n)/)) {
    const h = /^(#{1,6})\s+(.*)$/.exec(line.replace(/\n$/, ""));
    if (h) {
      parent.append(el("span", { class: "md-h" }, h[2]), "\n");
    } else {
      renderInline(parent, line);
    }
  }
}

/** Render Markdown `text` into `container` (replacing its content). */
function renderMarkdown(container, text) {
  container.textContent = "";
  for (const part of parseFences(text)) {
    if (part.kind === "prose") {
      const span = el("span", { class: "md-prose" });
      renderProse(span, part.text);
      container.append(span);
    } else {
      const pre = el("pre", { class: "md-fence" + (part.closed ? "" : " open"), "data-lang": part.lang || null });
      highlight(pre, part.code.replace(/\n$/, ""), part.lang);
      container.append(pre);
    }
  }
  return container;
}

/* ---- MIME bundles ------------------------------------------------------ */

const FRAME_HEAD = "<!doctype html><html><head><meta charset=\"utf-8\">" +
  "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; style-src 'unsafe-inline'; font-src data:\">" +
  "<style>:root{color-scheme:dark}html,body{margin:0;background:transparent}" +
  "body{padding:10px 12px;font:13px/1.45 system-ui,-apple-system,'Segoe UI',sans-serif;color:#e6edf3}" +
  "table{border-collapse:collapse;font-variant-numeric:tabular-nums}" +
  "th,td{border:1px solid #30363d;padding:4px 10px;text-align:left}th{background:#1c2430}" +
  "a{color:#58a6ff}code,pre{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace}</style></head><body>";

function estimateHtmlHeight(html) {
  const blocks = (html.match(/<(tr|br|p|li|h[1-6]|div|pre|hr)\b/gi) || []).length;
  const lines = (html.match(/\n/g) || []).length;
  const big = /<(img|svg|canvas|video)\b/i.test(html) ? 160 : 0;
  return Math.max(44, Math.min(440, 30 + 29 * Math.max(1, blocks, Math.min(lines, 12)) + big));
}

function htmlFrame(html) {
  const frame = el("iframe", {
    sandbox: "",             // no scripts, no same-origin, no forms, no navigation
    referrerpolicy: "no-referrer",
    title: "HTML result (sandboxed)",
    class: "result-frame",
  });
  frame.srcdoc = FRAME_HEAD + html + "</body></html>";
  frame.style.height = `${estimateHtmlHeight(html)}px`;
  return el("div", { class: "frame-wrap" }, frame);
}

function imageOf(mime, data) {
  const src = mime === "image/svg+xml"
    ? `data:image/svg+xml;charset=utf-8,${encodeURIComponent(data)}`
    : `data:${mime};base64,${String(data).replace(/\s+/g, "")}`;
  return el("img", { class: "result-img", src, alt: "image result" });
}

function prettyJson(value) {
  if (typeof value === "string") {
    try { value = JSON.parse(value); } catch (_) { return value; }
  }
  try { return JSON.stringify(value, null, 2); } catch (_) { return String(value); }
}

// Jupyter's order: the richest first. A figure asked for in PNG and SVG shows its PNG; LaTeX shows its source
// (no TeX engine on the page), which beats an object's bare repr.
const PREFERENCE = ["text/html", "image/png", "image/jpeg", "image/gif", "image/webp", "image/svg+xml", "text/markdown",
  "text/latex", "application/json", "text/plain"];

/** Pick the richest representation of a bundle and render it. */
function renderBundle(data, main) {
  const mimes = Object.keys(data || {});
  const mime = PREFERENCE.find((m) => m in data) || mimes[0];
  const box = el("div", { class: "result", "data-mime": mime || "none" });
  const label = el("div", { class: "result-label" },
    el("span", { class: "result-tag" }, main ? "Out" : "Display"), " ", el("span", { class: "mime" }, mime || "empty"));
  box.append(label);
  if (!mime) return box;
  const value = data[mime];
  let body;
  if (mime === "text/html") body = htmlFrame(String(value));
  else if (mime.startsWith("image/")) body = imageOf(mime, value);
  else if (mime === "text/markdown") body = renderMarkdown(el("div", { class: "md result-md" }), String(value));
  else if (mime === "text/latex") body = el("pre", { class: "result-text result-latex" }, String(value));
  else if (mime === "application/json" || mime.endsWith("+json")) body = el("pre", { class: "result-json" }, prettyJson(value));
  else body = el("pre", { class: "result-text" }, typeof value === "string" ? value : prettyJson(value));
  box.append(body);
  return box;
}

export { el, formatMs, formatBytes, highlight, parseFences, endOfLastFence, renderMarkdown, renderBundle };
