/* The terminal pane: a shell in the session's sandbox (open_terminal), drawn by xterm.js.
 *
 * xterm.js and its fit addon are classic `defer` scripts (vendor/xterm/), read
 * here as globalThis.Terminal and globalThis.FitAddon. The terminal is one
 * request of the client's Session: `open_terminal` stays in flight while the
 * shell lives, its `terminal_output` frames (base64 of the raw bytes) are
 * written to xterm as bytes, so its own UTF-8 decoder sees a character split
 * over two frames whole. Over a resume the Session keeps the request's handler
 * and drops frames it already processed, so earlier output is drawn once and
 * what came while away is drawn after it. A session that is gone (the server
 * forgot it) ends the request with `SessionLost`: the pane opens a new
 * terminal in the fresh session.
 *
 * Keystrokes go as `terminal_input` (base64 of their UTF-8, or of xterm's
 * binary strings), one request in flight at a time: what is typed meanwhile
 * is sent with the next one, so a fast typist makes few frames and the order
 * never changes. The pane fits its terminal to its box (ResizeObserver) and
 * sends `resize_terminal` when the size in cells changes.
 */

const toBase64 = (bytes) => {
  let s = "";
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(s);
};
const fromBase64 = (text) => Uint8Array.from(atob(text), (c) => c.charCodeAt(0));
const utf8 = new TextEncoder();

export function makeTerminal({ client, box, button, label }) {
  const Terminal = globalThis.Terminal;
  const Fit = globalThis.FitAddon?.FitAddon;
  if (!Terminal || !Fit) {
    box.textContent = "The terminal needs xterm.js (static/vendor/xterm/), which did not load.";
    button.disabled = true;
    return null;
  }
  const term = new Terminal({
    convertEol: false,
    cursorBlink: true,
    fontFamily: getComputedStyle(document.documentElement).getPropertyValue("--mono").trim() || "monospace",
    fontSize: 13,
    scrollback: 5000,
    theme: { background: "#0b0f14", foreground: "#e6edf3", cursor: "#3fd9a5", selectionBackground: "#243040" },
  });
  const fit = new Fit();
  term.loadAddon(fit);
  term.open(box);

  let id = null;          // the open_terminal request while the terminal lives
  let pending = [];       // keystrokes not sent yet (Uint8Arrays)
  let sending = false;
  let sent = { cols: 0, rows: 0 };

  const setState = (state, text) => {
    box.dataset.state = state;
    label.textContent = text;
    button.textContent = state === "open" ? "Close" : "Start";
  };
  setState("closed", "not started");

  function refit() {
    if (!box.offsetParent) return;  // hidden: no size to fit to
    try { fit.fit(); } catch (_) { /* not laid out yet */ }
  }
  new ResizeObserver(() => refit()).observe(box);

  function flush() {
    if (sending || !id || !pending.length) return;
    const total = pending.reduce((n, b) => n + b.length, 0);
    const bytes = new Uint8Array(total);
    let at = 0;
    for (const b of pending) { bytes.set(b, at); at += b.length; }
    pending = [];
    sending = true;
    client.request("terminal_input", { terminal: id, data: toBase64(bytes), encoding: "base64" }).done.then(() => {
      sending = false;
      flush();
    });
  }
  const send = (bytes) => { if (id) { pending.push(bytes); flush(); } };
  term.onData((text) => send(utf8.encode(text)));
  term.onBinary((text) => send(Uint8Array.from(text, (c) => c.charCodeAt(0) & 0xff)));
  term.onResize(({ cols, rows }) => {
    if (!id || (cols === sent.cols && rows === sent.rows)) return;
    sent = { cols, rows };
    client.request("resize_terminal", { terminal: id, cols, rows });
  });

  function open() {
    if (id) return id;
    refit();
    sent = { cols: term.cols, rows: term.rows };
    const handle = client.request("open_terminal", { cols: term.cols, rows: term.rows }, {
      onFrame: (f) => { if (f.type === "terminal_output") term.write(fromBase64(f.data)); },
    });
    id = handle.id;
    setState("open", "running");
    handle.done.then((done) => {
      if (id === handle.id) { id = null; pending = []; }
      if (done.ok) {
        term.write(`\r\n\x1b[2m[the terminal ended: exit ${done.exit_code}]\x1b[0m\r\n`);
        setState("closed", `ended (exit ${done.exit_code})`);
      } else if (done.error?.name === "SessionLost") {
        term.write("\r\n\x1b[2m[the session was lost: a new terminal starts in the new session]\x1b[0m\r\n");
        open();  // queued by the client until the fresh session is ready
      } else {
        term.write(`\r\n\x1b[2m[${done.error?.name}: ${done.error?.message}]\x1b[0m\r\n`);
        setState("closed", done.error?.name || "closed");
      }
    });
    term.focus();
    return id;
  }

  function close() {
    if (id) client.request("close_terminal", { terminal: id });
  }

  button.addEventListener("click", () => (id ? close() : open()));
  box.addEventListener("click", () => { if (!id) open(); });

  // For tests and embedders: the text of the active buffer (its scrollback included), one line each.
  function text() {
    const buf = term.buffer.active;
    const lines = [];
    for (let i = 0; i < buf.length; i++) lines.push(buf.getLine(i)?.translateToString(true) ?? "");
    return lines.join("\n");
  }
  const screen = () => ({ type: term.buffer.active.type, cols: term.cols, rows: term.rows, text: text() });
  return { open, close, text, screen, term, get id() { return id; } };
}
