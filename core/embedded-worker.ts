// The embedded store's own thread: PGlite (PostgreSQL compiled to WebAssembly) runs here, never
// on the thread that serves requests, where a query would stop the gateway for as long as it
// runs (and, measured side by side on the benchmark's bare proxy, PGlite merely loaded on the
// serving thread made each proxied request cost about 1.07× the CPU). core/db.ts (EmbeddedDb) is the other end:
// one message per query, and a transaction as begin, its queries, then commit or rollback.
import { parentPort, workerData } from 'node:worker_threads'
import { PGlite, type Transaction } from '@electric-sql/pglite'
import { nestsDeeper } from './depth.ts'
import { fileSystemErrorWords, postgresLogLine } from './errors.ts'

export type Request =
  | { id: number; op: 'query'; sql: string; params: readonly unknown[] | undefined; tx: number | undefined }
  | { id: number; op: 'exec'; sql: string; tx: number | undefined }
  | { id: number; op: 'begin' }
  | { id: number; op: 'commit' | 'rollback'; tx: number }
  | { id: number; op: 'close' }

/** An error as it crosses the thread: its message and the fields of a PostgreSQL error (code, detail, constraint…). */
export interface WireError {
  message: string
  fields: Record<string, string | number>
}

export type Reply = { id: number; ok: true; value?: unknown } | { id: number; ok: false; error: WireError }

/** The first message: the store is open, or why it could not be opened. */
export type Ready = { ready: true } | { ready: false; error: WireError }

/**
 * Sent once, unasked, when PostgreSQL logs a FATAL error once the store is open (an idle session
 * or transaction timeout set on the store, say): its words. PostgreSQL ends its session on one;
 * PGlite shuts the database down, then answers nothing more, its thread spinning a CPU. No reply
 * tells of it: only the log line does.
 */
export type Fatal = { fatal: string }

/**
 * A thrown value as an Error: PGlite's file system throws plain objects (`{errno}`, in
 * Emscripten's numbering), which print as [object Object]. Their errno is given in words, and
 * the code (ENOSPC, never set as the error's `code`: five capitals read as a SQLSTATE).
 */
function asError(err: unknown): Error {
  if (err instanceof Error) return err
  if (typeof err === 'object' && err !== null) {
    const o = err as { message?: unknown; code?: unknown; errno?: unknown }
    if (typeof o.message === 'string' && o.message !== '') return new Error(o.message)
    if (o.errno !== undefined) return new Error(fileSystemErrorWords(o.errno))
    if (o.code !== undefined) return new Error(`file system error ${String(o.code)}`)
  }
  return new Error(String(err))
}

function wire(err: unknown): WireError {
  const e = asError(err)
  const fields: Record<string, string | number> = {}
  for (const [k, v] of Object.entries(e)) if (typeof v === 'string' || typeof v === 'number') fields[k] = v
  return { message: e.message, fields }
}

const ROLLBACK = Symbol('rollback')

/**
 * Deeper than this a result does not cross to the other thread: V8 reads a message back
 * recursively and runs out of stack a few thousand levels down, and the message is then lost
 * (the query would never be answered). Such a result is answered as an error instead.
 */
const MAX_RESULT_DEPTH = 1000

interface OpenTx {
  t: Transaction
  finish(commit: boolean): void
  done: Promise<unknown>
}

async function serve(db: PGlite): Promise<void> {
  const port = parentPort as NonNullable<typeof parentPort>
  const txs = new Map<number, OpenTx>()
  let nextTx = 1
  const reply = (r: Reply) => port.postMessage(r)

  const handle = async (m: Request): Promise<unknown> => {
    switch (m.op) {
      case 'query': {
        const { rows } = await (m.tx === undefined ? db : (txs.get(m.tx) as OpenTx).t).query(m.sql, m.params as unknown[])
        // Rows, then their columns, then the value's own levels.
        if (nestsDeeper(rows, MAX_RESULT_DEPTH + 2)) throw new Error(`a value in the result nests deeper than ${MAX_RESULT_DEPTH} levels, too deep to pass between threads`)
        return rows
      }
      case 'exec':
        await (m.tx === undefined ? db : (txs.get(m.tx) as OpenTx).t).exec(m.sql)
        return undefined
      case 'begin': {
        // PGlite runs one transaction at a time (its own lock); this resolves once ours has begun.
        const id = nextTx++
        return new Promise<number>((begun, failed) => {
          let finish!: (commit: boolean) => void
          const held = new Promise<void>((resolve, reject) => {
            finish = (commit) => (commit ? resolve() : reject(ROLLBACK))
          })
          const done = db.transaction(async (t) => {
            txs.set(id, { t, finish, done })
            begun(id)
            await held
          })
          done.catch((err: unknown) => {
            // Failed before it began (BEGIN itself); a later failure is the commit's or rollback's to report.
            if (!txs.has(id)) failed(err)
          })
        })
      }
      case 'commit':
      case 'rollback': {
        const tx = txs.get(m.tx) as OpenTx
        tx.finish(m.op === 'commit')
        try {
          await tx.done
        } catch (err) {
          if (err !== ROLLBACK) throw err
        } finally {
          txs.delete(m.tx)
        }
        return undefined
      }
      case 'close':
        await db.close()
        return undefined
    }
  }

  port.on('message', (m: Request) => {
    handle(m).then(
      (value) => reply({ id: m.id, ok: true, value }),
      (err: unknown) => reply({ id: m.id, ok: false, error: wire(err) }),
    )
  })
}

/** What core/db.ts starts the thread with: the data folder (none: in memory). */
export interface WorkerOptions {
  dataDir: string | undefined
  /** PostgreSQL's shared_buffers (such as '16MB'); undefined: its default, 128MB. */
  sharedBuffers: string | undefined
}

/** PostgreSQL's lines on stderr kept while the store opens (its own words when it cannot). */
const KEPT_LINES = 20
/** The most of them an error names. */
const NAMED_LINES = 4

/**
 * What PostgreSQL said as it failed to start on the store's files (the last of its log lines; no
 * HINT, whose "It looks like you need to initdb" would make a new store over the old), or
 * undefined when it said nothing.
 */
function postgresWords(lines: readonly string[]): string | undefined {
  const said = lines.flatMap((line) => {
    const m = postgresLogLine(line)
    return m ? [`${m.level}: ${m.message}`] : []
  })
  return said.length === 0 ? undefined : said.slice(-NAMED_LINES).join('; ')
}

/**
 * PGlite's own words when PostgreSQL cannot start ("Aborted(). Build with -sASSERTIONS for more
 * info.", "PGlite failed to initialize properly"), replaced by PostgreSQL's: before (found by a
 * review), a truncated pg_control or WAL, or files of another PostgreSQL version, said only that.
 */
function openError(err: unknown, lines: readonly string[]): WireError {
  const e = wire(err)
  const words = postgresWords(lines)
  if (words === undefined || !/^(?:Aborted\(\)|PGlite failed to initialize)/.test(e.message)) return e
  const said = `PostgreSQL could not start on its files: ${words.replace(/\.$/, '')}`
  // A write of its start refused for want of room (recovery after a crash writes to the WAL, and
  // may make a new 16 MB segment of it): the files are as a crash left them, which PostgreSQL
  // recovers once it can write. Before (found by a review), this too advised restoring a backup
  // over them, losing what was written since.
  if (/: (?:No space left on device|File too large|Disk quota exceeded)(?:;|\.?$)/.test(words)) {
    return { ...e, message: `${said}. The data folder's file system is full (or a disk quota, or the file size limit of ulimit -f, was reached): make room there and start again, and PostgreSQL recovers its files as after a crash; do not restore a backup over them for this` }
  }
  return { ...e, message: `${said}. If another keygate version made the store, run that one; if its files were cut short or damaged (a full disk, a crash of the machine, a copy made while keygate ran), restore the data folder from a backup; keygate makes no new store over them` }
}

const { dataDir, sharedBuffers } = workerData as WorkerOptions
const stderr: string[] = []
let opening = true
let fatal = false
try {
  const startParams = sharedBuffers === undefined ? undefined : [...PGlite.defaultStartParams, '-c', `shared_buffers=${sharedBuffers}`]
  // PGlite prints the line itself either way (nothing, without its debug option).
  const onStderr = (line: string): boolean => {
    if (opening) {
      stderr.push(line)
      if (stderr.length > KEPT_LINES) stderr.shift()
    } else if (!fatal) {
      // Told from inside PGlite's loop, which never returns: the other thread ends this one.
      const m = postgresLogLine(line)
      if (m?.level === 'FATAL') {
        fatal = true
        parentPort?.postMessage({ fatal: m.message } satisfies Fatal)
      }
    }
    return false
  }
  const db = await PGlite.create({ dataDir, onStderr, ...(startParams ? { startParams } : {}) })
  opening = false
  stderr.length = 0
  await serve(db)
  parentPort?.postMessage({ ready: true } satisfies Ready)
} catch (err) {
  parentPort?.postMessage({ ready: false, error: openError(err, stderr) } satisfies Ready)
}
