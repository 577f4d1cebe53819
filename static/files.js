/* Live files: the /workspace list kept current by `watch_files`, uploads by drag and drop (or the
 * Upload button) in chunks with progress, downloads in chunks (docs/protocol.md, "Live files").
 *
 * makeFiles({ client, section, refresh, notice }) wires the files section of the page:
 *   - one watch_files on /workspace per session: every file_event asks `refresh` (app.js's debounced
 *     list_files) to redraw the list, so the list follows the sandbox without a reload. The watch is
 *     started again on a fresh session, and after it ends for any reason but a cancel;
 *   - a drop (or a pick) uploads each file: upload_file, then upload_chunk one slice of the File at a
 *     time (the page never reads a whole file into memory), its progress bar fed by `progress` frames;
 *   - downloadButton(name) is the ⤓ of a row: download_file, its `file_chunk` frames kept as parts of a
 *     Blob (the browser holds the file once, up to the server's max_file_bytes), saved through an <a download>.
 * It returns { watch, upload, download, downloadButton, stats, lastDownload } (window.groundloop.files).
 */
import { el, formatBytes } from "./render.js";

const WORKSPACE = "/workspace";
const FRAME_SLACK = 4096; // the JSON around a chunk's base64 in an upload_chunk frame
const RETRY_MS = 1000;

function toBase64(bytes) {
  let bin = "";
  for (let i = 0; i < bytes.length; i += 0x8000) bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(bin);
}

function fromBase64(text) {
  const bin = atob(text);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

export function makeFiles({ client, section, refresh, notice }) {
  let limits = {};
  let watchId = null;
  let retry = null;
  const stats = { events: 0, watches: 0, uploads: 0, downloads: 0 };
  let lastDownload = null;

  const transfers = el("ul", { class: "transfers", "data-testid": "transfers", "aria-live": "polite" });
  section.append(transfers);

  /* ---- the live list */

  function watch() {
    clearTimeout(retry);
    if (watchId !== null && client.has(watchId)) return;
    const handle = client.request("watch_files", { path: WORKSPACE }, {
      onFrame: (f) => {
        if (f.type === "file_event") {
          stats.events += 1;
          refresh();
        } else if (f.type === "watching") {
          section.dataset.live = "true";
          refresh(); // what changed before the watch began
        }
      },
    });
    watchId = handle.id;
    stats.watches += 1;
    handle.done.then((d) => {
      if (watchId !== handle.id) return;
      watchId = null;
      delete section.dataset.live;
      // A lost sandbox or session ends the watch: watch again (a fresh session's `ready` does too).
      if (d.error?.name !== "Cancelled") retry = setTimeout(() => { if (client.state === "open") watch(); }, RETRY_MS);
    });
  }

  client.on("ready", ({ frame, fresh }) => {
    limits = frame.limits || {};
    if (fresh) watch();
  });

  /* ---- transfers */

  function row(kind, name, total) {
    const bar = el("progress", { max: Math.max(total, 1), value: 0 });
    const state = el("span", { class: "transfer-state" }, "0 %");
    const li = el("li", { class: `transfer transfer-${kind}`, "data-name": name, "data-state": "running" },
      el("span", { class: "transfer-kind", "aria-hidden": "true" }, kind === "upload" ? "↑" : "↓"),
      el("span", { class: "file-name" }, name), bar, state);
    transfers.prepend(li);
    while (transfers.childElementCount > 8) transfers.lastElementChild.remove();
    return {
      progress(bytes) {
        bar.value = bytes;
        state.textContent = `${Math.floor((100 * bytes) / Math.max(total, 1))} %`;
      },
      end(ok, text) {
        li.dataset.state = ok ? "ok" : "error";
        state.textContent = text;
        if (ok) bar.value = bar.max;
      },
    };
  }

  function chunkBytes() {
    // Raw bytes per chunk: the server's suggestion, within one frame once base64 grows it by 4/3.
    const frame = limits.max_message_bytes || 1 << 20;
    const fit = Math.floor(((frame - FRAME_SLACK) * 3) / 4);
    return Math.max(1024, Math.min(limits.transfer_chunk_bytes || 1 << 20, fit));
  }

  async function upload(file, dir = WORKSPACE) {
    const path = `${dir}/${file.name}`;
    const ui = row("upload", file.name, file.size);
    if (limits.max_file_bytes && file.size > limits.max_file_bytes) {
      ui.end(false, `over ${formatBytes(limits.max_file_bytes)}`);
      notice(`${file.name} is ${formatBytes(file.size)}: over the sandbox's limit of ${formatBytes(limits.max_file_bytes)}.`, "error");
      return null;
    }
    const handle = client.request("upload_file", { path, size: file.size }, {
      onFrame: (f) => { if (f.type === "progress") ui.progress(f.bytes); },
    });
    const step = chunkBytes();
    for (let offset = 0; offset < file.size;) {
      const bytes = new Uint8Array(await file.slice(offset, offset + step).arrayBuffer());
      const d = await client.request("upload_chunk", { upload: handle.id, offset, content: toBase64(bytes) }).done;
      if (!d.ok) {
        if (client.has(handle.id)) void client.cancel(handle.id);
        break;
      }
      offset += bytes.length;
    }
    const done = await handle.done;
    stats.uploads += 1;
    if (done.ok) ui.end(true, formatBytes(done.size));
    else {
      ui.end(false, done.error?.name || "failed");
      notice(`Upload of ${file.name} failed: ${done.error?.message || done.error?.name}`, "error");
    }
    refresh();
    return done;
  }

  async function download(name) {
    const path = `${WORKSPACE}/${name}`;
    const parts = [];
    let ui = null;
    let got = 0;
    const handle = client.request("download_file", { path }, {
      onFrame: (f) => {
        if (f.type !== "file_chunk") return;
        if (!ui) ui = row("download", name, f.size);
        const bytes = fromBase64(f.content);
        parts.push(bytes);
        got += bytes.length;
        ui.progress(got);
      },
    });
    const done = await handle.done;
    stats.downloads += 1;
    if (!ui) ui = row("download", name, 0);
    if (!done.ok) {
      ui.end(false, done.error?.name || "failed");
      notice(`Download of ${name} failed: ${done.error?.message || done.error?.name}`, "error");
      return done;
    }
    ui.end(true, formatBytes(done.size));
    const blob = new Blob(parts, { type: "application/octet-stream" });
    lastDownload = { name, size: blob.size, sha256: done.sha256, blob };
    const url = URL.createObjectURL(blob);
    const a = el("a", { href: url, download: name, hidden: true });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60_000);
    return done;
  }

  function downloadButton(name) {
    return el("button", { type: "button", class: "btn btn-ghost btn-small file-download", "data-testid": "file-download",
      "data-download": name, title: `Download ${name}`, "aria-label": `Download ${name}`,
      onclick: (e) => { e.stopPropagation(); void download(name); } }, "⤓");
  }

  /* ---- drop zone and picker */

  const picker = el("input", { type: "file", multiple: true, hidden: true, "data-testid": "upload-input",
    onchange: () => { for (const f of picker.files) void upload(f); picker.value = ""; } });
  const pick = el("button", { type: "button", class: "btn btn-ghost btn-small", "data-testid": "upload",
    title: "Upload files to /workspace (or drop them on this panel)", onclick: () => picker.click() }, "Upload");
  section.querySelector(".files-head")?.append(pick, picker);

  let depth = 0; // dragenter/dragleave fire for every child: count them
  section.addEventListener("dragenter", (e) => {
    if (!e.dataTransfer?.types?.includes("Files")) return;
    e.preventDefault();
    depth += 1;
    section.dataset.drop = "true";
  });
  section.addEventListener("dragover", (e) => {
    if (!e.dataTransfer?.types?.includes("Files")) return;
    e.preventDefault();
    e.dataTransfer.dropEffect = "copy";
  });
  section.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (!depth) delete section.dataset.drop;
  });
  section.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    delete section.dataset.drop;
    for (const f of e.dataTransfer?.files || []) void upload(f);
  });

  return {
    watch,
    upload,
    download,
    downloadButton,
    stats: () => ({ ...stats, watching: watchId !== null && client.has(watchId) }),
    lastDownload: () => lastDownload,
  };
}
