// What the integration suites share: a configuration pointing at a service, a logger whose lines
// are kept for the no-secret checks, the services built over a test store, and a look at every
// row of every table (the "dump" the no-secret checks search).
import { execFileSync } from 'node:child_process'
import http from 'node:http'
import net from 'node:net'
import type { Test } from 'tap'
import { loadConfig } from '../../config/load.ts'
import type { Db } from '../../core/db.ts'
import { createLogger, type Logger } from '../../core/log.ts'
import { AuditCipher, AuditLog } from '../../core/audit.ts'
import type { IntegrationDeps } from '../../core/integrations/track.ts'
import { GiteaTokenService } from '../../core/integrations/gitea.ts'
import { FakeGitea } from './fake-gitea.ts'
import { TEST_ENCRYPTION_KEY, type Store } from './stores.ts'

/** Every log line the integration services wrote in this process. */
export const capturedLogs: string[] = []

export function captureLogger(): Logger {
  return createLogger({ level: 'debug', write: (line) => capturedLogs.push(line) })
}

export function integrationDeps(db: Db, env: Record<string, string>): IntegrationDeps & { audit: AuditLog } {
  return { db, audit: new AuditLog(new AuditCipher(TEST_ENCRYPTION_KEY)), log: captureLogger(), config: loadConfig({ env }) }
}

/** Every row of every table of the store as text, plus pg_dump's output on PostgreSQL. */
export async function dumpStore(store: Store): Promise<string> {
  const tables = await store.db.query<{ table_name: string }>(`SELECT table_name FROM information_schema.tables WHERE table_schema = 'public' ORDER BY 1`)
  const parts: string[] = []
  for (const { table_name } of tables) {
    const rows = await store.db.query(`SELECT * FROM ${table_name}`)
    parts.push(`${table_name}: ${JSON.stringify(rows, (_k, v: unknown) => (v instanceof Uint8Array ? Buffer.from(v).toString('latin1') : v))}`)
  }
  if (store.url) parts.push(execFileSync('pg_dump', ['--data-only', store.url], { encoding: 'utf8', maxBuffer: 64 * 1024 * 1024, stdio: ['ignore', 'pipe', 'ignore'] }))
  return parts.join('\n')
}

/** A store whose transactions fail, as when the database goes away right after a remote create. */
export function failingTransactions(db: Db): Db {
  return {
    kind: db.kind,
    onLost: (listener) => db.onLost(listener),
    query: (text, params) => db.query(text, params),
    exec: (script) => db.exec(script),
    probing: (ms) => db.probing(ms),
    transaction: async () => {
      throw new Error('the store went away')
    },
    close: async () => {},
  }
}

/** The store, but every statement whose text matches `failing` fails as a store gone away would. */
export function failingQueries(db: Db, failing: RegExp): Db {
  return {
    kind: db.kind,
    onLost: (listener) => db.onLost(listener),
    query: async (text, params) => {
      if (failing.test(text)) throw new Error('the store went away')
      return db.query(text, params)
    },
    exec: (script) => db.exec(script),
    probing: () => failingQueries(db, failing),
    transaction: (fn) => db.transaction(fn),
    close: async () => {},
  }
}

/** Asserts that none of `secrets` occurs in `text`, naming what was searched. */
export function noSecrets(t: Test, text: string, secrets: readonly string[], where: string): void {
  t.ok(secrets.length > 0, `${where}: there are secrets to look for`)
  // An undefined one (a field the answer lacked) would be looked for as the word "undefined".
  t.same(secrets.filter((s) => typeof s !== 'string'), [], `${where}: every secret looked for is a string`)
  const found = secrets.filter((s) => s !== '' && text.includes(s))
  t.same(found.length, 0, `${where}: holds none of ${secrets.length} secrets`)
}

/** A loopback port nothing listens on (it was free a moment ago). */
export async function freePort(): Promise<number> {
  const s = net.createServer()
  await new Promise<void>((r) => s.listen(0, '127.0.0.1', r))
  const port = (s.address() as net.AddressInfo).port
  await new Promise((r) => s.close(r))
  return port
}

/** A running fake Gitea with user alice, and a GiteaTokenService on `db` configured for it; both stop with `t`. */
export async function giteaOnFake(t: Test, db: Db): Promise<{ fake: FakeGitea; gitea: GiteaTokenService; password: string }> {
  const password = 'alice-Secret-pw-1'
  const fake = new FakeGitea()
  await fake.start()
  fake.addUser('alice', password)
  t.teardown(() => fake.stop())
  const gitea = new GiteaTokenService(integrationDeps(db, { GITEA_URL: fake.url, GITEA_USERNAME: 'alice', GITEA_PASSWORD: password }))
  t.teardown(() => gitea.close())
  return { fake, gitea, password }
}

/**
 * A proxy in front of the fake (or another server: n8n) that passes every request on and the fake's answer back; `answer`
 * may take the fake's answer over (returning true), after the fake has acted on the request, and
 * `hold` may hold a request back until it calls `go`, and `instead` may answer it without passing it on.
 */
export async function proxyTo(
  t: Test,
  fake: Pick<FakeGitea, 'url'>,
  hooks: {
    answer?: (req: http.IncomingMessage, answer: http.IncomingMessage, res: http.ServerResponse) => boolean
    hold?: (req: http.IncomingMessage, go: () => void) => void
    /** Answers a request itself, never passing it on (a proxy that refuses it), returning true. */
    instead?: (req: http.IncomingMessage, res: http.ServerResponse) => boolean
  },
): Promise<string> {
  const proxy = http.createServer((req, res) => {
    if (hooks.instead?.(req, res)) return void req.resume()
    const forward = () => {
      const up = http.request(fake.url + req.url, { method: req.method, headers: req.headers }, (answer) => {
        if (hooks.answer?.(req, answer, res)) return answer.resume()
        res.writeHead(answer.statusCode ?? 502, answer.headers)
        answer.pipe(res)
      })
      req.pipe(up)
    }
    if (hooks.hold) hooks.hold(req, forward)
    else forward()
  })
  await new Promise<void>((resolve) => proxy.listen(0, '127.0.0.1', resolve))
  t.teardown(() => {
    proxy.closeAllConnections()
    return new Promise((resolve) => proxy.close(resolve))
  })
  return `http://127.0.0.1:${(proxy.address() as net.AddressInfo).port}`
}
