/* Output cells of the groundloop page: one <article class="cell"> per request.
 *
 * A cell is filled in the order its frames arrive: `stdout`/`stderr` lines go
 * into `pre.stream` spans (consecutive lines of one stream share a span), a
 * `result` breaks the stream and renders its bundle, and the terminal `done`
 * sets `data-state` (ok | error | cancelled) with the duration, exit code or
 * iteration count. `AssistCell` renders the model's tokens as Markdown and puts
 * an output panel right after each executed code block.
 *
 * makeCells({append, scrollSoon, cancel}) binds the cells to the page's
 * output pane and returns {Cell, AssistCell, Stream, errorBox}.
 */
import { el, endOfLastFence, formatMs, highlight, renderBundle, renderMarkdown } from "./render.js";

export function makeCells({ append, scrollSoon, cancel }) {
  // The shown results of each display id (docs/protocol.md section 12), across the session's requests: an update
  // replaces them. A clear forgets the nodes it removed.
  const displays = new Map();

  /** A stream area: consecutive lines of one stream share a span; results break it. */
  class Stream {
    constructor(parent) { this.parent = parent; this.pre = null; this.last = null; this.lines = 0; this.pendingClear = false; }
    write(stream, text) {
      if (this.pendingClear) this.clearNow();
      if (!this.pre || this.pre !== this.parent.lastElementChild) {
        this.pre = this.parent.appendChild(el("pre", { class: "stream" }));
        this.last = null;
      }
      if (this.last && this.last.dataset.stream === stream) {
        this.last.firstChild.appendData(text);
      } else {
        this.last = this.pre.appendChild(el("span", { class: `out-${stream}`, "data-stream": stream }, text));
      }
      this.lines += 1;
      scrollSoon();
    }
    result(data, main, displayId, update) {
      if (update && displayId) {  // replaces the display's results wherever shown; none shown: nothing new
        const shown = [...(displays.get(displayId) || [])].filter((node) => node.isConnected);
        const fresh = shown.map((node) => {
          const box = renderBundle(data, main);
          box.dataset.displayId = displayId;
          node.replaceWith(box);
          return box;
        });
        if (fresh.length) displays.set(displayId, fresh); else displays.delete(displayId);
        return;
      }
      if (this.pendingClear) this.clearNow();
      const box = renderBundle(data, main);
      if (displayId) {
        box.dataset.displayId = displayId;
        displays.set(displayId, [...(displays.get(displayId) || []), box]);
      }
      this.parent.append(box);
      scrollSoon();
    }
    /** clear_output: now, or (wait) when this request's next output comes. */
    clear(wait) {
      if (wait) this.pendingClear = true; else this.clearNow();
    }
    clearNow() {
      this.parent.replaceChildren();
      this.pre = this.last = null;
      this.pendingClear = false;
      for (const [id, nodes] of displays) {  // forget the displays the clear took
        const kept = nodes.filter((node) => node.isConnected);
        if (kept.length) displays.set(id, kept); else displays.delete(id);
      }
    }
  }

  function errorBox(error) {
    const box = el("div", { class: "error-box", role: "alert" },
      el("div", { class: "error-title" }, el("strong", null, error.name || "Error"), error.message ? `: ${error.message}` : ""));
    if (error.traceback) {
      box.append(el("details", { class: "traceback", open: true }, el("summary", null, "Traceback"),
        el("pre", null, error.traceback)));
    }
    return box;
  }

  const KIND = {
    run_code: { icon: "▶", label: (p) => p.language || "python" },
    exec: { icon: "$", label: () => "shell" },
    assist: { icon: "✦", label: () => "model" },
    read_file: { icon: "▤", label: () => "file" },
  };

  /** One request's block in the output pane. */
  class Cell {
    constructor(type, params, title) {
      const kind = KIND[type];
      this.type = type;
      this.meta = el("span", { class: "cell-meta" }, el("span", { class: "spinner", "aria-hidden": "true" }), "running");
      this.cancelBtn = el("button", { type: "button", class: "cell-cancel", "aria-label": "Cancel this request",
        title: "Cancel", onclick: () => this.id && cancel(this.id) }, "✕");
      this.body = el("div", { class: "cell-body" });
      this.node = el("article", { class: `cell cell-${type}`, "data-type": type, "data-state": "running" },
        el("header", { class: "cell-head" },
          el("span", { class: `badge badge-${type}` }, el("span", { "aria-hidden": "true" }, kind.icon), " ", kind.label(params)),
          el("code", { class: "cell-title", title }, title.split("\n").find((l) => l.trim()) || title),
          this.meta, this.cancelBtn),
        this.body);
      this.stream = new Stream(this.body);
      append(this.node);
    }
    attach(id) { this.id = id; this.node.dataset.requestId = id; }
    onFrame(f) {
      if (f.type === "stdout" || f.type === "stderr") this.stream.write(f.type, f.text);
      else if (f.type === "result") this.stream.result(f.data || {}, f.main, f.display_id, f.update);
      else if (f.type === "clear_output") this.stream.clear(f.wait);
      else if (f.type === "error") {
        // An error frame for this request: its done usually repeats the message, shown once.
        this.shownErrors = (this.shownErrors || new Set()).add(f.message);
        this.body.append(errorBox({ name: f.code, message: f.message }));
      }
    }
    finish(done) {
      this.cancelBtn.remove();
      const cancelled = done.error && done.error.name === "Cancelled";
      const state = done.ok ? "ok" : cancelled ? "cancelled" : "error";
      this.node.dataset.state = state;
      const bits = [];
      if (done.exit_code !== undefined && done.exit_code !== null) bits.push(el("span", { class: `exit ${done.exit_code === 0 ? "ok" : "bad"}` }, `exit ${done.exit_code}`));
      if (done.iterations !== undefined) bits.push(el("span", null, `${done.iterations} iteration${done.iterations === 1 ? "" : "s"}`));
      bits.push(el("span", { class: "duration", "data-testid": "duration", title: "server-side duration" },
        done.local ? "lost" : formatMs(done.duration_ms)));
      const mark = state === "ok" ? "✓" : state === "cancelled" ? "⊘" : "✗";
      this.meta.replaceChildren(el("span", { class: `mark mark-${state}`, "aria-label": state }, mark), ...bits);
      if (done.truncated) this.body.append(el("div", { class: "notice notice-warn" }, "Output truncated: the run printed more than the server's limit."));
      const repeated = done.error && this.shownErrors && this.shownErrors.has(done.error.message) && !done.error.traceback;
      if (!done.ok && done.error && !cancelled && !repeated) this.body.append(errorBox(done.error));
      if (cancelled) this.body.append(el("div", { class: "notice notice-muted" }, "Cancelled."));
      scrollSoon();
    }
  }

  /** A model request: tokens as Markdown, each executed code block followed by its output. */
  class AssistCell extends Cell {
    constructor(params, title) {
      super("assist", params, title);
      this.iteration = null;
      this.panels = new Map();
      this.lastPanel = null;
      this.newSegment();
    }
    newSegment(text = "") {
      this.seg = { node: this.body.appendChild(el("div", { class: "md model-text" })), text };
      if (text) this.renderSegment();
    }
    renderSegment() {
      const seg = this.seg;
      if (seg.queued) return;
      seg.queued = true;
      requestAnimationFrame(() => { seg.queued = false; renderMarkdown(seg.node, seg.text); scrollSoon(); });
    }
    enterIteration(it) {
      if (it === undefined || it === this.iteration) return;
      const first = this.iteration === null;
      this.iteration = it;
      if (!first) {
        this.body.append(el("div", { class: "iteration" }, el("span", null, `Attempt ${it}: the model saw the error and tries again`)));
        this.newSegment();
      }
    }
    /** The panel an output frame belongs to: its block when the frame says, else the iteration's latest. */
    panel(f) {
      const it = f.iteration;
      return (f.block !== undefined && this.panels.get(`${it}:${f.block}`)) || this.panels.get(it)
        || this.lastPanel || this.addPanel(it, undefined, null);
    }
    addPanel(it, block, code) {
      const status = el("span", { class: "panel-status" }, el("span", { class: "spinner", "aria-hidden": "true" }), "running in the sandbox");
      const node = el("div", { class: "exec-panel", "data-iteration": it ?? "", "data-state": "running" },
        el("div", { class: "panel-head" }, el("span", { class: "panel-arrow", "aria-hidden": "true" }, "↳"), " output", status));
      if (code) node.append(highlight(el("pre", { class: "md-fence" }), code.code.replace(/\n$/, ""), code.language));
      const body = node.appendChild(el("div", { class: "panel-body" }));
      const panel = { node, status, stream: new Stream(body), body, iteration: it };
      this.body.append(node);
      this.panels.set(it, panel);
      if (block !== undefined) this.panels.set(`${it}:${block}`, panel);
      this.lastPanel = panel;
      return panel;
    }
    onFrame(f) {
      switch (f.type) {
        case "token":
          this.enterIteration(f.iteration);
          this.seg.text += f.text || "";
          this.renderSegment();
          break;
        case "code": {
          this.enterIteration(f.iteration);
          // The code frame comes once the closing fence line is complete; text
          // after that fence already belongs after the block's output.
          const cut = endOfLastFence(this.seg.text);
          let rest = "";
          if (cut >= 0) {
            rest = this.seg.text.slice(cut);
            this.seg.text = this.seg.text.slice(0, cut);
            renderMarkdown(this.seg.node, this.seg.text);
          }
          this.addPanel(f.iteration, f.block, cut >= 0 ? null : f);
          this.newSegment(rest);
          break;
        }
        case "stdout":
        case "stderr":
          this.panel(f).stream.write(f.type, f.text);
          break;
        case "result":
          this.panel(f).stream.result(f.data || {}, f.main, f.display_id, f.update);
          break;
        case "clear_output":
          this.panel(f).stream.clear(f.wait);
          break;
        case "attempt": {
          const p = this.panel({ iteration: f.iteration });
          for (const q of new Set(this.panels.values())) {
            if (q.iteration === f.iteration && q !== p && q.node.dataset.state === "running") {
              q.node.dataset.state = "done";
              q.status.replaceChildren("");
            }
          }
          p.node.dataset.state = f.ok ? "ok" : "error";
          p.status.replaceChildren(el("span", { class: `mark mark-${f.ok ? "ok" : "error"}` }, f.ok ? "✓" : "✗"),
            f.ok ? " worked" : " failed", f.duration_ms !== undefined ? ` · ${formatMs(f.duration_ms)}` : "");
          if (!f.ok && f.error) p.body.append(errorBox(typeof f.error === "string" ? { name: "Error", message: f.error } : f.error));
          break;
        }
        default:
          super.onFrame(f);
      }
    }
    finish(done) {
      renderMarkdown(this.seg.node, this.seg.text);
      if (done.cached && this.lastPanel && done.output) {
        this.lastPanel.stream.write("stdout", done.output);
        this.lastPanel.status.replaceChildren("cached result");
      }
      for (const p of new Set(this.panels.values())) {
        if (p.node.dataset.state === "running") {
          p.node.dataset.state = "done";
          p.status.replaceChildren("");
        }
      }
      super.finish(done);
    }
  }

  return { Cell, AssistCell, Stream, errorBox };
}

