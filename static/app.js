/* The groundloop page: editor, buttons, output cells, files, status.
 *
 * The wire protocol is the TypeScript client of clients/js (its build is
 * vendor/groundloop-client.js: a Session that reconnects and resumes), DOM
 * helpers and result rendering are in render.js, the output cells in cells.js.
 * This module wires the controls: each request gets a cell, filled in the
 * order the server's frames arrive.
 *
 * window.groundloop is a small, stable hook for tests and embedders (nothing
 * of the page reads it):
 *   setCode(code, language?), getCode(), run(), exec(command), assist(prompt),
 *   cancel(), dropConnection(), client, stats(), files (files.js: upload, download, stats...),
 *   terminal (terminal.js: open(), close(), text(), screen()).
 */
import { makeCells } from "./cells.js";
import { makeFiles } from "./files.js";
import { el, formatBytes, formatMs } from "./render.js";
import { makeTerminal } from "./terminal.js";
import { Session } from "./vendor/groundloop-client.js";

const $ = (id) => document.getElementById(id);
const store = {
  get(k, d = "") { try { return localStorage.getItem(`groundloop.${k}`) ?? d; } catch (_) { return d; } },
  set(k, v) { try { localStorage.setItem(`groundloop.${k}`, v); } catch (_) { /* private mode */ } },
};

/* ---- examples ----------------------------------------------------------- */

const EXAMPLES = {
  "Stream lines": ["python", `import time

for i in range(1, 6):
  print(f"step {i}/5: warming up the flux capacitor")
  time.sleep(0.4)
print("done, and every line arrived as it was printed")
`],
  "Rich HTML result": ["python", `class Table:
  """Any object with _repr_html_ renders as HTML (in a sandboxed frame)."""
  def __init__(self, rows):
      self.rows = rows
  def _repr_html_(self):
      body = "".join(f"<tr><td>{n}</td><td>{n*n}</td><td>{'★' * n}</td></tr>" for n in self.rows)
      return f"<table><tr><th>n</th><th>n²</th><th>stars</th></tr>{body}</table>"

Table(range(1, 6))
`],
  "Draw a PNG": ["python", `import struct, zlib

def png(w, h, pixel):
  raw = b"".join(b"\\0" + bytes(c for x in range(w) for c in pixel(x, y)) for y in range(h))
  chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))
  return (b"\\x89PNG\\r\\n\\x1a\\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
          + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))

def mandel(x, y, w=240, h=160):
  c = complex(3.0 * x / w - 2.2, 2.0 * y / h - 1.0)
  z, n = 0j, 0
  while abs(z) < 2 and n < 40:
      z, n = z * z + c, n + 1
  return (n * 6 % 256, n * 3 % 256, 128 + n * 3) if n < 40 else (13, 17, 23)

class Image:
  def _repr_png_(self):
      return png(240, 160, mandel)

Image()
`],
  "JSON value": ["python", `{"session": "warm", "contexts": ["python", "javascript"], "streamed": True, "lines": [1, 2, 3]}
`],
  "A traceback": ["python", `def divide(a, b):
  return a / b

print("about to fail...")
divide(1, 0)
`],
  "JavaScript": ["javascript", `for (let i = 1; i <= 3; i++) {
console.log(\`tick \${i}\`);
await new Promise((r) => setTimeout(r, 300));
}
({ node: process.version, answer: 6 * 7 })
`],
  "TypeScript": ["typescript", `import { cpus } from "node:os";

interface Reading { label: string; value: number }
const readings: Reading[] = [{ label: "cores", value: cpus().length }];
const wait = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
await wait(100);
readings
`],
  "Bash": ["bash", `# one shell for the session: cd, variables and functions stay for the next run
cd /tmp
export STAGE=warm
greet() { echo "hello from $(pwd), stage $STAGE"; }
greet
`],
};

// CodeMirror's mode of each language (Bash is its shell mode).
const MODES = { python: "python", javascript: "javascript", typescript: "text/typescript", bash: "shell" };

/* ---- editor --------------------------------------------------------------- */

const textarea = $("code");
let cm = null;

function runKey() { run(); }
function initEditor() {
  const language = store.get("language", "python");
  $("language").value = language;
  textarea.value = store.get(`code.${language}`, EXAMPLES["Stream lines"][1]);
  if (window.CodeMirror) {
    cm = window.CodeMirror.fromTextArea(textarea, {
      mode: MODES[language] || language,
      theme: "groundloop",
      lineNumbers: true,
      indentUnit: language === "python" ? 4 : 2,
      tabSize: 4,
      matchBrackets: true,
      autoCloseBrackets: true,
      viewportMargin: Infinity,
      screenReaderLabel: "Code editor (Ctrl/Cmd+Enter runs, Esc leaves the editor)",
      extraKeys: {
        "Ctrl-Enter": runKey,
        "Cmd-Enter": runKey,
        "Shift-Ctrl-Enter": () => exec(""),
        "Shift-Cmd-Enter": () => exec(""),
        Esc: () => { $("run").focus(); },
        Tab: (ed) => {
          if (ed.somethingSelected()) ed.indentSelection("add");
          else ed.replaceSelection(" ".repeat(ed.getOption("indentUnit")), "end");
        },
        "Shift-Tab": (ed) => ed.indentSelection("subtract"),
      },
    });
    cm.getInputField().setAttribute("aria-label", "Code editor (Ctrl/Cmd+Enter runs, Esc leaves the editor)");
    cm.getWrapperElement().setAttribute("data-testid", "codemirror");
    cm.on("changes", saveCodeSoon);
  } else {
    // No CodeMirror: a textarea that keeps Tab for indentation (Esc releases it).
    textarea.classList.add("plain-editor");
    let escaped = false;
    textarea.addEventListener("keydown", (e) => {
      if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); if (e.shiftKey) exec(""); else run(); }
      else if (e.key === "Escape") escaped = true;
      else if (e.key === "Tab" && !escaped) {
        e.preventDefault();
        const { selectionStart: s, selectionEnd: t, value } = textarea;
        textarea.value = value.slice(0, s) + "    " + value.slice(t);
        textarea.selectionStart = textarea.selectionEnd = s + 4;
      } else escaped = false;
    });
    textarea.addEventListener("input", saveCodeSoon);
  }
}

const getCode = () => (cm ? cm.getValue() : textarea.value);
const language = () => $("language").value;
let saveTimer = null;
function saveCodeSoon() {
  clearTimeout(saveTimer);
  saveTimer = setTimeout(() => store.set(`code.${language()}`, getCode()), 300);
}

function setCode(code, lang) {
  if (lang && lang !== language()) {
    $("language").value = lang;
    applyLanguage(false);
  }
  if (cm) cm.setValue(code); else textarea.value = code;
  saveCodeSoon();
}

function applyLanguage(loadSaved = true) {
  const lang = language();
  store.set("language", lang);
  if (cm) {
    cm.setOption("mode", MODES[lang] || lang);
    cm.setOption("indentUnit", lang === "python" ? 4 : 2);
  }
  if (loadSaved) {
    const fallback = Object.values(EXAMPLES).find(([l]) => l === lang)[1];
    const code = store.get(`code.${lang}`, fallback);
    if (cm) cm.setValue(code); else textarea.value = code;
  }
}

/* ---- output pane ---------------------------------------------------------- */

const output = $("output");
let follow = true;
let scrollQueued = false;
output.addEventListener("scroll", () => {
  follow = output.scrollTop + output.clientHeight >= output.scrollHeight - 48;
});
function scrollSoon() {
  if (scrollQueued || !follow) return;
  scrollQueued = true;
  requestAnimationFrame(() => {
    scrollQueued = false;
    if (follow) output.scrollTop = output.scrollHeight;
  });
}
const MAX_CELLS = 300;  // the pane keeps the newest cells; a long session must not grow the DOM forever
function append(node) {
  $("welcome")?.remove();
  output.append(node);
  if (output.childElementCount > MAX_CELLS) {
    for (const old of [...output.children].slice(0, output.childElementCount - MAX_CELLS)) {
      if (old.dataset.state !== "running") old.remove();
    }
  }
  follow = true;
  scrollSoon();
  return node;
}
function notice(text, level = "info") {
  return append(el("div", { class: `notice notice-${level}`, role: level === "error" ? "alert" : null }, text));
}

const { Cell, AssistCell } = makeCells({ append, scrollSoon, cancel: (id) => cancelRequest(id) });

/* ---- requests --------------------------------------------------------------- */

// The page's own ?workspace=<name> opens that named workspace of the user's (docs/page.md).
const pageWorkspace = new URLSearchParams(location.search).get("workspace");
const wsUrl = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/v1/ws` +
  (pageWorkspace ? `?workspace=${encodeURIComponent(pageWorkspace)}` : "");
// renewExpired: a page starts a fresh session when the server forgot its own (and says so).
const client = new Session(wsUrl, { token: store.get("token", ""), renewExpired: true, pingIntervalMs: 20000,
  healthUrl: new URL("/healthz", location.href).href });
const userRequests = [];   // ids of cancellable requests, oldest first
// The live file list, uploads and downloads (files.js).
const files = makeFiles({ client, section: document.querySelector(".files"), refresh: () => refreshFilesSoon(), notice });

function start(type, params, title) {
  const cell = type === "assist" ? new AssistCell(params, title) : new Cell(type, params, title);
  const handle = client.request(type, params, { onFrame: (f) => cell.onFrame(f) });
  const { id, done } = handle;
  cell.attach(id);
  userRequests.push(id);
  // One column: bring the output into view, the user would not see the run start otherwise.
  if (window.matchMedia("(max-width: 900px)").matches) {
    const pane = document.querySelector(".pane-output");
    if (pane.getBoundingClientRect().top > window.innerHeight * 0.6) pane.scrollIntoView({ block: "start" });
  }
  updateCancel();
  if (client.state !== "open") notice("Not connected yet: the request is queued and will be sent once connected.", "muted");
  done.then((frame) => {
    cell.finish(frame);
    const i = userRequests.indexOf(id);
    if (i >= 0) userRequests.splice(i, 1);
    updateCancel();
    if (!frame.local && handle.elapsedMs !== null) showRtt(handle.elapsedMs, type === "exec" ? "exec" : type === "assist" ? "assist" : "run");
    if (type !== "read_file") refreshFilesSoon();
  });
  return id;
}

function run() {
  const code = getCode();
  if (!code.trim()) { notice("The editor is empty.", "muted"); return null; }
  return start("run_code", { code, language: language() }, code);
}

function exec(command) {
  let cmd = command;
  if (cmd === undefined || cmd === null) cmd = $("command").value;
  if (!cmd.trim()) cmd = getCode();
  if (!cmd.trim()) { notice("Nothing to run: type a command.", "muted"); return null; }
  return start("exec", { command: cmd }, cmd);
}

function assist(prompt) {
  const text = (prompt ?? $("prompt").value).trim();
  if (!text) { notice("Type a question for the model first.", "muted"); $("prompt").focus(); return null; }
  // The model writes Python or JavaScript only (assist refuses other languages).
  const lang = ["python", "javascript"].includes(language()) ? language() : undefined;
  return start("assist", { prompt: text, language: lang }, text);
}

function cancelRequest(id) {
  if (!client.has(id)) return;
  void client.cancel(id);
  const cell = output.querySelector(`[data-request-id="${CSS.escape(id)}"] .cell-meta`);
  if (cell) cell.lastChild.textContent = "cancelling…";
}

function cancelLast() {
  const id = userRequests[userRequests.length - 1];
  if (id) cancelRequest(id);
}

function updateCancel() {
  $("cancel").disabled = userRequests.length === 0;
}

/* ---- files -------------------------------------------------------------------- */

let filesTimer = null;
function refreshFilesSoon() {
  clearTimeout(filesTimer);
  filesTimer = setTimeout(refreshFiles, 150);
}

async function refreshFiles() {
  if (client.state !== "open") return;
  const list = $("files");
  list.setAttribute("aria-busy", "true");
  let entries;
  try {
    entries = await client.listFiles("/workspace");
  } catch (err) {
    delete list.dataset.key;
    list.replaceChildren(el("li", { class: "muted" }, err.done?.error?.message || "unavailable"));
    return;
  } finally {
    list.removeAttribute("aria-busy");
  }
  const isDir = (e) => e.type === "directory";
  entries = (entries || []).slice().sort((a, b) =>
    isDir(a) === isDir(b) ? a.name.localeCompare(b.name) : isDir(a) ? -1 : 1);
  const key = JSON.stringify(entries.map((e) => [e.name, e.type, e.size]));
  if (key === list.dataset.key) return;  // unchanged: keep the buttons (and the focus) in place
  list.dataset.key = key;
  if (!entries.length) {
    list.replaceChildren(el("li", { class: "muted" }, "empty: files your code writes show up here"));
    return;
  }
  list.replaceChildren(...entries.map((e) => el("li", null,
    el("button", { type: "button", class: `file file-${e.type}`, "data-name": e.name, disabled: isDir(e),
      title: isDir(e) ? "directory" : `Show ${e.name}`, onclick: () => openFile(e.name) },
    el("span", { class: "file-icon", "aria-hidden": "true" }, isDir(e) ? "▸" : "·"),
    el("span", { class: "file-name" }, e.name + (isDir(e) ? "/" : "")),
    el("span", { class: "file-size" }, isDir(e) ? "" : formatBytes(e.size))),
    isDir(e) ? null : files.downloadButton(e.name))));
}

function openFile(name) {
  const path = `/workspace/${name}`;
  const cell = new Cell("read_file", {}, path);
  const { id, done } = client.request("read_file", { path });
  cell.attach(id);
  done.then((d) => {
    if (d.ok) {
      if (d.encoding === "base64") cell.body.append(el("div", { class: "notice notice-muted" }, `binary file, ${formatBytes(Math.floor((d.content || "").length * 3 / 4))}`));
      else cell.stream.write("stdout", d.content || "");
    }
    cell.finish(d);
  });
}

/* ---- connection state, status bar ------------------------------------------------ */

const status = $("status") || document.querySelector("[data-testid=status]");
function setStatus(state, text, title) {
  status.dataset.state = state;
  status.querySelector(".status-text").textContent = text;
  status.title = title || text;
}

function showRtt(ms, source) {
  $("sb-rtt").textContent = `${formatMs(ms)} (${source})`;
}

client.on("state", ({ state, reason, delayMs }) => {
  if (state === "open") setStatus("open", reason === "resumed" ? "connected · resumed" : "connected");
  else if (state === "connecting") setStatus("connecting", reason === "resuming session" ? "resuming…" : "connecting…");
  else if (state === "reconnecting") setStatus("reconnecting", `${reason}: retrying in ${formatMs(delayMs)}`, reason);
  else if (state === "unauthorized") setStatus("unauthorized", "unauthorized: set a token", reason);
  else setStatus(state, reason || state);
  if (state === "reconnecting" && userRequests.length) {
    for (const node of output.querySelectorAll('.cell[data-state="running"]')) node.dataset.waiting = "true";
  }
});

client.on("ready", ({ frame, fresh, expired, drained }) => {
  for (const node of output.querySelectorAll(".cell[data-waiting]")) delete node.dataset.waiting;
  $("sb-session").textContent = (frame.session_id || "").slice(0, 12) || "–";
  $("sb-session").title = frame.session_id || "";
  const sb = frame.sandbox || {};
  $("sb-sandbox").textContent = [sb.backend, sb.runtime, sb.warm ? "warm" : sb.warm === false ? "cold" : "",
    sb.workspace ? `workspace ${sb.workspace}` : ""].filter(Boolean).join(" · ") || "–";
  $("sb-sandbox").title = sb.image || "";
  // Only the languages this sandbox runs can be picked (the minimal image has no TypeScript).
  const features = frame.features || [];
  for (const option of $("language").options) {
    option.disabled = features.length > 0 && !features.includes(`language:${option.value}`);
  }
  const lost = pageWorkspace ? "variables are gone, the workspace's files are kept" : "variables and files are gone";
  if (drained) notice(`The server restarted: started a fresh session on another server (${lost}).`, "warn");
  else if (expired) notice(`The previous session expired on the server: started a fresh session (${lost}).`, "warn");
  else if (!fresh) notice("Reconnected: session resumed, nothing lost.", "muted");
  if (fresh) refreshFiles();
});

client.on("frame", ({ frame: f }) => {
  switch (f.type) {
    case "gap": notice(`${f.missed} frames were lost while disconnected (the replay buffer had evicted them).`, "warn"); break;
    case "exit": notice(`Background process ${f.process_id} exited with code ${f.exit_code}.`, "muted"); break;
    case "draining": notice(`The server is restarting: running code may finish (up to ${Math.round(f.deadline_s)} s), then a fresh session starts.`, "warn"); break;
    case "sandbox_replaced": notice("The sandbox was replaced (the previous one died): code contexts start empty.", "warn"); refreshFilesSoon(); break;
    case "error": notice(`${f.code}: ${f.message}`, "error"); break;
    case "stdout": case "stderr":
      if (f.process_id) notice(`[${f.process_id}] ${f.text}`, f.type === "stderr" ? "warn" : "muted");
      break;
    default: break;
  }
});

client.on("rtt", ({ ms }) => showRtt(ms, "ping"));

// seq display, cheaply: refresh on animation frames while frames flow.
let seqShown = -1;
(function seqLoop() {
  if (client.lastSeq !== seqShown) { seqShown = client.lastSeq; $("sb-seq").textContent = String(seqShown); }
  setTimeout(seqLoop, 250);
})();

/* ---- wiring ------------------------------------------------------------------------ */

function initExamples() {
  const sel = $("examples");
  for (const name of Object.keys(EXAMPLES)) sel.append(el("option", { value: name }, name));
  const chips = $("chips");
  for (const name of ["Stream lines", "Rich HTML result", "Draw a PNG", "A traceback"]) {
    chips?.append(el("button", { type: "button", class: "chip", "data-example": name,
      onclick: () => { setCode(EXAMPLES[name][1], EXAMPLES[name][0]); run(); } }, el("span", { "aria-hidden": "true" }, "▶ "), name));
  }
  sel.addEventListener("change", () => {
    const ex = EXAMPLES[sel.value];
    if (ex) setCode(ex[1], ex[0]);
    sel.value = "";
    if (cm) cm.focus();
  });
}

function init() {
  initEditor();
  initExamples();
  $("language").addEventListener("change", () => applyLanguage(true));
  $("run").addEventListener("click", () => run());
  $("cancel").addEventListener("click", () => cancelLast());
  $("clear").addEventListener("click", () => {
    for (const node of [...output.children]) if (node.dataset.state !== "running") node.remove();
  });
  $("cmd-form").addEventListener("submit", (e) => { e.preventDefault(); exec($("command").value); });
  $("ask-form").addEventListener("submit", (e) => { e.preventDefault(); assist(); });
  $("prompt").addEventListener("keydown", (e) => {
    if ((e.ctrlKey || e.metaKey) && e.key === "Enter") { e.preventDefault(); assist(); }
  });
  $("files-refresh").addEventListener("click", () => refreshFiles());
  const token = $("token");
  token.value = store.get("token", "");
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    store.set("token", token.value.trim());
    client.setToken(token.value.trim());
    client.restart();
  });
  document.addEventListener("keydown", (e) => {
    const t = e.target;
    const typing = t && (t.closest(".CodeMirror") || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName));
    if (e.key === "Escape" && !typing && userRequests.length) { e.preventDefault(); cancelLast(); }
    else if ((e.ctrlKey || e.metaKey) && e.key === "Enter" && !typing) { e.preventDefault(); run(); }
  });
  // Back online, or back to the tab: do not wait for the backoff timer.
  const nudge = () => { if (client.state === "reconnecting") client.open(); };
  window.addEventListener("online", nudge);
  document.addEventListener("visibilitychange", () => { if (!document.hidden) nudge(); });
  client.open();
}

const terminal = makeTerminal({ client, box: $("terminal"), button: $("terminal-toggle"), label: $("terminal-state") });

window.groundloop = {
  client,
  terminal,
  setCode,
  getCode,
  run,
  exec,
  assist,
  cancel: cancelLast,
  refreshFiles,
  files,
  dropConnection: () => client.dropConnection(),
  stats: () => ({ ...client.stats, state: client.state, sessionId: client.sessionId, lastSeq: client.lastSeq,
    inflight: userRequests.length }),
};

init();
