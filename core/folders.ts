// Making a folder and the missing ones above it, without Node's recursive mkdir.
import { existsSync, mkdirSync, statSync } from 'node:fs'
import { dirname, resolve } from 'node:path'

/**
 * What `mkdirSync(path, { recursive: true, mode })` does, one level at a time from the nearest
 * folder that exists, and a failure thrown as it comes. Node's own loops for ever where making a
 * folder fails with ENOENT although its parent exists, as anywhere under /proc: before (found by
 * a review), `--data-dir /proc/nope/x` and `XDG_CACHE_HOME=/proc/nope` spun a CPU without a word.
 * A path that is there and not a folder is EEXIST, as with Node's.
 */
export function makeFolders(path: string, mode: number): void {
  const levels: string[] = []
  for (let at = resolve(path); ; at = dirname(at)) {
    levels.unshift(at)
    if (dirname(at) === at || existsSync(dirname(at))) break
  }
  for (const level of levels) {
    try {
      mkdirSync(level, { mode })
    } catch (err) {
      // Made meanwhile by another process, or there before: fine if it is a folder.
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST' || !statSync(level).isDirectory()) throw err
    }
  }
}
