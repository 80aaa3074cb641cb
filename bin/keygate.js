#!/usr/bin/env node
// The installed `keygate` command. Node strips TypeScript's types only outside node_modules, so
// a package installed from npm runs the JavaScript that `npm pack` compiled into dist/; a clone
// (or `npm link` to one) runs its TypeScript directly, with no build step and nothing stale.
import { sep } from 'node:path'
import { fileURLToPath } from 'node:url'

const installed = fileURLToPath(import.meta.url).split(sep).includes('node_modules')
await import(installed ? '../dist/bin/keygate.js' : './keygate.ts')
