// groundloop JavaScript worker: one persistent node `vm` context, driven by
// the agent over two pipes (same protocol as pyworker.py). console output goes
// to this process's stdout/stderr, which are pipes: node writes pipes
// synchronously on Linux, so every line leaves as it is written.
"use strict";
const fs = require("fs");
const net = require("net");
const vm = require("vm");
const util = require("util");
const jscell = require("./jscell.js");

const CMD_FD = Number(process.env.GROUNDLOOP_CMD_FD);
const RES_FD = Number(process.env.GROUNDLOOP_RES_FD);
delete process.env.GROUNDLOOP_CMD_FD;
delete process.env.GROUNDLOOP_RES_FD;
// A TypeScript context: the compiler is loaded once, here, not per cell.
const TYPESCRIPT = process.env.GROUNDLOOP_LANGUAGE === "typescript";
delete process.env.GROUNDLOOP_LANGUAGE;
if (TYPESCRIPT) jscell.loadTypeScript();
try { fs.writeFileSync("/proc/self/oom_score_adj", "1000"); } catch (e) { /* not Linux, or not allowed */ }

// A SIGINT while idle must not end the worker; during a run, breakOnSigint
// turns it into an exception in the user's code.
process.on("SIGINT", () => {});

const sandbox = {
  console, process, Buffer, URL, URLSearchParams, TextEncoder, TextDecoder,
  setTimeout, clearTimeout, setInterval, clearInterval, setImmediate, clearImmediate,
  queueMicrotask, structuredClone, require, module: { exports: {} },
  __groundloop_import: jscell.importFor,
};
sandbox.exports = sandbox.module.exports;
sandbox.globalThis = sandbox;
const context = vm.createContext(sandbox);

function send(obj) {
  fs.writeSync(RES_FD, JSON.stringify(obj) + "\n");
}

function bundle(value) {
  const data = { "text/plain": util.inspect(value, { depth: 4 }) };
  if (value !== null && typeof value === "object" && !(value instanceof Error)) {
    try {
      const json = JSON.stringify(value);
      if (json !== undefined) data["application/json"] = JSON.parse(json);
    } catch (e) { /* not JSON-able: text only */ }
  }
  if (typeof value === "string") data["text/plain"] = value;
  return data;
}

function errorOf(e) {
  if (e instanceof Error || (e && typeof e === "object" && "stack" in e)) {
    return { name: e.name || "Error", message: String(e.message || ""), traceback: String(e.stack || "") };
  }
  return { name: "Error", message: "Uncaught " + util.inspect(e), traceback: "" };
}

async function run(code, n) {
  const filename = `<cell-${n}>`;
  let script;
  if (TYPESCRIPT) {
    try {
      code = jscell.transpile(code, filename);
    } catch (e) {
      return errorOf(e);  // the compiler's own messages
    }
  }
  try {
    script = new vm.Script(code, { filename });
  } catch (e) {
    if (!(e instanceof SyntaxError)) return errorOf(e);
    // Module syntax or a top-level await (jscell.js); without a parser, await alone still runs,
    // as an async function whose declarations stay local.
    const rewritten = jscell.rewrite(code, "__groundloop_import");
    try {
      if (rewritten !== null) script = new vm.Script(rewritten, { filename });
      else if (/await/.test(String(e.message))) {
        script = new vm.Script(`(async () => {\n${code}\n})()`, { filename, lineOffset: -1 });
      } else return errorOf(e);
    } catch (e2) {
      return errorOf(e);  // the rewrite did not compile either: the cell's own error is the one to show
    }
  }
  let value;
  try {
    value = script.runInContext(context, { breakOnSigint: true, displayErrors: false });
    if (value && typeof value.then === "function") value = await value;
  } catch (e) {
    return errorOf(e);
  }
  if (value !== undefined) {
    sandbox._ = value;
    let data;
    try {
      data = bundle(value);
    } catch (e) {  // a [util.inspect.custom] of the cell's that throws
      data = { "text/plain": `<a value whose inspection failed: ${String(e && e.message ? e.message : e)}>` };
    }
    return { result: data };  // rides on the done, as in pyworker.py: one write, one read
  }
  return null;
}

// Warm what a first cell runs through (compile, run, inspect, JSON) in a throwaway context, so a
// spare started ahead does not pay for it in its context's first run.
// The whole path, as a first command takes it: its JSON, a script run with breakOnSigint (whose first
// use sets up node's SIGINT watchdog), a number's and an object's bundle, the answer's JSON.
try {
  const cmd = JSON.parse(JSON.stringify({ code: "1 + 1", n: 0 }));
  const warm = vm.createContext({});
  for (const code of [cmd.code, "[1, 'a', { b: 2 }]"]) {
    const value = new vm.Script(code, { filename: "<warm-up>" }).runInContext(warm, { breakOnSigint: true, displayErrors: false });
    JSON.stringify({ t: "done", ok: true, result: bundle(value) });
  }
  errorOf(new Error("warm-up"));
} catch (e) { /* a warm-up only */ }

process.on("uncaughtException", (e) => {
  process.stderr.write("Uncaught " + (e && e.stack ? e.stack : String(e)) + "\n");
});
process.on("unhandledRejection", (e) => {
  process.stderr.write("Unhandled rejection " + (e && e.stack ? e.stack : String(e)) + "\n");
});

let buf = "";
let queue = Promise.resolve();
// A pipe read through the event loop (libuv's pipe handle): fs.createReadStream would read it in the
// thread pool, a thread hand-off per command (measured: 0.48 ms against 0.2 for a 1 + 1 round trip).
const input = new net.Socket({ fd: CMD_FD, readable: true, writable: false });
input.setEncoding("utf8");
input.on("data", (chunk) => {
  buf += chunk;
  let i;
  while ((i = buf.indexOf("\n")) >= 0) {
    const line = buf.slice(0, i);
    buf = buf.slice(i + 1);
    const cmd = JSON.parse(line);
    if (cmd.setup) {
      // A spare started ahead becomes a context's worker: its cwd and env come now, before any run.
      // What node read at its start (NODE_OPTIONS, NODE_PATH...) cannot change: the agent spawns
      // a new worker for an env that sets those.
      process.chdir(cmd.setup.cwd);
      for (const k of Object.keys(process.env)) delete process.env[k];
      Object.assign(process.env, cmd.setup.env);
      continue;
    }
    queue = queue.then(async () => {
      // The run's own environment (the session's and the request's env), for this cell only.
      const saved = {};
      for (const [k, v] of Object.entries(cmd.env || {})) {
        if (v === null) { delete process.env[k]; continue; } // the session dropped it: gone for good (contexts.py run_env)
        saved[k] = process.env[k];
        process.env[k] = v;
      }
      let answer;
      try {
        answer = await run(cmd.code || "", cmd.n || 0);
      } finally {
        for (const [k, v] of Object.entries(saved)) { if (v === undefined) delete process.env[k]; else process.env[k] = v; }
      }
      if (answer === null) send({ t: "done", ok: true });
      else if ("result" in answer) send({ t: "done", ok: true, result: answer.result });
      else send({ t: "done", ok: false, error: answer });
    }).catch((e) => {
      // Whatever went wrong, the command gets its done and the queue goes on (a rejected queue would
      // drop every later command without a word).
      let error;
      try { error = errorOf(e); } catch (e2) { error = { name: "Error", message: "the run failed", traceback: "" }; }
      try { send({ t: "done", ok: false, error }); } catch (e2) { /* the pipe is gone */ }
    });
  }
});
input.on("end", () => process.exit(0));
