// What the benchmarks share: the processes they start (the fixed-response upstream, the bare proxy
// and keygate, `keygate serve` with every stage on), each optionally under a wrapper command
// (valgrind for bench/instructions.ts), and the median. Every child is killed when the benchmark exits.
import { execFileSync, fork, spawn, type ChildProcess } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { constants } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { Redis } from 'ioredis'
import pg from 'pg'

export const here = (f: string) => fileURLToPath(new URL(f, import.meta.url))
const KEYGATE = here('../bin/keygate.ts')
const children: ChildProcess[] = []

process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})
// A benchmark stopped by a signal exits through the handlers above and its own (each removes its
// folder): before, `kill` of a run left its upstream, proxies and keygates running.
for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.once(signal, () => process.exit(128 + constants.signals[signal]))

export interface Server {
  port: number
  pid: number
  child: ChildProcess
  /** What it wrote on stdout so far (keygate's log). */
  output(): string
}

/** A wrapper command and its arguments, run with the Node binary and the script after them. */
export type Wrapper = readonly string[]

/** Forks a bench server that reports its port over IPC (upstream.ts, baseline-proxy.ts). */
export function forkServer(file: string, args: string[] = [], wrapper: Wrapper = []): Promise<Server> {
  const [command, ...rest] = wrapper
  const child = fork(here(file), args, { stdio: ['ignore', 'ignore', 'inherit', 'ipc'], ...(command ? { execPath: command, execArgv: [...rest, process.execPath] } : {}) })
  children.push(child)
  return new Promise((resolve, reject) => {
    child.once('message', (m: { port: number }) => resolve({ port: m.port, pid: child.pid as number, child, output: () => '' }))
    child.once('exit', (code) => reject(new Error(`${file} exited with ${code}`)))
  })
}

/** Runs the keygate CLI with `env` added (its stdout). */
export function cli(args: string[], env: Record<string, string>): string {
  return execFileSync(process.execPath, [KEYGATE, ...args], { env: { ...process.env, ...env }, encoding: 'utf8' })
}

/** Starts `keygate serve` (of another checkout: its bin/keygate.ts as `keygate`) and resolves with its gateway port once it listens. */
export function startKeygate(env: Record<string, string>, wrapper: Wrapper = [], keygate = KEYGATE): Promise<Server> {
  const [command, ...rest] = [...wrapper, process.execPath]
  const child = spawn(command as string, [...rest, keygate, 'serve'], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] })
  children.push(child)
  return new Promise((resolve, reject) => {
    let buffer = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      buffer += d
      const m = /"message":"gateway listening","address":"[^"]*:(\d+)"/.exec(buffer)
      if (m) resolve({ port: Number(m[1]), pid: child.pid as number, child, output: () => buffer })
    })
    child.once('exit', (code) => reject(new Error(`keygate serve exited with ${code}:\n${buffer}`)))
  })
}

/** A started keygate's admin listener address (host:port), from its log: it may listen just after the gateway. */
export async function adminAddress(server: Server): Promise<string> {
  for (let waited = 0; waited < 10_000; waited += 50) {
    const m = /"message":"admin listening","address":"([^"]+)"/.exec(server.output())
    if (m) return m[1] as string
    await new Promise((r) => setTimeout(r, 50))
  }
  throw new Error(`no admin address in keygate's log within 10 s:\n${server.output()}`)
}

/**
 * The Redis key prefix of this run's keygates (redis.key_prefix): a bench run on a Redis that a
 * deployment uses shares none of its limits, lockouts or invalidations, whatever prefix the
 * environment names.
 */
export const BENCH_REDIS_PREFIX = `keygate-bench-${process.pid}:`

/**
 * Stops every child, then removes this run's keys from Redis at `url`: those under
 * BENCH_REDIS_PREFIX and under `keygate-bench-PID-` (a prefix per keygate). Most expire, but
 * keygate's invalidation version key does not: before, every run left one in a Redis others use.
 */
export async function removeBenchRedisKeys(url: string): Promise<void> {
  await Promise.all(children.filter((c) => c.exitCode === null && c.signalCode === null).map((c) => new Promise((r) => c.once('exit', r).kill('SIGKILL'))))
  const redis = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 1, retryStrategy: () => null, connectTimeout: 2000 })
  redis.on('error', () => {})
  try {
    await redis.connect()
    for (const match of [`${BENCH_REDIS_PREFIX}*`, `keygate-bench-${process.pid}-*`]) {
      let cursor = '0'
      do {
        const [next, found] = await redis.scan(cursor, 'MATCH', match, 'COUNT', 1000)
        if (found.length > 0) await redis.del(...found)
        cursor = next
      } while (cursor !== '0')
    }
  } catch (err) {
    process.stderr.write(`bench: could not remove this run's keys from Redis at ${url}: ${(err as Error).message}\n`)
  } finally {
    redis.disconnect()
  }
}

// Every stage on: keygate believes X-Forwarded-For from loopback, has deny entries, counts
// failed attempts, limits per address and per key (high enough never to refuse here), checks
// the route's scope.
export function keygateEnv(dataDir: string, upstream: number, extra: Record<string, string> = {}): Record<string, string> {
  execFileSync('mkdir', ['-p', dataDir])
  const config = join(dataDir, 'keygate.yaml')
  writeFileSync(
    config,
    [
      'gateway: { listen: "127.0.0.1:0", trusted_proxies: ["127.0.0.1/32"] }',
      'admin: { listen: "127.0.0.1:0" }',
      `routes: [ { name: api, path: /, upstream: "http://127.0.0.1:${upstream}", scopes: [bench] } ]`,
      'deny_list: ["192.0.2.0/24", "198.51.100.7", "2001:db8::/32"]',
      'rate_limits: { per_address: { limit: 1000000000, window_s: 1 }, per_key: { default: { limit: 1000000000, window_s: 1 }, service: { limit: 1000000000, window_s: 1 } } }',
      'lockout: { max_attempts: 1000000, window_s: 60 }',
      '',
    ].join('\n'),
  )
  return { KEYGATE_CONFIG: config, KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKEN: 'bench-admin-token-0123456789', LOG_LEVEL: 'info', DATABASE_URL: '', REDIS_URL: '', KEYGATE_REDIS_KEY_PREFIX: BENCH_REDIS_PREFIX, ...extra }
}

/** A service key with the route's scope, made with the CLI (which also sets the store up). */
export function createKey(env: Record<string, string>): string {
  return (JSON.parse(cli(['api-key', 'create', '--type', 'service', '--name', 'bench', '--scopes', 'bench', '--json'], env)) as { key: string }).key
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? (s[(s.length - 1) / 2] as number) : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2
}

/** `--name N` from the command line, a whole number above 0 (`fallback` when not given); exits 2 on anything else. */
export function countArg(name: string, fallback: number): number {
  const i = process.argv.indexOf(`--${name}`)
  const v = i === -1 ? fallback : Number(process.argv[i + 1])
  if (!Number.isInteger(v) || v <= 0) {
    process.stderr.write(`--${name} takes a whole number above 0\n`)
    process.exit(2)
  }
  return v
}

/** `--name N,M,...` from the command line, whole numbers above 0 (`fallback` when not given); exits 2 on anything else. */
export function countsArg(name: string, fallback: number[]): number[] {
  const i = process.argv.indexOf(`--${name}`)
  const vs = i === -1 ? fallback : String(process.argv[i + 1]).split(',').map(Number)
  if (!vs.every((v) => Number.isInteger(v) && v > 0)) {
    process.stderr.write(`--${name} takes whole numbers above 0, separated by commas\n`)
    process.exit(2)
  }
  return vs
}

/**
 * Exits 2 naming the first `--option` on the command line that is not one of `known` (without
 * the dashes): before, a misspelt option was ignored and the run went on with the default (or,
 * in the benchmarks reading options with parseArgs, crashed with a stack trace).
 */
export function refuseUnknownFlags(...known: string[]): void {
  const unknown = process.argv.slice(2).find((a) => a.startsWith('--') && !known.includes(a.slice(2)))
  if (unknown === undefined) return
  const hint = unknown.includes('=') ? ' (give its value after a space)' : ''
  process.stderr.write(`unknown option ${unknown}${hint}: this benchmark takes ${known.length > 0 ? known.map((k) => `--${k}`).join(', ') : 'no options'}\n`)
  process.exit(2)
}

/** What Redis at `url` answers a PING with: 'PONG', or why it does not (within 2 s). */
export async function redisAnswer(url: string): Promise<string> {
  const probe = new Redis(url, { lazyConnect: true, maxRetriesPerRequest: 0, retryStrategy: () => null, connectTimeout: 2000 })
  probe.on('error', () => {})
  const pong = await probe.connect().then(() => probe.ping(), (err: Error) => err.message)
  probe.disconnect()
  return pong
}

/**
 * Throws unless keygate with REDIS_URL counted in Redis all along: it falls back to its in-memory
 * limits when Redis stops answering, and its log says so. A Redis scenario is measured on Redis
 * or not at all.
 */
export function redisUsedThroughout(server: Server): void {
  if (/Redis is not answering/.test(server.output())) throw new Error(`keygate with REDIS_URL fell back to its in-memory limits during the run, so the Redis limiter was not measured:\n${server.output()}`)
}

/** A kind of store a benchmark measures on, made afresh for each use. */
export interface FreshStore {
  name: 'embedded' | 'postgres'
  /** A new store: keygate's environment for it (the other store's variables and REDIS_URL emptied), and what removes it. */
  open(): Promise<{ env: Record<string, string>; drop(): Promise<void> }>
}

/** The embedded store (a folder under `dir` each) and, with DATABASE_URL, PostgreSQL (a database each, dropped after). */
export function freshStores(dir: string): FreshStore[] {
  const stores: FreshStore[] = [
    {
      name: 'embedded',
      open: async () => {
        const dataDir = mkdtempSync(join(dir, 'store-'))
        return { env: { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: '', REDIS_URL: '' }, drop: async () => rmSync(dataDir, { recursive: true, force: true }) }
      },
    },
  ]
  const databaseUrl = process.env.DATABASE_URL
  if (databaseUrl) {
    const encryptionKey = randomBytes(32).toString('base64')
    const admin = async (sql: string): Promise<void> => {
      const c = new pg.Client({ connectionString: databaseUrl })
      await c.connect()
      try {
        await c.query(sql)
      } finally {
        await c.end()
      }
    }
    stores.push({
      name: 'postgres',
      open: async () => {
        const name = `kg_bench_${randomBytes(6).toString('hex')}`
        await admin(`CREATE DATABASE ${name}`)
        const url = new URL(databaseUrl)
        url.pathname = `/${name}`
        return { env: { DATABASE_URL: url.toString(), KEYGATE_ENCRYPTION_KEY: encryptionKey, REDIS_URL: '' }, drop: () => admin(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`) }
      },
    })
  }
  return stores
}
