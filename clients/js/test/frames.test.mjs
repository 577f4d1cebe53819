// The session's frame handling with literal frames: a scripted WebSocket stands in for the server, so the
// cases a real server rarely produces (a replay that overlaps, a gap, a forgotten session) are exact.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Session, connect } from "../dist/index.js";

/** A WebSocket whose server side is the test: `sockets` holds every one opened, newest last. */
function scripted() {
  const sockets = [];
  class FakeSocket {
    constructor(url, protocols) {
      this.url = url;
      this.protocols = protocols;
      this.readyState = 0;
      this.sent = [];
      sockets.push(this);
      queueMicrotask(() => {
        this.readyState = 1;
        this.onopen?.({});
      });
    }
    send(data) {
      this.sent.push(JSON.parse(data));
    }
    close(code = 1000, reason = "") {
      if (this.readyState === 3) return;
      this.readyState = 3;
      queueMicrotask(() => this.onclose?.({ code, reason }));
    }
    /** The server sends frames. */
    frames(...fs) {
      for (const f of fs) this.onmessage?.({ data: JSON.stringify(f) });
    }
  }
  return { sockets, WebSocket: FakeSocket };
}

const ready = (seq, sid, resumed = false) => ({ type: "ready", seq, session_id: sid, resumed, sandbox: {}, limits: {}, protocol: "groundloop.v1" });
const tick = () => new Promise((r) => setTimeout(r, 0));
/** Wait for a condition by yielding to the event loop (no fixed sleeps: the machine may be slow). */
async function until(cond) {
  while (!cond()) await tick();
}

async function opened(opts = {}) {
  const fake = scripted();
  const s = new Session("ws://127.0.0.1:1/v1/ws", { token: "tok1", WebSocket: fake.WebSocket, backoff: { initialMs: 1, maxMs: 1 }, ...opts });
  s.open();
  await tick();
  fake.sockets[0].frames(ready(1, "S1"));
  return { s, fake };
}

test("subprotocol auth, then a resume URL with last_seq; replayed frames already seen are dropped", async () => {
  const { s, fake } = await opened();
  assert.deepEqual(fake.sockets[0].protocols, ["groundloop.v1", "bearer.tok1"]);
  const out = [];
  const h = s.request("run_code", { code: "x" }, { onFrame: (f) => out.push(f.text ?? f.type) });
  const sent = fake.sockets[0].sent[0];
  assert.equal(sent.type, "run_code");
  assert.equal(sent.code, "x");
  const id = sent.id;
  fake.sockets[0].frames({ type: "stdout", seq: 2, id, text: "a\n" }, { type: "stdout", seq: 3, id, text: "b\n" });
  fake.sockets[0].close(1006);
  await until(() => fake.sockets.length === 2);
  const second = fake.sockets[1];
  assert.equal(second.url, "ws://127.0.0.1:1/v1/ws?session=S1&last_seq=3");
  // A server replaying from an older point (an overlap): seq 3 again is dropped, not shown twice.
  second.frames(ready(4, "S1", true), { type: "stdout", seq: 3, id, text: "b\n" }, { type: "stdout", seq: 5, id, text: "c\n" });
  second.frames({ type: "done", seq: 6, id, ok: true, duration_ms: 1 });
  const done = await h.done;
  assert.equal(done.ok, true);
  assert.deepEqual(out, ["a\n", "b\n", "c\n", "done"]);
  assert.equal(s.stats.duplicates, 1);
  assert.equal(s.stats.resumes, 1);
  assert.equal(s.stats.seqJumps, 0);
  assert.equal(s.lastSeq, 6);
  s.close();
});

test("a gap is surfaced: event, stats, and the request in flight is marked", async () => {
  const { s, fake } = await opened();
  const gaps = [];
  s.on("gap", (d) => gaps.push(d.frame.missed));
  const exec = s.exec("x");
  const id = fake.sockets[0].sent[0].id;
  fake.sockets[0].frames({ type: "gap", seq: 2, missed: 3, first_missed_seq: 2, last_missed_seq: 4, message: "lost" });
  fake.sockets[0].frames({ type: "stdout", seq: 3, id, text: "tail\n" }, { type: "done", seq: 4, id, ok: true, duration_ms: 1, exit_code: 0 });
  const r = await exec;
  assert.equal(r.gap, true);
  assert.equal(r.exitCode, 0);
  assert.deepEqual(gaps, [3]);
  assert.equal(s.stats.gaps, 1);
  s.close();
});

test("a forgotten session: sent requests end SessionLost, queued ones go to the fresh session", async () => {
  const { s, fake } = await opened({ renewExpired: true, reconnect: false });
  const sentEarlier = s.request("run_code", { code: "1" });
  fake.sockets[0].close(1006);
  await until(() => s.state === "offline");
  const queued = s.request("run_code", { code: "2" });
  const readies = [];
  s.on("ready", (d) => readies.push(d));
  s.autoReconnect = true;
  s.open();
  await tick();
  await until(() => fake.sockets.length === 2);
  fake.sockets[1].frames({ type: "error", seq: 0, code: "not_found", message: "no such session" });
  await until(() => fake.sockets.length === 3);
  const third = fake.sockets[2];
  assert.equal(third.url, "ws://127.0.0.1:1/v1/ws");
  assert.equal((await sentEarlier.done).error.name, "SessionLost");
  third.frames(ready(1, "S2"));
  assert.equal(readies[0].expired, true);
  assert.equal(readies[0].fresh, true);
  assert.equal(third.sent[0].id, queued.id);
  third.frames({ type: "done", seq: 2, id: queued.id, ok: true, duration_ms: 1 });
  assert.equal((await queued.done).ok, true);
  assert.equal(s.stats.expired, 1);
  s.close();
});

test("without renewExpired a closed session closes the client", async () => {
  const { s, fake } = await opened();
  const h = s.request("run_code", { code: "1" });
  const failed = s.whenReady().then(() => "open", () => "rejected");
  fake.sockets[0].close(4410, "idle");
  await tick();
  await tick();
  assert.equal(s.state, "closed");
  assert.equal((await h.done).error.name, "SessionLost");
  assert.equal(await failed, "open"); // it was open when asked
  await assert.rejects(s.whenReady(), /expired/);
});

test("aborting a queued request never sends it; a taken-over session stops", async () => {
  const fake = scripted();
  const s = new Session("ws://127.0.0.1:1/v1/ws", { WebSocket: fake.WebSocket });
  const ac = new AbortController();
  const h = s.request("run_code", { code: "1" }, { signal: ac.signal });
  ac.abort();
  assert.equal((await h.done).error.name, "Cancelled");
  s.open();
  await tick();
  assert.deepEqual(fake.sockets[0].protocols, ["groundloop.v1"]); // anonymous
  fake.sockets[0].frames(ready(1, "S1"));
  assert.deepEqual(fake.sockets[0].sent, []);
  fake.sockets[0].close(4409, "taken over");
  await tick();
  assert.equal(s.state, "closed");
  assert.match(s.reason, /took over/);
});

test("setToken and restart: a fresh session with the new token; what was sent on the old one ends lost", async () => {
  const { s, fake } = await opened();
  const h = s.request("run_code", { code: "1" });
  assert.ok(s.has(h.id));
  assert.deepEqual(s.inflight().map((x) => x.id), [h.id]);
  s.setToken("tok2");
  s.restart();
  assert.equal((await h.done).error.name, "SessionLost");
  assert.equal(s.has(h.id), false);
  await tick();
  const next = fake.sockets[1];
  assert.equal(next.url, "ws://127.0.0.1:1/v1/ws"); // no session= : a fresh one
  assert.deepEqual(next.protocols, ["groundloop.v1", "bearer.tok2"]);
  next.frames(ready(1, "S2"));
  assert.equal(s.sessionId, "S2");
  assert.equal(s.stats.fresh, 2);
  s.close();
});

/* ---- a draining server (docs/protocol.md section 10) ------------------------------------------------------------ */

const BASE = "ws://127.0.0.1:1/v1/ws";
const draining = (seq, deadline_s = 29.5) => ({ type: "draining", seq, deadline_s, message: "this server is shutting down" });

function record(s) {
  const seen = { states: [], readies: [], drains: [], frames: [] };
  s.on("state", (d) => seen.states.push(d));
  s.on("ready", (d) => seen.readies.push(d));
  s.on("draining", (d) => seen.drains.push(d.frame));
  s.on("frame", (d) => seen.frames.push(d.frame.type));
  return seen;
}

test("draining, then 1012: the running request finishes, new ones wait, a fresh session at once reports drained", async () => {
  const { s, fake } = await opened();
  const seen = record(s);
  const first = fake.sockets[0];
  const running = s.request("run_code", { code: "long" });
  first.frames({ type: "stdout", seq: 2, id: running.id, text: "0\n" }, draining(3));
  assert.deepEqual(seen.drains.map((f) => f.deadline_s), [29.5]);
  assert.deepEqual(seen.frames, ["draining"]); // also a `frame` event, as every frame of no request
  assert.equal(s.draining.deadline_s, 29.5);
  // A new request would be refused by the draining server: it waits for the next session. A cancel still goes out.
  const later = s.request("run_code", { code: "after" });
  const other = s.request("run_code", { code: "other" });
  const cancelled = s.cancel(other.id);
  assert.equal((await other.done).error.name, "Cancelled"); // still queued: never sent anywhere
  assert.equal(await cancelled, true);
  assert.deepEqual(first.sent.map((f) => f.id), [running.id]);
  first.frames({ type: "stdout", seq: 4, id: running.id, text: "1\n" }, { type: "done", seq: 5, id: running.id, ok: true, duration_ms: 1 });
  assert.equal((await running.done).ok, true);
  first.close(1012, "drained");
  await until(() => fake.sockets.length === 2);
  const second = fake.sockets[1];
  assert.equal(second.url, BASE); // no session=: no resume attempt on a server that is leaving
  assert.equal(seen.states.some((d) => d.state === "reconnecting"), false); // at once, no backoff
  assert.equal(s.draining, null);
  assert.deepEqual(second.sent, []); // the waiting request goes after ready
  second.frames(ready(1, "S2"));
  assert.equal(seen.readies.length, 1);
  assert.deepEqual({ ...seen.readies[0], frame: undefined }, { frame: undefined, fresh: true, expired: false, drained: true });
  assert.deepEqual(second.sent.map((f) => f.id), [later.id]);
  second.frames({ type: "done", seq: 2, id: later.id, ok: true, duration_ms: 1 });
  assert.equal((await later.done).ok, true);
  assert.equal(s.sessionId, "S2");
  assert.deepEqual([s.stats.drained, s.stats.expired, s.stats.resumes, s.stats.fresh], [1, 0, 0, 2]);
  // The next drop of the fresh session is an ordinary one: a resume, and its ready is not `drained`.
  second.close(1006);
  await until(() => fake.sockets.length === 3);
  assert.equal(fake.sockets[2].url, `${BASE}?session=S2&last_seq=2`);
  fake.sockets[2].frames(ready(3, "S2", true));
  assert.deepEqual([seen.readies[1].fresh, seen.readies[1].drained], [false, false]);
  s.close();
});

test("a 1012 without a draining frame is only a drop: the client resumes the session", async () => {
  const { s, fake } = await opened();
  const seen = record(s);
  fake.sockets[0].close(1012, "service restart");
  await until(() => fake.sockets.length === 2);
  assert.equal(fake.sockets[1].url, `${BASE}?session=S1&last_seq=1`);
  fake.sockets[1].frames(ready(2, "S1", true));
  assert.deepEqual([seen.readies[0].drained, seen.readies[0].fresh, s.stats.drained, s.stats.resumes], [false, false, 0, 1]);
  s.close();
});

test("a drop while draining resumes there; a session already closed by the drain is drained, not expired", async () => {
  // renewExpired is off: an expired session would close the client, a drained one is replaced.
  const { s, fake } = await opened();
  const seen = record(s);
  fake.sockets[0].frames(draining(2));
  fake.sockets[0].close(1006);
  await until(() => fake.sockets.length === 2);
  assert.equal(fake.sockets[1].url, `${BASE}?session=S1&last_seq=2`); // a draining server still takes resumes
  fake.sockets[1].frames({ type: "error", seq: 0, code: "not_found", message: "no such session" });
  await until(() => fake.sockets.length === 3 || s.state === "closed");
  assert.equal(s.state, "connecting", s.reason);
  assert.equal(fake.sockets[2].url, BASE);
  fake.sockets[2].frames(ready(1, "S2"));
  assert.equal(s.state, "open");
  assert.deepEqual([seen.readies[0].drained, seen.readies[0].expired], [true, false]);
  assert.deepEqual([s.stats.drained, s.stats.expired], [1, 0]);
  s.close();
});

test("a resumed draining session stays draining: requests keep waiting until the fresh session", async () => {
  const { s, fake } = await opened();
  fake.sockets[0].frames(draining(2));
  fake.sockets[0].close(1006);
  await until(() => fake.sockets.length === 2);
  const h = s.request("run_code", { code: "x" });
  fake.sockets[1].frames(ready(3, "S1", true));
  assert.ok(s.draining);
  assert.deepEqual(fake.sockets[1].sent, []);
  fake.sockets[1].close(1012, "drained");
  await until(() => fake.sockets.length === 3);
  fake.sockets[2].frames(ready(1, "S2"));
  assert.deepEqual(fake.sockets[2].sent.map((f) => f.id), [h.id]);
  s.close();
});

test("with reconnect off, a drained session leaves the client offline; open() then starts a fresh one", async () => {
  const { s, fake } = await opened({ reconnect: false });
  const seen = record(s);
  fake.sockets[0].frames(draining(2));
  fake.sockets[0].close(1012, "drained");
  await until(() => s.state === "offline");
  assert.match(s.reason, /drained/);
  assert.equal(fake.sockets.length, 1);
  s.open();
  await until(() => fake.sockets.length === 2);
  assert.equal(fake.sockets[1].url, BASE);
  fake.sockets[1].frames(ready(1, "S2"));
  assert.equal(seen.readies[0].drained, true);
  s.close();
});

test("a new session refused by a draining server (4503) is tried again with backoff; connect() does not give up", async () => {
  const fake = scripted();
  const s = new Session(BASE, { WebSocket: fake.WebSocket, backoff: { initialMs: 1, maxMs: 1000 } });
  const seen = record(s);
  const ready_ = s.whenReady({ failOnRetry: true }); // what connect() waits for
  s.open();
  for (let i = 0; i < 3; i++) {
    await until(() => fake.sockets.length === i + 1);
    fake.sockets[i].frames({ type: "error", seq: 0, code: "draining", message: "this server is draining: connect again" });
    fake.sockets[i].close(4503, "draining");
  }
  await until(() => fake.sockets.length === 4);
  assert.ok(fake.sockets.every((ws) => ws.url === BASE));
  const retries = seen.states.filter((d) => d.state === "reconnecting");
  assert.equal(retries.length, 3);
  assert.ok(retries.every((d) => d.reason === "this server is draining: connect again"));
  // The usual backoff: the delay grows with each refusal (1 ms doubling, +-20 % jitter: 2, 4, 8 ms).
  assert.ok(retries[0].delayMs < retries[1].delayMs && retries[1].delayMs < retries[2].delayMs, JSON.stringify(retries));
  assert.deepEqual(seen.frames, []); // the refusal is the state's reason, not an error to show
  fake.sockets[3].frames(ready(1, "S1"));
  assert.equal((await ready_).session_id, "S1");
  assert.deepEqual([seen.readies[0].drained, seen.readies[0].expired, s.stats.drained], [false, false, 0]);
  s.close();

  // connect() itself: refused once by a draining server, then ready on the next try.
  const fake2 = scripted();
  const connecting = connect(BASE, { WebSocket: fake2.WebSocket, backoff: { initialMs: 1, maxMs: 1 } });
  await until(() => fake2.sockets.length === 1);
  fake2.sockets[0].frames({ type: "error", seq: 0, code: "draining", message: "draining" });
  fake2.sockets[0].close(4503, "draining");
  await until(() => fake2.sockets.length === 2);
  fake2.sockets[1].frames(ready(1, "S9"));
  const s2 = await connecting;
  assert.equal(s2.sessionId, "S9");
  s2.close();
});

test("other failures to connect still fail connect(): a retry that is not a drain refusal rejects", async () => {
  const fake = scripted();
  const s = new Session(BASE, { WebSocket: fake.WebSocket, backoff: { initialMs: 1, maxMs: 1 } });
  const ready_ = s.whenReady({ failOnRetry: true });
  s.open();
  await until(() => fake.sockets.length === 1);
  fake.sockets[0].close(4503, "draining"); // the close code alone, without the error frame, is enough
  await until(() => fake.sockets.length === 2);
  fake.sockets[1].close(1011, "internal");
  await assert.rejects(ready_, /closed \(1011: internal\)/);
  s.close();
});
