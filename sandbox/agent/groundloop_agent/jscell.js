// How a JavaScript or TypeScript cell becomes a script for jsworker.js's persistent vm context.
//
// A cell that V8 compiles as a script runs as it is (its top-level declarations
// persist, the last expression's value is the result): no parser is loaded.
// A cell V8 refuses because of ES module syntax (`import`, `export`) or a
// top-level `await` is parsed with acorn (Debian's node-acorn, which node itself
// depends on) and rewritten, the way node's REPL does it for `await`:
//
//   - static imports become `await` of a dynamic import, bound to globals
//     (`import fs from "node:fs"` -> `fs = (await import("node:fs")).default`);
//     `import()` is routed through the worker (`vm` scripts have no loader of
//     their own without --experimental-vm-modules), resolved from the cwd;
//   - the cell runs as an async function; its top-level `let`/`const`/`class`
//     names are declared outside it with `let`, `var` with `var`, functions are
//     assigned to the global, so they persist like a plain cell's;
//   - its last expression statement is returned: the cell's result.
//
// Limits (docs/protocol.md): an import binding is a variable (not live, not
// read-only); a `var` inside a block of a rewritten cell stays in the cell.
// TypeScript cells are transpiled (ts.transpileModule: syntax only, no type
// checking) and then handled like JavaScript ones.
"use strict";
const Module = require("module");
const path = require("path");
const { pathToFileURL } = require("url");

let acorn;
function parser() {
  if (acorn === undefined) {
    try { acorn = require("acorn"); } catch (e) { acorn = null; }
  }
  return acorn;
}

// ---- imports, resolved from the cell's working directory (like require), not from this file

function importFor(spec) {
  spec = String(spec);
  if (Module.isBuiltin(spec) || /^[a-z][a-z0-9+.-]*:/i.test(spec)) return import(spec);
  if (spec.startsWith(".") || spec.startsWith("/")) return import(pathToFileURL(path.resolve(process.cwd(), spec)).href);
  let resolved;
  try {
    resolved = Module.createRequire(path.join(process.cwd(), "<cell>")).resolve(spec);
  } catch (e) {
    return import(spec);  // an ES-only package's "import" condition, perhaps: node's own resolution says why not
  }
  return import(pathToFileURL(resolved).href);
}

// ---- TypeScript

let ts = null;
function loadTypeScript() {
  ts = require("typescript");
}

function transpile(code, filename) {
  const out = ts.transpileModule(code, {
    fileName: filename + ".ts",
    reportDiagnostics: true,
    compilerOptions: {
      target: ts.ScriptTarget.ES2022,
      module: ts.ModuleKind.ESNext,
      // An import a cell does not use is kept: a later cell may.
      isolatedModules: true,
      preserveValueImports: true,
      removeComments: false,
    },
  });
  const errors = (out.diagnostics || []).filter((d) => d.category === ts.DiagnosticCategory.Error);
  if (errors.length) {
    const text = errors.map((d) => {
      const msg = ts.flattenDiagnosticMessageText(d.messageText, "\n");
      if (!d.file || d.start === undefined) return `TS${d.code}: ${msg}`;
      const { line, character } = d.file.getLineAndCharacterOfPosition(d.start);
      return `${filename}:${line + 1}:${character + 1} TS${d.code}: ${msg}`;
    }).join("\n");
    const err = new SyntaxError(text);
    err.stack = "SyntaxError: " + text;
    throw err;
  }
  return out.outputText;
}

// ---- the rewrite of a module-syntax or top-level-await cell

function children(node, visit) {
  for (const key of Object.keys(node)) {
    const v = node[key];
    if (Array.isArray(v)) { for (const c of v) if (c && typeof c.type === "string") visit(c); }
    else if (v && typeof v.type === "string") visit(v);
  }
}

function patternNames(p, out) {
  if (!p) return out;
  if (p.type === "Identifier") out.push(p.name);
  else if (p.type === "ObjectPattern") for (const q of p.properties) patternNames(q.type === "RestElement" ? q.argument : q.value, out);
  else if (p.type === "ArrayPattern") for (const q of p.elements) patternNames(q, out);
  else if (p.type === "RestElement") patternNames(p.argument, out);
  else if (p.type === "AssignmentPattern") patternNames(p.left, out);
  return out;
}

function rewrite(code, importName) {
  const A = parser();
  if (!A) return null;
  let ast;
  try {
    ast = A.parse(code, {
      ecmaVersion: "latest", sourceType: "script", allowAwaitOutsideFunction: true,
      allowImportExportEverywhere: true, allowHashBang: true,
    });
  } catch (e) {
    return null;  // V8's own syntax error says it better
  }
  const calls = [];  // where an import() starts, in order
  (function visit(node) {
    if (node.type === "ImportExpression") calls.push(node.start);
    children(node, visit);
  })(ast);
  calls.sort((a, b) => a - b);
  // The code of [start, end) with its import() calls routed through the worker.
  const range = (start, end) => {
    let out = "", at = start;
    for (const c of calls) {
      if (c < start || c >= end) continue;
      out += code.slice(at, c) + importName;
      at = c + 6;
    }
    return out + code.slice(at, end);
  };
  const src = (n) => range(n.start, n.end);
  const edits = [];  // [start, end, text] of top-level statements, in order, non-overlapping
  const lets = new Set(), vars = new Set(), fns = [];
  const body = ast.body;
  body.forEach((stmt, i) => {
    let node = stmt;
    if (node.type === "ExportNamedDeclaration" || node.type === "ExportDefaultDeclaration") {
      if (!node.declaration) { edits.push([node.start, node.end, ";"]); return; }
      edits.push([node.start, node.declaration.start, ""]);  // `export`: a cell has no module to export from
      node = node.declaration;
    } else if (node.type === "ExportAllDeclaration") {
      edits.push([node.start, node.end, ";"]);
      return;
    }
    if (node.type === "ImportDeclaration") {
      const m = `(await ${importName}(${src(node.source)}))`;
      const parts = [];
      for (const s of node.specifiers) {
        vars.add(s.local.name);
        if (s.type === "ImportDefaultSpecifier") parts.push(`${s.local.name} = ${m}.default;`);
        else if (s.type === "ImportNamespaceSpecifier") parts.push(`${s.local.name} = ${m};`);
        else {
          const name = s.imported.type === "Literal" ? JSON.stringify(s.imported.value) : JSON.stringify(s.imported.name);
          parts.push(`${s.local.name} = ${m}[${name}];`);
        }
      }
      // One import() per specifier is one module load: the module cache answers the rest.
      edits.push([node.start, node.end, parts.length ? parts.join(" ") : `${m};`]);
    } else if (node.type === "VariableDeclaration") {
      const names = [];
      for (const d of node.declarations) patternNames(d.id, names);
      for (const n of names) (node.kind === "var" ? vars : lets).add(n);
      const assigns = node.declarations
        .filter((d) => d.init || node.kind !== "var")
        .map((d) => `(${src(d.id)} = ${d.init ? src(d.init) : "undefined"});`);
      edits.push([node.start, node.end, assigns.join(" ") || ";"]);
    } else if (node.type === "ClassDeclaration" && node.id) {
      lets.add(node.id.name);
      edits.push([node.start, node.end, `${node.id.name} = ${src(node)};`]);
    } else if (node.type === "FunctionDeclaration" && node.id) {
      fns.push(node.id.name);  // stays declared (hoisted) in the cell, and is given to the global
    } else if (node.type === "ExpressionStatement" && i === body.length - 1 && stmt === node) {
      edits.push([node.start, node.end, `return (${src(node.expression)});`]);
    }
  });
  let out = "", at = 0;
  for (const [s, e, t] of edits) {
    out += range(at, s) + t;
    at = e;
  }
  out += range(at, code.length);
  for (const n of lets) vars.delete(n);
  const head = (lets.size ? `let ${[...lets].join(", ")}; ` : "") + (vars.size ? `var ${[...vars].join(", ")}; ` : "");
  const give = fns.map((n) => `globalThis[${JSON.stringify(n)}] = ${n}; `).join("");
  // One line: the cell's own lines keep their numbers in errors.
  return `${head}(async () => { ${give}${out}\n})()`;
}

module.exports = { importFor, loadTypeScript, transpile, rewrite };
