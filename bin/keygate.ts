#!/usr/bin/env node
// The keygate command. V8's compiled code for keygate and its dependencies is kept on disk, so a
// command starts in about half the time (0.6 s to 0.3 s for `keygate --help` here): in
// NODE_COMPILE_CACHE when set, else in the user's own cache folder (not a shared temporary one,
// where another user could plant compiled code). NODE_DISABLE_COMPILE_CACHE=1 turns it off; a
// folder that cannot be written leaves it off.
import { enableCompileCache } from 'node:module'
import { homedir } from 'node:os'
import { join } from 'node:path'

try {
  enableCompileCache(process.env.NODE_COMPILE_CACHE || join(process.env.XDG_CACHE_HOME || join(homedir(), '.cache'), 'keygate', 'compile-cache'))
} catch {
  // No cache: slower to start, nothing else.
}
// `serve` never ends on SIGHUP (the systemd unit's reload sends it). Its own handler comes once
// its modules have loaded; until then this one keeps Node's default, which ends the process.
if (process.argv[2] === 'serve') process.on('SIGHUP', () => {})
const { main } = await import('../cli/main.ts')
process.exitCode = await main(process.argv.slice(2))
