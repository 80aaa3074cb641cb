// The embedded stores of the tests start from a copy of one initialised PGlite data folder, made
// once per machine and PGlite version, rather than each running PGlite's initdb: that costs about
// 6 s of CPU per store and writes the same folder every time, and the suite opens over a hundred
// stores.
// Everything after it (migrations, keygate's own first start) still runs in each store. The
// tests of a store made from nothing (test/embedded-store.test.ts, test/package.test.ts) do not
// use it.
import { cpSync, existsSync, mkdirSync, mkdtempSync, readFileSync, renameSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PGlite } from '@electric-sql/pglite'

const PGLITE_VERSION = (JSON.parse(readFileSync(new URL('../../node_modules/@electric-sql/pglite/package.json', import.meta.url), 'utf8')) as { version: string }).version
const ROOT = join(tmpdir(), `keygate-test-pglite-${PGLITE_VERSION}`)
const FOLDER = join(ROOT, 'pgdata')

let made: Promise<void> | undefined

/** Makes the template when this machine has none: in a folder of its own, then renamed into place (tap runs test files side by side). */
async function template(): Promise<void> {
  if (existsSync(FOLDER)) return
  const work = mkdtempSync(`${ROOT}-making-`)
  try {
    const db = await PGlite.create(join(work, 'pgdata'))
    await db.close()
    try {
      renameSync(work, ROOT)
    } catch (err) {
      // Another test file made it first.
      if (!existsSync(FOLDER)) throw err
    }
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
}

/**
 * Puts an initialised data folder into `storeDir` (a keygate data folder, `--data-dir`), which must
 * hold none yet, so that a keygate started on it finds a store to open rather than running initdb.
 * Returns `storeDir`.
 */
export async function seedDataDir(storeDir: string): Promise<string> {
  await (made ??= template())
  mkdirSync(storeDir, { recursive: true, mode: 0o700 })
  cpSync(FOLDER, join(storeDir, 'pgdata'), { recursive: true, errorOnExist: true, force: false })
  return storeDir
}
