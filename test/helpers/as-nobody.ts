// Runs the real `keygate` command as user nobody (uid 65534), or another uid, for what only another
// user than root sees: a folder it may not read, a uid without a name. Needs a test process running
// as root, and setpriv.
import { spawnSync } from 'node:child_process'
import { chmodSync, chownSync, copyFileSync, linkSync, mkdirSync, mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import type { Test } from 'tap'
import { SHORT_COMMAND_V8_FLAGS } from '../../bin/v8-flags.ts'
import { childEnv, KEYGATE_BIN, outcome, spawnClean, type CliResult } from './cli.ts'

export const NOBODY = 65534

const as = (uid: number) => [`--reuid=${uid}`, `--regid=${uid}`, '--clear-groups']

export interface AsNobody {
  /** Runs `keygate args` as nobody (or the uid given), in a folder of its own, with `env` added to the test's environment. */
  run(args: string[], env?: Record<string, string | undefined>): Promise<CliResult>
}

/**
 * A way to run keygate as nobody (or as `uid`, which need not name a user: a container's
 * runAsUser), or why there is none here (for `t.skip`). Node's binary is
 * linked (or copied) into a folder nobody can reach: the one running the tests may be under
 * root's home, closed to other users.
 */
export function asNobody(t: Pick<Test, 'teardown'>, uid = NOBODY): AsNobody | string {
  if (process.getuid?.() !== 0) return 'the tests do not run as root'
  if (spawnSync('setpriv', ['--version']).status !== 0) return 'setpriv is not installed'
  const home = mkdtempSync(join(tmpdir(), 'keygate-nobody-'))
  chmodSync(home, 0o755)
  t.teardown(() => rmSync(home, { recursive: true, force: true }))
  const node = join(home, 'node')
  try {
    linkSync(process.execPath, node)
  } catch {
    copyFileSync(process.execPath, node)
  }
  const reach = spawnSync('setpriv', [...as(uid), node, '-e', 'require("fs").accessSync(process.argv[1])', KEYGATE_BIN], { cwd: home })
  if (reach.status !== 0) return `uid ${uid} cannot read ${KEYGATE_BIN}`
  // The user's own compile cache, kept between its runs in this process, and the command started
  // as the second process bin/keygate.ts would start (runCli's way, test/helpers/cli.ts): without
  // them each run compiled keygate anew, in two processes, about 0.3 s more CPU a command. What
  // the user may open is the same either way.
  const cache = join(home, 'compile-cache')
  mkdirSync(cache, { mode: 0o700 })
  chownSync(cache, uid, uid)
  return {
    run: (args, env = {}) =>
      outcome(
        spawnClean('setpriv', [...as(uid), node, ...SHORT_COMMAND_V8_FLAGS, KEYGATE_BIN, ...args], {
          env: childEnv({ HOME: home, NODE_COMPILE_CACHE: cache, NODE_DISABLE_COMPILE_CACHE: undefined, ...env }),
          cwd: home,
          stdio: ['ignore', 'pipe', 'pipe'],
        }),
        args,
      ),
  }
}
