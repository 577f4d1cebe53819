/* groundloop.v1 browser client: one WebSocket, one session, resumable.
 *
 * This file is the reference client for browser IDE authors. It knows the wire
 * protocol and nothing of the page (see app.js for the page).
 *
 * Lifecycle
 *   idle -> connecting -> open -> (drop) -> reconnecting -> connecting -> open ...
 *                                       \-> closed (close() called, or a fatal refusal)
 *   - connect(): opens `/v1/ws` with the subprotocols `groundloop.v1` and, when a
 *     token is set, `bearer.<token>` (browsers cannot set an Authorization header).
 *   - The state is `open` only once the server's `ready` frame has arrived.
 *   - After a drop, the client reconnects with exponential backoff (300 ms doubling
 *     up to 10 s, +-20 % jitter) to `/v1/ws?session=<id>&last_seq=<n>`, where n is
 *     the seq of the last frame it processed. The server answers `ready` with
 *     `resumed: true`, replays the missed frames renumbered after n (a `gap`
 *     frame first if some were evicted), then streams new ones. In-flight
 *     requests survive: their frames and their `done` arrive after the resume.
 *   - If the session is gone (error `not_found`, close code 4404 or 4410), the client
 *     starts a fresh session and reports `expired`; the requests that were in
 *     flight end locally with error `SessionLost`.
 *   - A server that drains (a `draining` frame, then close 1012 once its requests
 *     are done) is leaving: the client does not try to resume there, it opens a
 *     fresh session at once (the fleet's proxy sends it to another server) and
 *     reports `drained`. A new session refused by a draining server (close 4503)
 *     is retried with the usual backoff.
 *
 * Ordering guarantees kept here
 *   Every server frame carries `seq`, strictly increasing by 1 within a session.
 *   A frame whose seq is not above the last processed one is a duplicate and is
 *   dropped (counted in stats.duplicates); a jump is counted in stats.seqJumps.
 *   So output is neither lost nor shown twice across a resume.
 *
 * Requests
 *   request(type, params, onFrame) sends `{type, id, ...params}` (queued until
 *   the socket is open) and returns {id, done}: `done` resolves with the
 *   terminal `done` frame. onFrame receives every other frame carrying that id.
 *   Frames of no request are dispatched as the `frame` event.
 *
 * Events (EventTarget): `state` {state, reason, delayMs?}, `ready` {frame, fresh,
 * expired, drained}, `frame` {frame}, `rtt` {ms, source}.
 */
(function (global) {
  "use strict";

  const PROTOCOL = "groundloop.v1";
  const TOKEN_CHARS = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
  const CLOSE_UNAUTHORIZED = 4401;
  const CLOSE_NOT_FOUND = 4404;
  const CLOSE_BAD_RESUME = 4400;
  const CLOSE_TAKEN_OVER = 4409;
  const CLOSE_SESSION_CLOSED = 4410;
  const CLOSE_RESTART = 1012;
  const CLOSE_SIMULATED_DROP = 4000;

  function defaultUrl() {
    const scheme = global.location.protocol === "https:" ? "wss:" : "ws:";
    return `${scheme}//${global.location.host}/v1/ws`;
  }

  class GroundloopClient extends EventTarget {
    constructor(options = {}) {
      super();
      this.url = options.url || defaultUrl();
      this.token = options.token || "";
      this.pingIntervalMs = options.pingIntervalMs ?? 20000;
      this.autoReconnect = options.autoReconnect ?? true;  // false: stay `offline` after a drop until connect()
      this.healthUrl = options.healthUrl || new URL("/healthz", global.location.href).href;
      this.state = "idle";
      this.reason = "";
      this.sessionId = null;
      this.lastSeq = 0;
      this.ready = null;           // the last ready frame
      this.ws = null;
      this.attempt = 0;            // consecutive failed connection attempts
      this.pending = new Map();    // id -> {type, onFrame, resolve, sentOn, t0}
      this.queue = [];             // frames waiting for an open socket
      this.stats = { duplicates: 0, seqJumps: 0, resumes: 0, fresh: 0, expired: 0, drained: 0, gaps: 0, frames: 0 };
      this._seqBase = Date.now().toString(36);
      this._n = 0;
      this._timer = null;
      this._pingTimer = null;
      this._pings = new Map();     // ping id -> t0
      this._stopped = false;
    }

    /* ---- connection ------------------------------------------------------ */

    setToken(token) {
      this.token = token || "";
    }

    connect() {
      this._stopped = false;
      clearTimeout(this._timer);
      this._open();
    }

    /** Start over with a fresh session (e.g. after changing the token). */
    reconnectFresh() {
      this._forgetSession("restarted");
      this._closeSocket(1000, "reconnect");
      this.attempt = 0;
      this.connect();
    }

    /** Close for good (no reconnect). */
    close() {
      this._stopped = true;
      clearTimeout(this._timer);
      this._closeSocket(1000, "client closed");
      this._setState("closed", "closed by the page");
    }

    /** Simulate a network drop: close the socket and let the resume logic run. */
    dropConnection() {
      if (this.ws) this.ws.close(CLOSE_SIMULATED_DROP, "simulated drop");
    }

    _open() {
      if (this.ws) return;
      const protocols = [PROTOCOL];
      if (this.token) {
        if (!TOKEN_CHARS.test(this.token)) {
          this._setState("closed", "the token has characters a WebSocket subprotocol cannot carry");
          return;
        }
        protocols.push(`bearer.${this.token}`);
      }
      let url = this.url;
      const resuming = !!this.sessionId;
      if (resuming) {
        url += `?session=${encodeURIComponent(this.sessionId)}&last_seq=${this.lastSeq}`;
      }
      this._setState("connecting", resuming ? "resuming session" : "new session");
      let ws;
      try {
        ws = new WebSocket(url, protocols);
      } catch (err) {
        this._setState("closed", String(err && err.message || err));
        return;
      }
      this.ws = ws;
      ws._gotReady = false;
      ws._opened = false;
      ws._resuming = resuming;
      ws.onopen = () => { ws._opened = true; };
      ws.onmessage = (ev) => this._onMessage(ws, ev);
      ws.onclose = (ev) => this._onClose(ws, ev);
      ws.onerror = () => {};  // onclose follows with the details we can get
    }

    _closeSocket(code, reason) {
      const ws = this.ws;
      if (!ws) return;
      this.ws = null;
      ws.onmessage = ws.onclose = ws.onerror = null;
      try { ws.close(code, reason); } catch (_) { /* already closing */ }
      this._stopPings();
    }

    _onClose(ws, ev) {
      if (ws !== this.ws) return;
      this.ws = null;
      this._stopPings();
      if (this._stopped) return;
      if (ev.code === CLOSE_UNAUTHORIZED) {
        this._stopped = true;
        this._setState("unauthorized", "the server refused the token");
        return;
      }
      if ((ev.code === CLOSE_NOT_FOUND || ev.code === CLOSE_BAD_RESUME) && ws._resuming && !ws._gotReady) {
        this._sessionExpired();
        return;
      }
      if (ev.code === CLOSE_TAKEN_OVER) {
        // Another tab or client resumed this session: do not fight over it.
        this._stopped = true;
        this._setState("closed", "another connection took over this session");
        return;
      }
      if (ev.code === CLOSE_RESTART && this._draining) {
        // The server drained this session and is going away: nothing to resume.
        this._draining = false;
        this._drainedPending = true;
        this._forgetSession("the server shut down");
        this._open();
        return;
      }
      if (ev.code === CLOSE_SESSION_CLOSED) {
        this.stats.expired += 1;
        this._expiredPending = true;
        this._forgetSession("the server closed the session");
      }
      if (!ws._opened && !ws._resuming) {
        // Refused before the upgrade: HTTP 401/403 (token or Origin) looks like a
        // network failure to a page. If the server answers HTTP, it was a refusal.
        this._probeRefusal();
        return;
      }
      this._retry(ws, ev);
    }

    async _probeRefusal() {
      let up = false;
      try {
        const res = await fetch(this.healthUrl, { cache: "no-store" });
        up = res.ok;
      } catch (_) { up = false; }
      if (this._stopped || this.ws) return;
      if (up) {
        this._setState("unauthorized", "the server refused the connection: check the token (or the page's origin)");
        return;
      }
      this._retry(null, { code: 1006, reason: "" });
    }

    _retry(ws, ev) {
      if (!this.autoReconnect) {
        this._setState("offline", "connection lost (reconnect is off)");
        return;
      }
      if (!ws || !ws._gotReady) this.attempt += 1;
      else this.attempt = 0;
      const base = Math.min(10000, 300 * 2 ** Math.min(this.attempt, 6));
      const delay = Math.round(base * (0.8 + 0.4 * Math.random()));
      const why = ev.code === CLOSE_SIMULATED_DROP ? "connection dropped"
        : ev.code === 1006 ? "connection lost" : `closed (${ev.code}${ev.reason ? ": " + ev.reason : ""})`;
      this._setState("reconnecting", why, { delayMs: delay });
      this._timer = setTimeout(() => this._open(), delay);
    }

    _sessionExpired() {
      this.stats.expired += 1;
      this._expiredPending = true;
      this._forgetSession("the session expired on the server");
      this._closeSocket(1000, "session expired");
      this._open();
    }

    _forgetSession(why) {
      this.sessionId = null;
      this.lastSeq = 0;
      for (const [id, p] of this.pending) {
        if (!p.sent) continue;  // still queued: it will go to the next session
        this.pending.delete(id);
        p.resolve({ type: "done", id, ok: false, duration_ms: 0, local: true,
          error: { name: "SessionLost", message: `the request was lost: ${why}` } });
      }
      this._pings.clear();
    }

    _setState(state, reason, extra = {}) {
      this.state = state;
      this.reason = reason || "";
      this.dispatchEvent(new CustomEvent("state", { detail: { state, reason: this.reason, ...extra } }));
    }

    /* ---- frames in --------------------------------------------------------- */

    _onMessage(ws, ev) {
      if (ws !== this.ws) return;
      let frame;
      try {
        frame = JSON.parse(ev.data);
      } catch (_) {
        return;
      }
      if (!frame || typeof frame !== "object") return;
      this.stats.frames += 1;
      if (frame.type === "ready") {
        this._onReady(ws, frame);
        return;
      }
      if (!ws._gotReady) {
        // Before ready, only a refusal can come: an expired or unknown session.
        if (frame.type === "error" && frame.code === "not_found" && ws._resuming) {
          this._sessionExpired();
        } else if (frame.type === "error" && frame.code === "unauthorized") {
          this._stopped = true;
          this._closeSocket(1000, "unauthorized");
          this._setState("unauthorized", frame.message || "unauthorized");
        } else {
          this._dispatchFrame(frame);
        }
        return;
      }
      if (typeof frame.seq === "number") {
        if (frame.seq <= this.lastSeq) {
          this.stats.duplicates += 1;
          return;
        }
        if (frame.seq !== this.lastSeq + 1) this.stats.seqJumps += 1;
        this.lastSeq = frame.seq;
      }
      if (frame.type === "gap") this.stats.gaps += 1;
      if (frame.type === "draining") {
        this._draining = true;
        this.stats.drained += 1;
      }
      this._dispatchFrame(frame);
    }

    _onReady(ws, frame) {
      const resumed = !!frame.resumed && frame.session_id === this.sessionId;
      const drained = !!this._drainedPending;
      const expired = !drained && (!!this._expiredPending || (!!this.sessionId && !resumed));
      this._expiredPending = false;
      this._drainedPending = false;
      this._draining = false;
      if (!resumed) {
        if (this.sessionId) this._forgetSession("the server started a new session");
        this.stats.fresh += 1;
      } else {
        this.stats.resumes += 1;
      }
      ws._gotReady = true;
      this.attempt = 0;
      this.ready = frame;
      this.sessionId = frame.session_id;
      this.lastSeq = typeof frame.seq === "number" ? frame.seq : this.lastSeq;
      this._setState("open", resumed ? "resumed" : "connected");
      this.dispatchEvent(new CustomEvent("ready", { detail: { frame, fresh: !resumed, expired, drained } }));
      this._flushQueue();
      this._startPings();
    }

    _dispatchFrame(frame) {
      let id = frame.id;
      if (frame.type === "pong" && id === undefined && this._pings.size) {
        id = this._pings.keys().next().value;  // a pong without id answers the oldest ping
      }
      if (frame.type === "pong" && id !== undefined && this._pings.has(id)) {
        const ms = performance.now() - this._pings.get(id);
        this._pings.delete(id);
        this._rtt(ms, "ping");
      }
      const p = id !== undefined ? this.pending.get(id) : undefined;
      if (!p) {
        if (frame.type === "done" && this._pings.has(id)) {
          // A server that answers ping with done only (no pong).
          this._rtt(performance.now() - this._pings.get(id), "ping");
          this._pings.delete(id);
          return;
        }
        if (frame.type === "done" || frame.type === "pong") return;  // of a forgotten ping
        this.dispatchEvent(new CustomEvent("frame", { detail: { frame } }));
        return;
      }
      if (frame.type === "done") {
        this.pending.delete(id);
        frame.rtt_ms = performance.now() - p.t0;
        p.resolve(frame);
        return;
      }
      if (p.onFrame) {
        try { p.onFrame(frame); } catch (err) { console.error(err); }
      }
    }

    _rtt(ms, source) {
      this.lastRtt = { ms, source };
      this.dispatchEvent(new CustomEvent("rtt", { detail: { ms, source } }));
    }

    /* ---- frames out -------------------------------------------------------- */

    nextId(prefix = "r") {
      this._n += 1;
      return `${prefix}${this._seqBase}-${this._n}`;
    }

    /** Send a request; resolves `done` with its terminal frame. */
    request(type, params = {}, onFrame = null) {
      const id = this.nextId(type === "ping" ? "p" : "r");
      const frame = { ...params, type, id };
      let resolve;
      const done = new Promise((r) => { resolve = r; });
      this.pending.set(id, { type, onFrame, resolve, t0: performance.now() });
      this._send(frame);
      return { id, done };
    }

    /** Ask the server to cancel the request `target`; its own done says Cancelled. */
    cancel(target) {
      if (!this.pending.has(target)) return null;
      return this.request("cancel", { target });
    }

    /** Send a ping now; the answer updates the round-trip time. */
    ping() {
      if (this.state !== "open") return;
      const id = this.nextId("p");
      this._pings.set(id, performance.now());
      this._send({ type: "ping", id });
    }

    inflight(filter = () => true) {
      return [...this.pending.entries()].filter(([, p]) => filter(p)).map(([id, p]) => ({ id, type: p.type }));
    }

    _send(frame) {
      const ws = this.ws;
      if (ws && ws.readyState === WebSocket.OPEN && ws._gotReady) {
        ws.send(JSON.stringify(frame));
        const p = this.pending.get(frame.id);
        if (p) p.sent = true;
      } else {
        this.queue.push(frame);
      }
    }

    _flushQueue() {
      const frames = this.queue;
      this.queue = [];
      for (const f of frames) {
        // A queued cancel whose target is already gone is pointless.
        if (f.type === "cancel" && !this.pending.has(f.target)) {
          this.pending.get(f.id)?.resolve({ type: "done", id: f.id, ok: true, duration_ms: 0, local: true });
          this.pending.delete(f.id);
          continue;
        }
        if (f.type === "ping" && !this._pings.has(f.id)) continue;
        this._send(f);
      }
    }

    _startPings() {
      this._stopPings();
      this.ping();
      if (this.pingIntervalMs > 0) {
        this._pingTimer = setInterval(() => this.ping(), this.pingIntervalMs);
      }
    }

    _stopPings() {
      clearInterval(this._pingTimer);
      this._pingTimer = null;
    }
  }

  global.GroundloopClient = GroundloopClient;
})(window);
