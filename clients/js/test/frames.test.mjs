// The session's frame handling with literal frames: a scripted WebSocket stands in for the server, so the
// cases a real server rarely produces (a replay that overlaps, a gap, a forgotten session) are exact.
import assert from "node:assert/strict";
import { test } from "node:test";
import { Session } from "../dist/index.js";

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
