// Loaded first into every test process (package.json, tap.node-arg): V8's compiled code for
// tap, keygate and their dependencies, and Node's TypeScript stripped of its types, are kept on
// disk between runs, as bin/keygate.js keeps them for the `keygate` command. Without it, each of
// the suite's seventy test processes compiled and stripped the same files again: loading the
// helpers alone took about 1.6 s of CPU, 0.7 s from the cache (measured here, 2026-12-05).
// Plain JavaScript, so that Node's TypeScript loader is not loaded for this file before the cache
// is on. In node_modules/.cache, the project's own, never a shared temporary folder. A folder
// that cannot be made leaves the cache off: slower, nothing else. Only this process uses it: the
// processes the tests start keep the command's own (bin/keygate.js), as they would anywhere.
import { mkdirSync } from 'node:fs'
import module from 'node:module'

const folder = new URL('../node_modules/.cache/keygate-tests/compile-cache', import.meta.url)
try {
  mkdirSync(folder, { recursive: true, mode: 0o700 })
  module.enableCompileCache(folder.pathname)
} catch {}
