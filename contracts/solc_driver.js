// Reads a solc standard-JSON input on stdin, compiles it with solc-js, prints the output JSON.
// Imports are resolved from contracts/src and contracts/node_modules only.
"use strict";
const fs = require("fs");
const path = require("path");
const solc = require("solc");

const root = __dirname;

function findImports(importPath) {
  const candidates = [path.join(root, "src", importPath), path.join(root, "node_modules", importPath)];
  for (const candidate of candidates) {
    if (fs.existsSync(candidate)) {
      return { contents: fs.readFileSync(candidate, "utf8") };
    }
  }
  return { error: "import not found: " + importPath };
}

const input = fs.readFileSync(0, "utf8");
const output = solc.compile(input, { import: findImports });
process.stdout.write(JSON.stringify({ solcVersion: solc.version(), output: JSON.parse(output) }));
