#!/usr/bin/env node
// The `keygate` command, in a clone and in the npm package alike. A clone runs its TypeScript
// directly (no build step, so never a stale one, even with a dist/ left by `npm run build`). The
// package carries no TypeScript: it runs what `npm pack` compiled into dist/, since Node strips
// no types under node_modules, wherever it was unpacked (node_modules, /opt, a container).
import { existsSync, lstatSync, mkdirSync, readdirSync, realpathSync, statSync } from 'node:fs'
import module from 'node:module'
import { homedir } from 'node:os'
import { dirname, join, resolve } from 'node:path'

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
// A folder another user could write to is left off too (ownedAlone).
// The home folder is asked for inside the guard: os.homedir() throws where HOME is unset and the
// uid names no user (a container's runAsUser started with a bare environment; before, found by a
// deployment review, every command ended here with a stack trace).
if (process.env.NODE_COMPILE_CACHE === undefined) {
  try {
    const home = process.env.XDG_CACHE_HOME || join(homedir(), '.cache')
    const folder = join(home, 'keygate', 'compile-cache')
    for (const level of [home, join(home, 'keygate'), folder]) {
      try {
        mkdirSync(level, { mode: 0o700 })
      } catch (err) {
        if (err.code !== 'EEXIST') throw err
      }
    }
    if (!ownedAlone(folder)) throw new Error('another user could write to the compile cache')
    const { status } = module.enableCompileCache(folder)
    if (status === module.constants.compileCacheStatus.ENABLED || status === module.constants.compileCacheStatus.ALREADY_ENABLED) process.env.NODE_COMPILE_CACHE = folder
  } catch {
    // No cache: slower to start, nothing else.
  }
}

/**
 * Whether no user but this process's (or root) can put a file in `folder`: it is theirs and
 * writable by no one else (nor, where others may enter it, is anything in it), and each folder
 * above it, as written and as its links lead, is theirs and writable by others only where sticky
 * (as /tmp), so that none on the way can be renamed and replaced. Node takes the cache's files as
 * they are (a CRC, which whoever plants a file recomputes), and the stripped TypeScript in them is
 * plain JavaScript that runs as keygate. Before (found by a review), folders already there were
 * taken as found: a compile-cache folder of mode 0777, or a cache home of another user's (sudo
 * keeping HOME), had keygate run what that user put there.
 */
function ownedAlone(folder) {
  const uid = process.geteuid?.()
  // No owners to compare (Windows).
  if (uid === undefined) return true
  const safe = (s, sticky) => (s.uid === uid || s.uid === 0) && ((s.mode & 0o022) === 0 || (sticky && (s.mode & 0o1000) !== 0))
  const own = statSync(folder)
  if (!own.isDirectory() || !safe(own, false)) return false
  if ((own.mode & 0o011) !== 0) for (const entry of readdirSync(folder)) if (!safe(lstatSync(join(folder, entry)), false)) return false
  for (const path of [resolve(folder), realpathSync(folder)]) {
    for (let at = dirname(path); ; at = dirname(at)) {
      const s = lstatSync(at)
      // A link is replaced only through the folder that holds it, which is looked at next.
      if (!s.isSymbolicLink() && !safe(s, true)) return false
      if (dirname(at) === at) break
    }
  }
  return true
}

await import(existsSync(new URL('./keygate.ts', import.meta.url)) ? './keygate.ts' : '../dist/bin/keygate.js')
