#!/usr/bin/env node
// The `keygate` command, in a clone and in the npm package alike. A clone runs its TypeScript
// directly (no build step, so never a stale one, even with a dist/ left by `npm run build`). The
// package carries no TypeScript: it runs what `npm pack` compiled into dist/, since Node strips
// no types under node_modules, wherever it was unpacked (node_modules, /opt, a container).
import { existsSync } from 'node:fs'

await import(existsSync(new URL('./keygate.ts', import.meta.url)) ? './keygate.ts' : '../dist/bin/keygate.js')
