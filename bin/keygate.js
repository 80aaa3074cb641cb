#!/usr/bin/env node
// The `keygate` command, in a clone and in the npm package alike. A clone runs its TypeScript
// directly (no build step, so never a stale one, even with a dist/ left by `npm run build`). The
// package carries no TypeScript: it runs what `npm pack` compiled into dist/, since Node strips
// no types under node_modules, wherever it was unpacked (node_modules, /opt, a container).
import { existsSync } from 'node:fs'

// 22.18 is the first 22.x that strips types by default (package.json engines). An older Node
// failed with ERR_UNKNOWN_FILE_EXTENSION and a stack trace, or a syntax error, in place of a reason.
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 22 || (major === 22 && minor < 18)) {
  process.stderr.write(`keygate: needs Node.js 22.18 or later (24 is the target); this is v${process.versions.node} at ${process.execPath}\n`)
  process.exit(1)
}

await import(existsSync(new URL('./keygate.ts', import.meta.url)) ? './keygate.ts' : '../dist/bin/keygate.js')
