/**
 * groundloop client: one WebSocket, one resumable session (wire protocol v1, docs/protocol.md).
 *
 * Runs in browsers (no dependencies) and in node (the global WebSocket of node >= 22, else the `ws` package).
 *
 *   const session = await connect("ws://127.0.0.1:8000/v1/ws", { token: "tok1" });
 *   const ex = await session.runCode("print('hi')\n6 * 7", { onStdout: (t) => console.log(t) });
 *   ex.output.stdout  // "hi\n";  ex.results[0].data["text/plain"]  // "42"
 *
 * A dropped socket reconnects to `/v1/ws?session=<id>&last_seq=<n>`; frames already processed are dropped by
 * seq, so every line reaches the caller exactly once; frames the server had evicted come back as a `gap`.
 *
 * A server that drains (a `draining` frame, then close 1012 once the session's requests are done: docs/protocol.md
 * section 10) is leaving: new requests wait instead of being refused there, and after the 1012 the client opens a
 * fresh session at once (behind a fleet's proxy, on another server) instead of resuming; its `ready` event says
 * `drained`. A new session refused by a draining server (close 4503) is tried again with the usual backoff.
 *
 * One runtime source file on purpose: `tsc` then emits one ES module, which the page serves as it is (no bundler);
 * the types (frames, options, results) are in types.ts, which compiles to nothing.
 */
export const PROTOCOL = "groundloop.v1";
const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/; // what a Sec-WebSocket-Protocol token may hold
const CLOSE = { badResume: 4400, unauthorized: 4401, forbidden: 4403, notFound: 4404, takenOver: 4409, sessionClosed: 4410, tooMany: 4429, drop: 4000, restart: 1012, draining: 4503 };
const OPEN = 1; // WebSocket.OPEN, the same in every implementation
// node 18 has EventTarget but no global CustomEvent.
const DetailEvent = globalThis.CustomEvent ??
    class extends Event {
        detail;
        constructor(type, init) {
            super(type);
            this.detail = init.detail;
        }
    };
/** A request ended with `ok: false` where a value was expected (files, contexts, processes). */
export class RequestError extends Error {
    done;
    errorName;
    traceback;
    constructor(done) {
        super(`${done.error?.name ?? "Error"}: ${done.error?.message ?? "request failed"}`);
        this.done = done;
        this.name = "RequestError";
        this.errorName = done.error?.name ?? "Error";
        this.traceback = done.error?.traceback;
    }
}
/** The session could not be (re)established: refused, closed, or the server is unreachable. */
export class ConnectionError extends Error {
    state;
    code;
    constructor(message, state, code) {
        super(message);
        this.state = state;
        this.code = code;
        this.name = "ConnectionError";
    }
}
/** A bounded queue that is async-iterable; overflowing it fails the iteration instead of losing frames. */
class FrameQueue {
    max;
    items = [];
    waiter = null;
    ended = false;
    failure = null;
    constructor(max) {
        this.max = max;
    }
    push(item) {
        if (this.ended)
            return;
        if (this.items.length >= this.max) {
            this.fail(new Error(`more than ${this.max} frames buffered and not read`));
            return;
        }
        this.items.push(item);
        this.wake();
    }
    end() {
        this.ended = true;
        this.wake();
    }
    fail(err) {
        this.failure = err;
        this.end();
    }
    wake() {
        const w = this.waiter;
        this.waiter = null;
        w?.();
    }
    async *[Symbol.asyncIterator]() {
        for (;;) {
            if (this.failure)
                throw this.failure;
            if (this.items.length) {
                yield this.items.shift();
                continue;
            }
            if (this.ended)
                return;
            await new Promise((r) => (this.waiter = r));
        }
    }
}
/** One request in flight: `await handle.done`, or `for await (const frame of handle)` (with `iterate`). */
export class RequestHandle {
    id;
    type;
    session;
    onFrame;
    done;
    /** Milliseconds from the call to its `done` (set when done). */
    elapsedMs = null;
    gap = false;
    sent = false;
    resolveDone;
    t0 = performance.now();
    queue;
    constructor(id, type, session, onFrame, maxBuffered) {
        this.id = id;
        this.type = type;
        this.session = session;
        this.onFrame = onFrame;
        this.done = new Promise((r) => (this.resolveDone = r));
        this.queue = maxBuffered ? new FrameQueue(maxBuffered) : null;
    }
    /** @internal */
    deliver(frame) {
        if (frame.type === "done") {
            this.elapsedMs = performance.now() - this.t0;
        }
        try {
            this.onFrame?.(frame);
        }
        catch (err) {
            console.error(err); // a caller's callback must not break the session's frame loop
        }
        this.queue?.push(frame);
        if (frame.type === "done") {
            this.queue?.end();
            this.resolveDone(frame);
        }
    }
    cancel() {
        return this.session.cancel(this.id);
    }
    [Symbol.asyncIterator]() {
        if (!this.queue)
            throw new Error("this request was not made with { iterate: true } (use session.stream)");
        return this.queue[Symbol.asyncIterator]();
    }
}
/** A background process: its output arrives after `startProcess` resolved, until `exit`. */
export class ProcessHandle {
    requestId;
    session;
    callbacks;
    processId = "";
    pid = 0;
    exitCode = null;
    exited;
    resolveExit;
    queue;
    constructor(requestId, session, callbacks, maxBuffered) {
        this.requestId = requestId;
        this.session = session;
        this.callbacks = callbacks;
        this.exited = new Promise((r) => (this.resolveExit = r));
        this.queue = new FrameQueue(maxBuffered);
    }
    /** @internal */
    deliver(frame) {
        if (frame.type === "stdout")
            this.callbacks.onStdout?.(frame.text, frame);
        else if (frame.type === "stderr")
            this.callbacks.onStderr?.(frame.text, frame);
        else if (frame.type !== "exit")
            return;
        this.queue.push(frame);
        if (frame.type === "exit")
            this.finish(frame.exit_code);
    }
    /** @internal the process is gone without an exit frame (sandbox replaced, session lost) */
    finish(code) {
        this.exitCode = code;
        this.queue.end();
        this.resolveExit(code);
    }
    kill(signal) {
        return this.session.killProcess(this.processId, signal);
    }
    [Symbol.asyncIterator]() {
        return this.queue[Symbol.asyncIterator]();
    }
}
const lost = (id, name, message) => ({ type: "done", seq: 0, id, ok: false, duration_ms: 0, local: true, error: { name, message } });
/** A groundloop session over one (re)connecting WebSocket. `connect()` makes one and waits for `ready`. */
export class Session extends EventTarget {
    url;
    options;
    state = "idle";
    reason = "";
    sessionId = null;
    lastSeq = 0;
    ready = null;
    /** The `draining` frame of the current session while its server drains it (null otherwise). */
    draining = null;
    autoReconnect;
    stats = { duplicates: 0, seqJumps: 0, resumes: 0, fresh: 0, expired: 0, drained: 0, gaps: 0, frames: 0 };
    token;
    ws = null;
    imported;
    importing = false;
    attempt = 0;
    stopped = false;
    expiredPending = false;
    drainedPending = false;
    /** The retry under way is after a draining server refused a new session: not a failure to connect. */
    drainRetry = false;
    timer;
    pingTimer;
    pending = new Map();
    processes = new Map();
    queue = [];
    idBase = Date.now().toString(36);
    n = 0;
    constructor(url, options = {}) {
        super();
        this.url = url;
        this.options = options;
        this.token = options.token ?? "";
        this.autoReconnect = options.reconnect ?? true;
    }
    /* ---- connection ---------------------------------------------------------------------------------------- */
    /** Start connecting (or resuming); returns at once. Requests made meanwhile are queued. */
    open() {
        this.stopped = false;
        clearTimeout(this.timer);
        void this.openSocket();
    }
    /** The `ready` frame of the current connection, once open; rejects if the session closes or is refused. */
    whenReady(opts = {}) {
        if (this.state === "open" && this.ready)
            return Promise.resolve(this.ready);
        return new Promise((resolve, reject) => {
            const check = () => {
                const { state, reason } = this;
                if (state === "open" && this.ready)
                    resolve(this.ready);
                else if (state === "closed" ||
                    state === "unauthorized" ||
                    state === "offline" ||
                    (opts.failOnRetry && state === "reconnecting" && !this.drainRetry)) {
                    reject(new ConnectionError(reason || state, state));
                }
                else
                    return;
                this.removeEventListener("state", check);
            };
            this.addEventListener("state", check);
            check();
        });
    }
    setToken(token) {
        this.token = token;
    }
    /** Forget the session and start a fresh one (e.g. after a new token); requests sent on the old one end lost. */
    restart() {
        this.forgetSession("restarted");
        this.closeSocket(1000, "restart");
        this.attempt = 0;
        this.open();
    }
    /** Close for good: no reconnect; requests in flight end with `SessionClosed`. */
    close() {
        this.stopped = true;
        clearTimeout(this.timer);
        this.closeSocket(1000, "client closed");
        this.endAll("SessionClosed", "the client closed the session", true);
        this.setState("closed", "closed by the client");
    }
    /** Drop the socket as a network failure would; the session resumes (unless `autoReconnect` is off). */
    dropConnection() {
        this.ws?.close(CLOSE.drop, "simulated drop");
    }
    async openSocket() {
        if (this.ws)
            return;
        // Looked up at every connection, not once: a page's WebSocket may be wrapped after this module loaded.
        let WS = this.options.WebSocket ?? globalThis.WebSocket ?? this.imported;
        if (!WS) {
            if (this.importing)
                return; // the first call goes on after the import
            this.importing = true;
            try {
                const name = "ws"; // a variable: bundlers and tsc leave the browser build alone
                WS = this.imported = (await import(name)).default;
            }
            catch {
                this.setState("closed", "no WebSocket: use node >= 22 or install the `ws` package");
                return;
            }
            finally {
                this.importing = false;
            }
            if (this.ws || this.stopped)
                return;
        }
        const protocols = [PROTOCOL];
        const header = this.options.auth === "header";
        if (this.token && !header) {
            if (!TOKEN_CHARS.test(this.token)) {
                this.setState("closed", "the token has characters a WebSocket subprotocol cannot carry");
                return;
            }
            protocols.push(`bearer.${this.token}`);
        }
        const resuming = this.sessionId !== null;
        const url = resuming ? `${this.url}${this.url.includes("?") ? "&" : "?"}session=${encodeURIComponent(this.sessionId)}&last_seq=${this.lastSeq}` : this.url;
        this.setState("connecting", resuming ? "resuming session" : "new session");
        let ws;
        try {
            const extra = header && this.token ? { headers: { Authorization: `Bearer ${this.token}` } } : undefined;
            ws = (extra ? new WS(url, protocols, extra) : new WS(url, protocols));
        }
        catch (err) {
            this.setState("closed", String(err?.message ?? err));
            return;
        }
        this.ws = ws;
        ws.binaryType = "arraybuffer";
        ws.resuming = resuming;
        ws.onopen = () => (ws.opened = true);
        ws.onmessage = (ev) => this.onMessage(ws, ev.data);
        ws.onclose = (ev) => this.onClose(ws, ev.code, ev.reason);
        ws.onerror = (ev) => {
            // `ws` says why an upgrade failed ("Unexpected server response: 401"); browsers never do.
            const m = /response: (\d{3})/.exec(String(ev?.message ?? ""));
            if (m)
                ws.refusal = Number(m[1]);
        };
    }
    closeSocket(code, reason) {
        const ws = this.ws;
        if (!ws)
            return;
        this.ws = null;
        ws.onmessage = ws.onclose = ws.onerror = null;
        try {
            ws.close(code, reason);
        }
        catch {
            /* already closing */
        }
        clearInterval(this.pingTimer);
    }
    onClose(ws, code, reason) {
        if (ws !== this.ws)
            return;
        this.ws = null;
        clearInterval(this.pingTimer);
        if (this.stopped)
            return;
        if (code === CLOSE.unauthorized || code === CLOSE.forbidden || ws.refusal === 401 || ws.refusal === 403) {
            this.refused(ws.refusal === 403 || code === CLOSE.forbidden ? "the server refused the page's origin" : "the server refused the token");
            return;
        }
        if (code === CLOSE.draining || ws.drainRefusal !== undefined) {
            // The server takes no new sessions (it is shutting down); a fleet's proxy sends the next try elsewhere.
            this.retry(ws, code, reason, ws.drainRefusal ?? "this server takes no new sessions (draining)");
            return;
        }
        if (code === CLOSE.restart && this.draining) {
            // The server drained this session and is going away: nothing is left there to resume.
            this.drained();
            return;
        }
        if ((code === CLOSE.notFound || code === CLOSE.badResume) && ws.resuming && !ws.gotReady) {
            this.sessionExpired();
            return;
        }
        if (code === CLOSE.takenOver) {
            // Another tab or client resumed this session: do not fight over it.
            this.stop("another connection took over this session");
            return;
        }
        if (code === CLOSE.tooMany) {
            this.stop("too many sessions for this user");
            return;
        }
        if (code === CLOSE.sessionClosed) {
            this.sessionExpired();
            return;
        }
        if (!ws.opened && !ws.resuming && ws.refusal === undefined && this.options.healthUrl !== null) {
            void this.probeRefusal(); // a browser sees an HTTP 401/403 as a network failure
            return;
        }
        this.retry(ws, code, reason);
    }
    refused(reason) {
        this.stopped = true;
        this.endAll("Unauthorized", reason, true);
        this.setState("unauthorized", reason);
    }
    stop(reason) {
        this.stopped = true;
        this.endAll("SessionLost", reason, false);
        this.setState("closed", reason);
    }
    async probeRefusal() {
        let up = false;
        try {
            const u = new URL(this.url);
            u.protocol = u.protocol === "wss:" ? "https:" : "http:";
            u.pathname = "/healthz";
            u.search = "";
            up = (await fetch(this.options.healthUrl ?? u.href, { cache: "no-store" })).ok;
        }
        catch {
            up = false;
        }
        if (this.stopped || this.ws)
            return;
        if (up)
            this.refused("the server refused the connection: check the token (or the page's origin)");
        else
            this.retry(null, 1006, "");
    }
    retry(ws, code, reason, drainRefusal) {
        this.drainRetry = drainRefusal !== undefined;
        if (!this.autoReconnect) {
            this.setState("offline", "connection lost (reconnect is off)");
            return;
        }
        this.attempt = ws?.gotReady ? 0 : this.attempt + 1;
        const { initialMs = 300, maxMs = 10_000 } = this.options.backoff ?? {};
        const delayMs = Math.round(Math.min(maxMs, initialMs * 2 ** Math.min(this.attempt, 16)) * (0.8 + 0.4 * Math.random()));
        const why = drainRefusal ??
            (code === CLOSE.drop ? "connection dropped" : code === 1006 ? "connection lost" : `closed (${code}${reason ? ": " + reason : ""})`);
        this.setState("reconnecting", why, { delayMs });
        this.timer = setTimeout(() => void this.openSocket(), delayMs);
    }
    sessionExpired() {
        if (this.draining) {
            // Gone because its server drained it (after a drop, the resume found it closed): not an expiry.
            this.drained();
            return;
        }
        if (!this.options.renewExpired) {
            this.stop("the session expired on the server");
            return;
        }
        this.stats.expired += 1;
        this.expiredPending = true;
        this.forgetSession("the session expired on the server");
        this.closeSocket(1000, "session expired");
        void this.openSocket();
    }
    /**
     * The server drained the session: a fresh one at once, whatever `renewExpired` says (the protocol's answer to a
     * drain, and nothing was lost: the requests in flight had their `done`, the ones made since are still queued).
     */
    drained() {
        this.stats.drained += 1;
        this.drainedPending = true;
        this.forgetSession("the server drained the session");
        this.closeSocket(1000, "session drained");
        this.attempt = 0;
        if (!this.autoReconnect) {
            this.setState("offline", "the server drained the session (reconnect is off)");
            return;
        }
        void this.openSocket();
    }
    /** Requests sent on the session end lost; requests still queued go to the next session. */
    forgetSession(why) {
        this.sessionId = null;
        this.lastSeq = 0;
        this.draining = null;
        this.endAll("SessionLost", `the request was lost: ${why}`, false);
    }
    endAll(name, message, queuedToo) {
        for (const [id, p] of [...this.pending]) {
            if (!p.sent && !queuedToo)
                continue;
            this.pending.delete(id);
            p.deliver(lost(id, name, message));
        }
        if (queuedToo)
            this.queue = [];
        for (const proc of this.processes.values())
            proc.finish(null);
        this.processes.clear();
    }
    setState(state, reason, extra = {}) {
        this.state = state;
        this.reason = reason;
        this.emit("state", { state, reason, ...extra });
    }
    emit(type, detail) {
        this.dispatchEvent(new DetailEvent(type, { detail }));
    }
    /** Subscribe to a session event; returns the unsubscribe function. */
    on(type, fn) {
        const listener = (e) => fn(e.detail);
        this.addEventListener(type, listener);
        return () => this.removeEventListener(type, listener);
    }
    /* ---- frames in ------------------------------------------------------------------------------------------- */
    onMessage(ws, data) {
        if (ws !== this.ws)
            return;
        let frame;
        try {
            const text = typeof data === "string" ? data : new TextDecoder().decode(data);
            frame = JSON.parse(text);
        }
        catch {
            return;
        }
        if (!frame || typeof frame !== "object")
            return;
        this.stats.frames += 1;
        if (frame.type === "ready") {
            this.onReady(ws, frame);
            return;
        }
        if (!ws.gotReady) {
            // Before ready only a refusal comes (seq 0): an unknown session, no sandbox, too many sessions.
            if (frame.type === "error" && frame.code === "not_found" && ws.resuming)
                this.sessionExpired();
            else if (frame.type === "error" && frame.code === "draining")
                ws.drainRefusal = frame.message || "the server is draining";
            else if (frame.type === "error" && frame.code === "unauthorized")
                this.refused(frame.message || "unauthorized");
            else
                this.emit("frame", { frame });
            return;
        }
        if (typeof frame.seq === "number" && frame.seq > 0) {
            if (frame.seq <= this.lastSeq) {
                this.stats.duplicates += 1;
                return;
            }
            if (frame.seq !== this.lastSeq + 1)
                this.stats.seqJumps += 1;
            this.lastSeq = frame.seq;
        }
        this.dispatch(frame);
    }
    onReady(ws, frame) {
        const resumed = !!frame.resumed && frame.session_id === this.sessionId;
        const drained = this.drainedPending;
        const expired = !drained && (this.expiredPending || (this.sessionId !== null && !resumed));
        this.expiredPending = false;
        this.drainedPending = false;
        this.drainRetry = false;
        if (resumed)
            this.stats.resumes += 1;
        else {
            if (this.sessionId)
                this.forgetSession("the server started a new session");
            this.stats.fresh += 1;
        }
        ws.gotReady = true;
        this.attempt = 0;
        this.ready = frame;
        this.sessionId = frame.session_id;
        this.lastSeq = frame.seq;
        this.setState("open", resumed ? "resumed" : "connected");
        this.emit("ready", { frame, fresh: !resumed, expired, drained });
        this.flushQueue();
        this.startPings();
    }
    dispatch(frame) {
        if (frame.type === "gap") {
            this.stats.gaps += 1;
            for (const p of this.pending.values())
                p.gap = true;
            this.emit("gap", { frame });
        }
        else if (frame.type === "draining") {
            this.draining = frame;
            this.emit("draining", { frame });
        }
        else if (frame.type === "sandbox_replaced") {
            for (const proc of this.processes.values())
                proc.finish(null); // its processes died with it
            this.processes.clear();
        }
        const id = frame.id;
        const p = id === undefined ? undefined : this.pending.get(id);
        if (p) {
            if (frame.type === "done")
                this.pending.delete(id);
            p.deliver(frame);
            return;
        }
        const proc = id === undefined ? undefined : this.processes.get(id);
        if (proc && (frame.type === "stdout" || frame.type === "stderr" || frame.type === "exit")) {
            proc.deliver(frame);
            if (frame.type === "exit")
                this.processes.delete(id);
            return;
        }
        this.emit("frame", { frame });
    }
    /* ---- frames out ------------------------------------------------------------------------------------------ */
    /** Is this request still in flight (or queued)? */
    has(id) {
        return this.pending.has(id);
    }
    /** The requests in flight or queued, oldest first. */
    inflight() {
        return [...this.pending.values()];
    }
    /** Send any request of the protocol; the handle's `done` resolves with its terminal frame. */
    request(type, params = {}, opts = {}) {
        this.n += 1;
        const id = `${type === "ping" ? "p" : "r"}${this.idBase}-${this.n}`;
        const max = opts.iterate ? (this.options.maxBufferedFrames ?? 100_000) : null;
        const handle = new RequestHandle(id, type, this, opts.onFrame, max);
        this.pending.set(id, handle);
        const frame = {};
        for (const [k, v] of Object.entries(params))
            if (v !== undefined)
                frame[k] = v;
        frame.type = type;
        frame.id = id;
        const { signal } = opts;
        if (signal?.aborted) {
            this.pending.delete(id);
            handle.deliver(lost(id, "Cancelled", "aborted before it was sent"));
            return handle;
        }
        if (signal) {
            const onAbort = () => void this.cancel(id);
            signal.addEventListener("abort", onAbort, { once: true });
            void handle.done.then(() => signal.removeEventListener("abort", onAbort));
        }
        this.send(frame);
        return handle;
    }
    /** `request` with `for await` over its frames (the `done` last). */
    stream(type, params = {}, opts = {}) {
        return this.request(type, params, { ...opts, iterate: true });
    }
    /** Cancel a request; resolves whether the server still had it. Its own `done` then says `Cancelled`. */
    async cancel(target) {
        const p = this.pending.get(target);
        if (!p)
            return false;
        if (!p.sent) {
            // Still queued here: it never reaches the server.
            this.queue = this.queue.filter((f) => f.id !== target);
            this.pending.delete(target);
            p.deliver(lost(target, "Cancelled", "cancelled before it was sent"));
            return true;
        }
        const done = await this.request("cancel", { target }).done;
        return done.ok && done.found === true;
    }
    send(frame) {
        const ws = this.ws;
        // A draining session refuses new requests (only `ping` and `cancel` still work): they wait for the next one.
        const held = this.draining !== null && frame.type !== "cancel" && frame.type !== "ping";
        if (ws && ws.readyState === OPEN && ws.gotReady && !held) {
            ws.send(JSON.stringify(frame));
            const p = this.pending.get(frame.id);
            if (p)
                p.sent = true;
        }
        else {
            this.queue.push(frame);
        }
    }
    flushQueue() {
        const frames = this.queue;
        this.queue = [];
        for (const f of frames) {
            // A queued cancel whose target already ended has nothing left to do.
            if (f.type === "cancel" && !this.pending.has(f.target)) {
                const p = this.pending.get(f.id);
                this.pending.delete(f.id);
                p?.deliver({ type: "done", seq: 0, id: f.id, ok: true, duration_ms: 0, local: true, found: false });
                continue;
            }
            this.send(f);
        }
    }
    startPings() {
        clearInterval(this.pingTimer);
        const every = this.options.pingIntervalMs ?? 0;
        if (every <= 0)
            return;
        const beat = () => {
            if (this.state === "open")
                this.ping().then((ms) => this.emit("rtt", { ms }), () => undefined);
        };
        beat();
        this.pingTimer = setInterval(beat, every);
    }
    /* ---- the protocol's requests ------------------------------------------------------------------------------- */
    /** Round-trip time of a `ping`, in milliseconds. */
    async ping() {
        const h = this.request("ping");
        const done = await h.done;
        if (!done.ok)
            throw new RequestError(done);
        return h.elapsedMs ?? 0;
    }
    collect(type, params, cb) {
        // Folded as a notebook shows them: an update replaces the results of its display id, clear_output drops
        // what came before it (with `wait`: when the next output comes). Every frame reaches the callbacks.
        // (In assist a clear is its block's: the fold keeps every block's output.)
        const output = { stdout: "", stderr: "" };
        let results = [];
        let pendingClear = false;
        const shown = new Set(); // the display ids this request showed, cleared ones too
        const clear = () => {
            output.stdout = output.stderr = "";
            results = [];
            pendingClear = false;
        };
        const handle = this.request(type, params, {
            signal: cb.signal,
            onFrame: (f) => {
                if (f.type === "clear_output") {
                    if (f.iteration !== undefined) {
                        // assist: see above
                    }
                    else if (f.wait)
                        pendingClear = true;
                    else
                        clear();
                }
                else if (f.type === "stdout" || f.type === "stderr") {
                    if (pendingClear)
                        clear();
                    output[f.type] += f.text;
                    (f.type === "stdout" ? cb.onStdout : cb.onStderr)?.(f.text, f);
                }
                else if (f.type === "result") {
                    const r = { data: f.data ?? {}, main: !!f.main };
                    if (f.display_id)
                        r.displayId = f.display_id;
                    if (f.display_id && f.update) {
                        if (shown.has(f.display_id)) {
                            // this request's display: replaced in place (or nothing, when a clear took it)
                            results = results.map((x) => (x.displayId === f.display_id ? r : x));
                        }
                        else {
                            r.update = true; // a display of an earlier request
                            results.push(r);
                        }
                    }
                    else {
                        if (pendingClear)
                            clear();
                        if (f.display_id)
                            shown.add(f.display_id);
                        results.push(r);
                    }
                    cb.onResult?.(r, f);
                }
                cb.onFrame?.(f);
            },
        });
        return handle.done.then((done) => ({
            id: handle.id,
            ok: done.ok,
            output,
            results,
            error: done.ok ? null : (done.error ?? { name: "Error", message: "request failed" }),
            truncated: !!done.truncated,
            gap: handle.gap,
            durationMs: done.duration_ms,
            done,
        }));
    }
    /** Run code in a persistent context (default: the session's context of the language). */
    async runCode(code, opts = {}) {
        const { language, context, timeoutS, env, fresh, ...cb } = opts;
        const ex = await this.collect("run_code", { code, language, context, timeout_s: timeoutS, env, fresh: fresh || undefined }, cb);
        return { ...ex, context: ex.done.context };
    }
    /** Run a shell command (`/bin/sh -c`). */
    async exec(command, opts = {}) {
        const { cwd, env, timeoutS, ...cb } = opts;
        const { results: _r, ...ex } = await this.collect("exec", { command, cwd, env, timeout_s: timeoutS }, cb);
        return { ...ex, exitCode: ex.done.exit_code ?? null };
    }
    /** Ask the model: its tokens stream, its code runs here, a failed try goes back to it. */
    async assist(prompt, opts = {}) {
        const { language, maxIterations, context, onToken, onCode, onAttempt, ...cb } = opts;
        let text = "";
        const attempts = [];
        const onFrame = (f) => {
            if (f.type === "token") {
                text += f.text;
                onToken?.(f.text, f);
            }
            else if (f.type === "code")
                onCode?.(f);
            else if (f.type === "attempt") {
                attempts.push(f);
                onAttempt?.(f);
            }
        };
        const ex = await this.collect("assist", { prompt, language, max_iterations: maxIterations, context }, { ...cb, onFrame });
        const d = ex.done;
        return {
            ...ex,
            text,
            attempts,
            iterations: d.iterations ?? 0,
            code: d.code ?? "",
            cached: !!d.cached,
            usage: d.usage,
            timings: d.timings,
        };
    }
    /** A request whose `done` carries the answer; `ok: false` throws `RequestError`. */
    async call(type, params = {}, signal) {
        const done = await this.request(type, params, { signal }).done;
        if (!done.ok)
            throw new RequestError(done);
        return done;
    }
    async createContext(opts = {}) {
        return (await this.call("create_context", opts)).context_id;
    }
    async deleteContext(context) {
        await this.call("delete_context", { context });
    }
    /** A fresh worker for the context: its state is gone (a run in progress ends `ContextRestarted`). */
    async restartContext(context) {
        await this.call("restart_context", { context });
    }
    /** Set the session's environment (under every later run, exec and process); resolves with its names. */
    async setEnv(env, opts = {}) {
        return (await this.call("set_env", { env, replace: opts.replace })).names;
    }
    async listContexts() {
        return (await this.call("list_contexts")).contexts;
    }
    /** Write a file: a string as UTF-8, bytes as base64. Resolves with its size. */
    async writeFile(path, content) {
        const params = typeof content === "string" ? { path, content } : { path, content: toBase64(content), encoding: "base64" };
        return (await this.call("write_file", params)).size;
    }
    /** Read a file as text (`utf-8`), or as it decodes (default: text if it is UTF-8, else base64). */
    async readFile(path, opts = {}) {
        const d = await this.call("read_file", { path, encoding: opts.encoding });
        return { content: d.content, encoding: d.encoding, size: d.size };
    }
    async readFileBytes(path) {
        return fromBase64((await this.readFile(path, { encoding: "base64" })).content);
    }
    async listFiles(path) {
        return (await this.call("list_files", { path })).entries;
    }
    async deleteFile(path, opts = {}) {
        await this.call("delete_file", { path, recursive: opts.recursive });
    }
    async mkdir(path) {
        await this.call("mkdir", { path });
    }
    /** Start a background process; its output streams to the handle (callbacks, `for await`) until it exits. */
    async startProcess(command, opts = {}) {
        let proc = null;
        const h = this.request("start_process", { command, cwd: opts.cwd, env: opts.env, process_id: opts.processId }, {
            onFrame: (f) => {
                if (f.type !== "done")
                    proc?.deliver(f);
                else if (f.ok && proc) {
                    // Now, not after `await`: the process's first lines may be in the same read as this `done`.
                    proc.processId = f.process_id;
                    proc.pid = f.pid;
                    this.processes.set(h.id, proc);
                }
            },
        });
        proc = new ProcessHandle(h.id, this, opts, this.options.maxBufferedFrames ?? 100_000);
        const done = await h.done;
        if (!done.ok)
            throw new RequestError(done);
        return proc;
    }
    async killProcess(processId, signal) {
        await this.call("kill_process", { process_id: processId, signal });
    }
    async listProcesses() {
        return (await this.call("list_processes")).processes;
    }
}
/** Open a session and wait for its `ready` frame; rejects (ConnectionError) when refused or unreachable. */
export async function connect(url, options = {}) {
    const session = new Session(url, options);
    const ready = session.whenReady({ failOnRetry: true });
    session.open();
    try {
        await ready;
    }
    catch (err) {
        session.close();
        throw err;
    }
    return session;
}
function toBase64(bytes) {
    let s = "";
    for (let i = 0; i < bytes.length; i += 0x8000)
        s += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
    return btoa(s);
}
function fromBase64(b64) {
    const s = atob(b64);
    const out = new Uint8Array(s.length);
    for (let i = 0; i < s.length; i++)
        out[i] = s.charCodeAt(i);
    return out;
}
