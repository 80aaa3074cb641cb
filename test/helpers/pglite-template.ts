// The embedded stores of the tests start from a copy of one initialised PGlite data folder, made
// once per machine and PGlite version, rather than each running PGlite's initdb: that costs about
// 6 s of CPU per store and writes the same folder every time, and the suite opens over a hundred
// stores.
// Everything after it (migrations, keygate's own first start) still runs in each store, unless the
// test asks for a store migrated already (`migrated`): a copy of a second folder, the first with
// keygate's migrations applied, made once per PGlite version and set of migration files. Applying
// them took 0.4 to 0.5 s of CPU in each store, on the first command or serve to open it, in tests
// whose store is a fixture. The tests of a store made from nothing (test/embedded-store.test.ts's
// closed store, test/package.test.ts) use neither; the tests of what the first opening does
// (migrate's output, the first command's) use the first.
import { createHash } from 'node:crypto'
import { cpSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, renameSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { PGlite } from '@electric-sql/pglite'

const PGLITE_VERSION = (JSON.parse(readFileSync(new URL('../../node_modules/@electric-sql/pglite/package.json', import.meta.url), 'utf8')) as { version: string }).version
const ROOT = join(tmpdir(), `keygate-test-pglite-${PGLITE_VERSION}`)
const FOLDER = join(ROOT, 'pgdata')

/** The migration files, by name and content: a folder migrated from other files is another folder. */
function migrationsDigest(): string {
  const dir = new URL('../../migrations/', import.meta.url)
  const digest = createHash('sha256')
  for (const name of readdirSync(dir).filter((f) => f.endsWith('.sql')).sort()) digest.update(name).update('\0').update(readFileSync(new URL(name, dir))).update('\0')
  return digest.digest('hex').slice(0, 16)
}

let made: Promise<void> | undefined
let migratedMade: Promise<string> | undefined

/** Makes `root` (holding pgdata/) when this machine has none: in a folder of its own, then renamed into place (tap runs test files side by side). */
async function makeOnce(root: string, make: (work: string) => Promise<void>): Promise<void> {
  if (existsSync(join(root, 'pgdata'))) return
  const work = mkdtempSync(`${root}-making-`)
  try {
    await make(work)
    try {
      renameSync(work, root)
    } catch (err) {
      // Another test file made it first.
      if (!existsSync(join(root, 'pgdata'))) throw err
    }
  } finally {
    rmSync(work, { recursive: true, force: true })
  }
}

async function template(): Promise<void> {
  await makeOnce(ROOT, async (work) => {
    const db = await PGlite.create(join(work, 'pgdata'))
    await db.close()
  })
}

/** The migrated folder: the initialised one, opened as keygate opens a store and migrated. */
async function migratedTemplate(): Promise<string> {
  await (made ??= template())
  const root = `${ROOT}-migrated-${migrationsDigest()}`
  await makeOnce(root, async (work) => {
    const store = join(work, 'store')
    mkdirSync(store, { mode: 0o700 })
    cpSync(FOLDER, join(store, 'pgdata'), { recursive: true })
    const [{ openDb }, { migrate }] = await Promise.all([import('../../core/db.ts'), import('../../core/migrate.ts')])
    const db = await openDb({ dataDir: store, shortLived: true })
    try {
      await migrate(db)
    } finally {
      await db.close()
    }
    renameSync(join(store, 'pgdata'), join(work, 'pgdata'))
    rmSync(store, { recursive: true, force: true })
  })
  return join(root, 'pgdata')
}

/**
 * Puts an initialised data folder into `storeDir` (a keygate data folder, `--data-dir`), which must
 * hold none yet, so that a keygate started on it finds a store to open rather than running initdb;
 * with `migrated`, one with keygate's migrations applied. Returns `storeDir`.
 */
export async function seedDataDir(storeDir: string, options: { migrated?: boolean } = {}): Promise<string> {
  const from = options.migrated === true ? await (migratedMade ??= migratedTemplate()) : (await (made ??= template()), FOLDER)
  mkdirSync(storeDir, { recursive: true, mode: 0o700 })
  cpSync(from, join(storeDir, 'pgdata'), { recursive: true, errorOnExist: true, force: false })
  return storeDir
}
