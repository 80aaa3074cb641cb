#!/usr/bin/env node
// The `keygate` command, in a clone and in the npm package alike. A clone runs its TypeScript
// directly (no build step, so never a stale one, even with a dist/ left by `npm run build`). The
// package carries no TypeScript: it runs what `npm pack` compiled into dist/, since Node strips
// no types under node_modules, wherever it was unpacked (node_modules, /opt, a container).
import { existsSync, mkdirSync } from 'node:fs'
import module from 'node:module'
import { homedir } from 'node:os'
import { join } from 'node:path'

// 22.18 is the first 22.x that strips types by default (package.json engines). An older Node
// failed with ERR_UNKNOWN_FILE_EXTENSION and a stack trace, or a syntax error, in place of a reason.
const [major, minor] = process.versions.node.split('.').map(Number)
if (major < 22 || (major === 22 && minor < 18)) {
  process.stderr.write(`keygate: needs Node.js 22.18 or later (24 is the target); this is v${process.versions.node} at ${process.execPath}\n`)
  process.exit(1)
}

// V8's compiled code for keygate and its dependencies, and Node's TypeScript stripped of its
// types, are kept on disk, so a command starts in about half the time: in NODE_COMPILE_CACHE when
// set, else in the user's own cache folder (not a shared temporary one, where another user could
// plant compiled code). NODE_DISABLE_COMPILE_CACHE=1 turns it off; a folder that cannot be
// written leaves it off. It is turned on here, before keygate's first TypeScript file: turned on
// there, that file was stripped by Node's TypeScript loader, whose loading alone took about
// 0.3 s of CPU in every command. NODE_COMPILE_CACHE names it for the threads and processes
// keygate starts (the embedded store's thread, the command's child on V8's baseline compiler,
// `serve --workers`), which take it up as they start: a Worker's own modules are otherwise
// compiled anew each time (PGlite's, about 0.2 s of CPU at every opening of the store).
// The folders are made here, one level at a time below the cache home: Node's own making of
// them loops for ever where a mkdir fails with ENOENT although the parent exists, as under /proc
// (before, `XDG_CACHE_HOME=/proc/nope keygate --version` spun a CPU without a word).
if (process.env.NODE_COMPILE_CACHE === undefined) {
  const home = process.env.XDG_CACHE_HOME || join(homedir(), '.cache')
  const folder = join(home, 'keygate', 'compile-cache')
  try {
    for (const level of [home, join(home, 'keygate'), folder]) {
      try {
        mkdirSync(level, { mode: 0o700 })
      } catch (err) {
        if (err.code !== 'EEXIST') throw err
      }
    }
    const { status } = module.enableCompileCache(folder)
    if (status === module.constants.compileCacheStatus.ENABLED || status === module.constants.compileCacheStatus.ALREADY_ENABLED) process.env.NODE_COMPILE_CACHE = folder
  } catch {
    // No cache: slower to start, nothing else.
  }
}

await import(existsSync(new URL('./keygate.ts', import.meta.url)) ? './keygate.ts' : '../dist/bin/keygate.js')
