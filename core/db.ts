// One small SQL interface over PostgreSQL (pg) and the embedded store (PGlite), so every
// migration and every query in keygate is written once and runs on both.
import { mkdirSync, openSync, closeSync, writeSync, readFileSync, unlinkSync } from 'node:fs'
import { join, resolve } from 'node:path'
import pg from 'pg'
import { PGlite } from '@electric-sql/pglite'
import { KeygateError } from './errors.ts'

export interface Queryable {
  query<R = Record<string, unknown>>(text: string, params?: readonly unknown[]): Promise<R[]>
  /** Runs a script of several statements without parameters (migrations). */
  exec(script: string): Promise<void>
}

export interface Db extends Queryable {
  readonly kind: 'postgres' | 'embedded'
  /** Runs `fn` in one transaction: committed when it resolves, rolled back when it throws. */
  transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T>
  close(): Promise<void>
}

/** SQLSTATE of a database error, when it is one. */
export function sqlState(err: unknown): string | undefined {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) ? code : undefined
}

export const UNIQUE_VIOLATION = '23505'

class PostgresDb implements Db {
  readonly kind = 'postgres'
  readonly #pool: pg.Pool

  constructor(url: string, max: number) {
    this.#pool = new pg.Pool({ connectionString: url, max, connectionTimeoutMillis: 5000, idleTimeoutMillis: 30_000 })
    // An idle client losing its connection must not crash the process; the next query reconnects.
    this.#pool.on('error', () => {})
  }

  async query<R>(text: string, params?: readonly unknown[]): Promise<R[]> {
    return (await this.#pool.query(text, params as unknown[])).rows as R[]
  }

  async exec(script: string): Promise<void> {
    await this.#pool.query(script)
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    const client = await this.#pool.connect()
    const tx: Queryable = {
      query: async <R>(t: string, p?: readonly unknown[]) => (await client.query(t, p as unknown[])).rows as R[],
      exec: async (script: string) => {
        await client.query(script)
      },
    }
    try {
      await client.query('BEGIN')
      const result = await fn(tx)
      await client.query('COMMIT')
      client.release()
      return result
    } catch (err) {
      try {
        await client.query('ROLLBACK')
        client.release()
      } catch {
        client.release(true)
      }
      throw err
    }
  }

  async close(): Promise<void> {
    await this.#pool.end()
  }
}

class EmbeddedDb implements Db {
  readonly kind = 'embedded'
  readonly #db: PGlite
  readonly #release: () => void

  constructor(db: PGlite, release: () => void) {
    this.#db = db
    this.#release = release
  }

  async query<R>(text: string, params?: readonly unknown[]): Promise<R[]> {
    return (await this.#db.query<R>(text, params as unknown[])).rows
  }

  async exec(script: string): Promise<void> {
    await this.#db.exec(script)
  }

  async transaction<T>(fn: (tx: Queryable) => Promise<T>): Promise<T> {
    return this.#db.transaction(async (t) =>
      fn({
        query: async <R>(q: string, p?: readonly unknown[]) => (await t.query<R>(q, p as unknown[])).rows,
        exec: async (script: string) => {
          await t.exec(script)
        },
      }),
    )
  }

  async close(): Promise<void> {
    try {
      await this.#db.close()
    } finally {
      this.#release()
    }
  }
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0)
    return true
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM'
  }
}

/**
 * The embedded store is one process's: a lock file holding the owner's pid keeps a second
 * process (a CLI beside a running server) from opening and corrupting it. A lock left by a
 * process that no longer runs is taken over.
 */
function lockDataDir(dir: string): () => void {
  const file = join(dir, 'keygate.lock')
  for (let attempt = 0; attempt < 2; attempt++) {
    try {
      const fd = openSync(file, 'wx', 0o600)
      writeSync(fd, String(process.pid))
      closeSync(fd)
      return () => {
        try {
          unlinkSync(file)
        } catch {}
      }
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err
      const owner = Number(readFileSync(file, 'utf8').trim())
      if (Number.isInteger(owner) && owner > 0 && owner !== process.pid && processAlive(owner)) {
        throw new KeygateError(
          'store_locked',
          `the embedded store in ${dir} is in use by process ${owner}; stop it, or point the CLI at its admin API with KEYGATE_ADMIN_URL and KEYGATE_ADMIN_TOKEN`,
          { pid: owner },
        )
      }
      unlinkSync(file)
    }
  }
  throw new KeygateError('store_locked', `could not lock the embedded store in ${dir}`)
}

export interface OpenDbOptions {
  databaseUrl?: string | undefined
  dataDir?: string | undefined
  poolMax?: number
  /** An embedded store in memory only (tests). */
  memory?: boolean
}

export async function openDb(options: OpenDbOptions): Promise<Db> {
  if (options.databaseUrl) {
    const db = new PostgresDb(options.databaseUrl, options.poolMax ?? 10)
    try {
      await db.query('SELECT 1')
    } catch (err) {
      await db.close().catch(() => {})
      const where = new URL(options.databaseUrl)
      throw new KeygateError('store_unavailable', `cannot reach PostgreSQL at ${where.hostname}:${where.port || 5432}: ${(err as Error).message}`, undefined, { cause: err })
    }
    return db
  }
  if (options.memory) return new EmbeddedDb(await PGlite.create(), () => {})
  const dir = resolve(options.dataDir ?? './.keygate')
  mkdirSync(dir, { recursive: true, mode: 0o700 })
  const release = lockDataDir(dir)
  try {
    return new EmbeddedDb(await PGlite.create(join(dir, 'pgdata')), release)
  } catch (err) {
    release()
    throw new KeygateError('store_unavailable', `cannot open the embedded store in ${dir}: ${(err as Error).message}`, undefined, { cause: err })
  }
}
