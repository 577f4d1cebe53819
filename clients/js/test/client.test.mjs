// The client against a real groundloop server (real Docker sandbox), started by tests/clients/test_js_client.py,
// which passes its URL in GROUNDLOOP_TEST_URL. The model behind `assist` is the scripted local fake of
// tests/support/fake_anthropic.py (two replies: a failing try, then a working one).
import assert from "node:assert/strict";
import net from "node:net";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";
import { ConnectionError, ProcessHandle, RequestError, connect } from "../dist/index.js";

const URL_ = process.env.GROUNDLOOP_TEST_URL;
const TOKEN = process.env.GROUNDLOOP_TEST_TOKEN ?? "tok1";
const skip = URL_ ? false : "GROUNDLOOP_TEST_URL is not set (run through tests/clients/test_js_client.py)";

describe("against a real server", { skip }, () => {
  let s;
  before(async () => {
    s = await connect(URL_, { token: TOKEN });
  });
  after(() => s?.close());

  test("ready and runCode: streamed lines, a rich result, callbacks in order", async () => {
    assert.equal(s.state, "open");
    assert.equal(s.ready.protocol, "groundloop.v1");
    assert.equal(s.ready.resumed, false);
    assert.match(s.sessionId, /^\S{8,}$/);
    const seen = [];
    const ex = await s.runCode("import sys\nprint('a', flush=True)\nprint('b', file=sys.stderr, flush=True)\nprint('c')\n6 * 7", {
      onStdout: (t) => seen.push(["out", t]),
      onStderr: (t) => seen.push(["err", t]),
      onResult: (r) => seen.push(["result", r.data["text/plain"], r.main]),
    });
    assert.equal(ex.ok, true);
    assert.equal(ex.error, null);
    assert.deepEqual(ex.output, { stdout: "a\nc\n", stderr: "b\n" });
    assert.deepEqual(ex.results, [{ data: { "text/plain": "42" }, main: true }]);
    // Each stream in order, the result last (stdout and stderr are two pipes: their relative order may vary).
    assert.deepEqual(seen.filter((x) => x[0] === "out"), [["out", "a\n"], ["out", "c\n"]]);
    assert.deepEqual(seen.filter((x) => x[0] === "err"), [["err", "b\n"]]);
    assert.deepEqual(seen[3], ["result", "42", true]);
    assert.equal(ex.context, "default-python");
    assert.equal(ex.gap, false);
    assert.equal(typeof ex.durationMs, "number");
    assert.equal(s.stats.duplicates, 0);
    assert.equal(s.stats.seqJumps, 0);
  });

  test("displays: an update replaces its display in results, clear_output drops what came before", async () => {
    const frames = [];
    const ex = await s.runCode(
      "from IPython.display import display, update_display, clear_output\n" +
        "print('gone')\ndisplay('old', display_id='d1')\nclear_output()\nprint('kept')\n" +
        "display('one', display_id='d2')\nupdate_display('two', display_id='d2')\n" +
        "clear_output(wait=True)\ndisplay('last')",
      { onFrame: (f) => frames.push(f.type) },
    );
    assert.equal(ex.ok, true);
    assert.deepEqual(ex.output, { stdout: "", stderr: "" }); // cleared when 'last' came
    assert.deepEqual(ex.results, [{ data: { "text/plain": "'last'" }, main: false }]);
    assert.deepEqual(frames.filter((t) => t === "clear_output").length, 2);
    const again = await s.runCode("display('a', display_id='d3')\nupdate_display('b', display_id='d3')\nupdate_display('x', display_id='d2')");
    assert.deepEqual(again.results, [
      { data: { "text/plain": "'b'" }, main: false, displayId: "d3" },
      { data: { "text/plain": "'x'" }, main: false, displayId: "d2", update: true },
    ]);
  });

  test("a fresh run: a clean context of its own, gone after it", async () => {
    await s.runCode("fresh_probe = 1");
    const ex = await s.runCode("'fresh_probe' in globals()", { fresh: true });
    assert.equal(ex.ok, true);
    assert.equal(ex.results[0].data["text/plain"], "False");
    assert.match(ex.context, /^fresh-/);
    assert.equal((await s.runCode("fresh_probe")).results[0].data["text/plain"], "1");
  });

  test("runCode failure is data: error name, message, traceback", async () => {
    const ex = await s.runCode("def f(x):\n    return 1 / x\nprint('before')\nf(0)\n");
    assert.equal(ex.ok, false);
    assert.equal(ex.output.stdout, "before\n");
    assert.equal(ex.error.name, "ZeroDivisionError");
    assert.match(ex.error.traceback, /return 1 \/ x/);
  });

  test("javascript and a timeout", async () => {
    const js = await s.runCode("console.log('hi from node'); ({n: 6 * 7})", { language: "javascript" });
    assert.equal(js.ok, true);
    assert.equal(js.output.stdout, "hi from node\n");
    assert.equal(js.context, "default-javascript");
    const slow = await s.runCode("import time\ntime.sleep(30)", { timeoutS: 1 });
    assert.equal(slow.ok, false);
    assert.equal(slow.error.name, "Timeout");
  });

  test("a request the server refuses: BadRequest, through call() and the error frame", async () => {
    const frames = [];
    const h = s.request("run_code", { language: "python" }, { onFrame: (f) => frames.push(f) });
    const done = await h.done;
    assert.equal(done.ok, false);
    assert.equal(done.error.name, "BadRequest");
    assert.equal(frames[0].type, "error");
    assert.equal(frames[0].code, "bad_request");
    await assert.rejects(s.call("no_such_type"), (err) => err instanceof RequestError && err.errorName === "BadRequest");
  });

  test("contexts: create, keep state, list, delete", async () => {
    const ctx = await s.createContext({ language: "python", context: "mine" });
    assert.equal(ctx, "mine");
    await s.runCode("x = 41", { context: ctx });
    const ex = await s.runCode("x + 1", { context: ctx });
    assert.equal(ex.results[0].data["text/plain"], "42");
    const ids = (await s.listContexts()).map((c) => c.context_id);
    assert.ok(ids.includes("mine"), ids);
    await s.deleteContext(ctx);
    assert.ok(!(await s.listContexts()).some((c) => c.context_id === "mine"));
    await assert.rejects(s.deleteContext("mine"), RequestError);
  });

  test("exec: exit code, both streams, cwd and env", async () => {
    const r = await s.exec("echo one; echo two >&2; echo $GREETING; pwd; exit 3", { cwd: "/tmp", env: { GREETING: "hello" } });
    assert.equal(r.ok, true);
    assert.equal(r.exitCode, 3);
    assert.equal(r.output.stdout, "one\nhello\n/tmp\n");
    assert.equal(r.output.stderr, "two\n");
  });

  test("files: write text and bytes, read, list, mkdir, delete, a missing file", async () => {
    await s.mkdir("jsdir/sub");
    assert.equal(await s.writeFile("jsdir/a.txt", "héllo\n"), 7);
    const bytes = new Uint8Array([0, 1, 2, 255, 254]);
    assert.equal(await s.writeFile("jsdir/b.bin", bytes), 5);
    assert.deepEqual(await s.readFile("jsdir/a.txt"), { content: "héllo\n", encoding: "utf-8", size: 7 });
    assert.equal((await s.readFile("jsdir/b.bin")).encoding, "base64");
    assert.deepEqual(await s.readFileBytes("jsdir/b.bin"), bytes);
    const names = (await s.listFiles("jsdir")).map((e) => `${e.name}:${e.type}`).sort();
    assert.deepEqual(names, ["a.txt:file", "b.bin:file", "sub:directory"]);
    await s.deleteFile("jsdir", { recursive: true });
    await assert.rejects(s.readFile("jsdir/a.txt"), (err) => err instanceof RequestError && err.done.ok === false);
  });

  test("processes: output streams after start, exit; list; kill", async () => {
    const lines = [];
    const p = await s.startProcess("for i in 1 2 3; do echo line $i; sleep 0.05; done; exit 5", {
      onStdout: (t) => lines.push(t),
    });
    assert.ok(p instanceof ProcessHandle);
    assert.ok(p.processId);
    const frames = [];
    for await (const f of p) frames.push(f);
    assert.deepEqual(frames.filter((f) => f.type === "stdout").map((f) => f.text), ["line 1\n", "line 2\n", "line 3\n"]);
    assert.equal(frames.at(-1).type, "exit");
    assert.equal(await p.exited, 5);
    assert.deepEqual(lines, ["line 1\n", "line 2\n", "line 3\n"]);

    const sleeper = await s.startProcess("sleep 600", { processId: "sleeper" });
    assert.equal(sleeper.processId, "sleeper");
    const listed = await s.listProcesses();
    assert.ok(listed.some((x) => x.process_id === "sleeper" && x.running), JSON.stringify(listed));
    await sleeper.kill();
    assert.notEqual(await sleeper.exited, 0);
  });

  test("cancel: by AbortSignal, by handle; the context survives", async () => {
    const ac = new AbortController();
    const started = s.runCode("import time\nprint('started', flush=True)\ntime.sleep(600)", {
      signal: ac.signal,
      onStdout: () => ac.abort(),
    });
    const ex = await started;
    assert.equal(ex.ok, false);
    assert.equal(ex.error.name, "Cancelled");
    assert.equal(ex.output.stdout, "started\n");

    const h = s.stream("exec", { command: "echo go; sleep 600" });
    const types = [];
    for await (const f of h) {
      types.push(f.type);
      if (f.type === "stdout") assert.equal(await h.cancel(), true);
    }
    assert.deepEqual(types, ["stdout", "done"]);
    assert.equal((await h.done).error.name, "Cancelled");
    assert.equal(await s.cancel("not-in-flight"), false);
    assert.equal((await s.runCode("print('alive')")).output.stdout, "alive\n");
  });

  test("async iteration over a request's frames, done last", async () => {
    const frames = [];
    for await (const f of s.stream("run_code", { code: "print(1)\nprint(2)\n'x'" })) frames.push(f);
    assert.deepEqual(frames.map((f) => f.type), ["stdout", "stdout", "result", "done"]);
    const seqs = frames.map((f) => f.seq);
    assert.deepEqual(seqs, [...seqs].sort((a, b) => a - b));
  });

  test("ping measures a round trip", async () => {
    const ms = await s.ping();
    assert.ok(ms > 0 && Number.isFinite(ms));
  });

  test("assist: tokens stream, code runs, the failed try is retried", async () => {
    const tokens = [];
    const code = [];
    const out = [];
    const r = await s.assist("What is the mean of 3 and 4?", {
      onToken: (t) => tokens.push(t),
      onCode: (f) => code.push(f.code),
      onStdout: (t) => out.push(t),
    });
    assert.equal(r.ok, true, JSON.stringify(r.done));
    assert.equal(r.iterations, 2);
    assert.ok(tokens.length >= 4, tokens);
    assert.equal(r.text, tokens.join(""));
    assert.ok(r.text.includes("The mean is **3.5**."));
    assert.equal(code.length, 2);
    assert.deepEqual(r.attempts.map((a) => a.ok), [false, true]);
    assert.deepEqual(out, ["mean 3.5\n"]);
    assert.equal(r.output.stdout, "mean 3.5\n");
    assert.match(r.code, /len\(values\)/);
  });

  test("a dropped connection resumes the same session (dropConnection)", async () => {
    const sid = s.sessionId;
    const resumes = s.stats.resumes;
    const resumed = new Promise((r) => s.on("ready", r));
    s.dropConnection();
    const ev = await resumed;
    assert.equal(ev.fresh, false);
    assert.equal(s.sessionId, sid);
    assert.equal(s.stats.resumes, resumes + 1);
    assert.equal((await s.runCode("print('back')")).output.stdout, "back\n");
  });
});

describe("connection errors", { skip }, () => {
  test("a wrong token is refused: ConnectionError, state unauthorized", async () => {
    await assert.rejects(connect(URL_, { token: "nope" }), (err) => err instanceof ConnectionError && err.state === "unauthorized");
  });

  test("the header form authenticates too (ws)", async () => {
    const s = await connect(URL_, { token: TOKEN, auth: "header", WebSocket });
    assert.equal((await s.exec("echo via header")).output.stdout, "via header\n");
    s.close();
    assert.equal(s.state, "closed");
  });

  test("a token a subprotocol cannot carry is refused locally", async () => {
    await assert.rejects(connect(URL_, { token: "has space" }), /subprotocol/);
  });

  test("close() ends what is in flight with SessionClosed", async () => {
    const s = await connect(URL_, { token: TOKEN });
    const running = s.runCode("import time\ntime.sleep(600)");
    s.close();
    const ex = await running;
    assert.equal(ex.error.name, "SessionClosed");
    assert.equal(ex.done.local, true);
  });
});

/** A loopback TCP proxy in front of the server whose connections the test can cut (no close frame). */
async function proxy(target) {
  const { hostname, port } = new URL(target);
  const socks = new Set();
  const server = net.createServer((client) => {
    const upstream = net.connect(Number(port), hostname);
    for (const [a, b] of [[client, upstream], [upstream, client]]) {
      a.pipe(b);
      a.on("error", () => b.destroy());
      a.on("close", () => b.destroy());
    }
    socks.add(client).add(upstream);
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const url = target.replace(`${hostname}:${port}`, `127.0.0.1:${server.address().port}`);
  return {
    url,
    /** Destroy every open connection; returns how many there were. */
    cut() {
      const n = socks.size;
      for (const sk of socks) sk.destroy();
      socks.clear();
      return n;
    },
    close: () => new Promise((r) => server.close(r)),
  };
}

describe("resume through a cut network", { skip }, () => {
  test("every line exactly once, in order, across cuts mid-stream", async () => {
    const p = await proxy(URL_);
    const s = await connect(p.url, { token: TOKEN, backoff: { initialMs: 50, maxMs: 200 } });
    const sid = s.sessionId;
    const lines = [];
    const cutsAt = new Set(["line 5\n", "line 60\n"]);
    let cuts = 0; // a loaded machine may read line 60 before the first cut shows: count the cuts that cut
    const ex = await s.runCode("import time\nfor i in range(1, 121):\n    print(f'line {i}', flush=True)\n    time.sleep(0.01)\n'end'", {
      onStdout: (t) => {
        lines.push(t);
        if (cutsAt.has(t) && p.cut() > 0) cuts += 1;
      },
    });
    assert.equal(ex.ok, true, JSON.stringify(ex.done));
    assert.deepEqual(lines, Array.from({ length: 120 }, (_, i) => `line ${i + 1}\n`));
    assert.equal(ex.output.stdout, lines.join(""));
    assert.equal(ex.results[0].data["text/plain"], "'end'");
    assert.equal(ex.gap, false);
    assert.equal(s.sessionId, sid);
    assert.ok(cuts >= 1);
    assert.equal(s.stats.resumes, cuts);
    assert.equal(s.stats.seqJumps, 0);
    s.close();
    await p.close();
  });

  test("requests made while the network is down are queued and sent after the resume", async () => {
    const p = await proxy(URL_);
    const s = await connect(p.url, { token: TOKEN, reconnect: false });
    p.cut();
    await new Promise((r) => s.on("state", (d) => d.state === "offline" && r()));
    const queued = s.runCode("print('sent after the resume')");
    s.autoReconnect = true;
    s.open();
    assert.equal((await queued).output.stdout, "sent after the resume\n");
    assert.equal(s.stats.resumes, 1);
    s.close();
    await p.close();
  });
});
