// What test/store-files.test.ts and test/store-files-damage.test.ts share: the embedded store's
// files and folders as real processes meet them.
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import type { Test } from 'tap'
import { SHORT_COMMAND_V8_FLAGS } from '../../bin/v8-flags.ts'
import { childEnv, outcome, spawnClean, type CliResult } from './cli.ts'

export function tempDir(t: Pick<Test, 'teardown'>): string {
  const dir = mkdtempSync(join(tmpdir(), 'keygate-store-files-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  return dir
}

/**
 * Runs `body` in a child process, as an ES module with core/db.ts's `openDb` in scope, from a file
 * in `work` named `name` (not --input-type=module -e: the store's thread would take that flag with
 * no script); `what` names it in a failure. It and the other scripts these tests run in a process
 * of their own start with a short command's V8 flags (SHORT_COMMAND_V8_FLAGS), as each is one:
 * without them a script that opened a store took about 3.3 s of CPU, with them 1.1 s (V8's
 * optimising compiler and its background threads).
 */
export function storeScript(work: string, name: string, what: string, body: string): Promise<CliResult> {
  const script = join(work, name)
  writeFileSync(script, `const { openDb } = await import(${JSON.stringify(new URL('../../core/db.ts', import.meta.url).href)})\n${body}`)
  return outcome(spawnClean(process.execPath, [...SHORT_COMMAND_V8_FLAGS, script], { env: childEnv() }), [what])
}

/** The environment of a CLI command on the embedded store in `dataDir`, with nothing else configured. */
export function embeddedEnv(dataDir: string): Record<string, string | undefined> {
  return { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: undefined, REDIS_URL: undefined, KEYGATE_CONFIG: undefined, KEYGATE_ENCRYPTION_KEY: undefined }
}

/**
 * Runs `script` (an ES module, given core/'s folder as `core`) in a child process whose file
 * size limit is 0 (`ulimit -f 0`): every write to a file fails with EFBIG, as one on a full disk
 * fails with ENOSPC. Its output goes to pipes, which the limit does not cover.
 */
export function withNoFileSpace(script: string): Promise<CliResult> {
  const core = fileURLToPath(new URL('../../core/', import.meta.url))
  const child = spawnClean('sh', ['-c', `ulimit -f 0 && exec "$0" ${SHORT_COMMAND_V8_FLAGS.join(' ')} --input-type=module -e "$1"`, process.execPath, `const core = ${JSON.stringify(core)};\n${script}`], { env: childEnv() })
  return outcome(child, ['(a script with no file space)'])
}

