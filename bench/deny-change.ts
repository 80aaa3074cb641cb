// node bench/deny-change.ts [--entries 20000] [--rounds 3] [--keygate OTHER/bin/keygate.ts]
// How long one change of a large deny list holds a gateway's event loop: `keygate serve` on a
// store holding `entries` stored entries (IPv4 /32s, inserted by SQL), then one entry added through
// its admin API and, later, removed. Meanwhile a separate thread asks the gateway's /healthz, one
// request after another on one connection, and keeps the longest any of them waited. On the
// embedded store one process; with DATABASE_URL also PostgreSQL, with two processes on the one
// database and REDIS_URL (when set): the one whose admin API makes the change (it applies it at
// once, then reloads) and another that hears of it over Redis (it reloads). Each phase lasts
// `--phase-ms` after the admin API's answer, long enough for every reload it causes; the baseline
// is an idle phase as long, just before. A request through the other gateway from the added
// address proves the change arrived (403 ip_blocked, then not). Prints, per store, process and
// keygate, the medians over the rounds of the longest wait, and its ratio to the idle phase's.
// `--keygate` measures another checkout's command beside this one's, in the same rounds.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { Worker } from 'node:worker_threads'
import pg from 'pg'
import { openDb } from '../core/db.ts'
import { adminAddress, countArg as arg, forkServer, freshStores, here, keygateEnv, median, removeBenchRedisKeys, startKeygate, type Server, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('entries', 'rounds', 'keygate', 'phase-ms')

const ENTRIES = arg('entries', 20_000)
const ROUNDS = arg('rounds', 3)
const PHASE_MS = arg('phase-ms', 1500)
const TOKEN = 'bench-admin-token-0123456789'
const ADDED = '198.18.0.1'
const { values } = parseArgs({ options: { keygate: { type: 'string', multiple: true }, entries: { type: 'string' }, rounds: { type: 'string' }, 'phase-ms': { type: 'string' } } })
const commands = [here('../bin/keygate.ts'), ...(values.keygate ?? [])]

const work = mkdtempSync(join(tmpdir(), 'keygate-deny-change-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const upstream = (await forkServer('./upstream.ts')).port

// The requests to a gateway, in a thread of their own.
const PINGER = `
const { parentPort, workerData } = require('node:worker_threads')
const http = require('node:http')
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
let longest = 0, running = true
const one = () => new Promise((resolve, reject) => {
  const started = performance.now()
  http.get({ host: '127.0.0.1', port: workerData.port, path: '/healthz', agent }, (res) => {
    res.resume().once('end', () => { longest = Math.max(longest, performance.now() - started); resolve() })
  }).once('error', reject)
})
parentPort.on('message', (m) => {
  if (m === 'stop') running = false
  else { parentPort.postMessage(longest); longest = 0 }
})
;(async () => { while (running) await one(); agent.destroy(); parentPort.close() })()
`

/** A pinger of the gateway on `port`; `take()` gives the longest wait since the last take. */
async function pinger(port: number) {
  const worker = new Worker(PINGER, { eval: true, workerData: { port } })
  await new Promise((r) => setTimeout(r, 100))
  return {
    take: () => new Promise<number>((resolve) => {
      worker.once('message', resolve)
      worker.postMessage('take')
    }),
    stop: () => worker.terminate(),
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms))

async function admin(address: string, method: string, path: string, body?: unknown): Promise<{ id: string }> {
  const answer = await fetch(`http://${address}${path}`, { method, headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, ...(body ? { body: JSON.stringify(body) } : {}) })
  const text = await answer.text()
  if (!answer.ok) throw new Error(`${method} ${path} was answered ${answer.status}: ${text}`)
  return JSON.parse(text) as { id: string }
}

/** Whether the gateway on `port` refuses ADDED (it believes X-Forwarded-For from loopback). */
async function blocks(port: number): Promise<boolean> {
  const answer = await fetch(`http://127.0.0.1:${port}/`, { headers: { 'x-forwarded-for': ADDED } })
  await answer.arrayBuffer()
  return answer.status === 403
}

const SEED = `INSERT INTO deny_list (id, cidr, created_by) SELECT 'e' || g, '10.' || (g >> 16) % 256 || '.' || (g >> 8) % 256 || '.' || g % 256, 'bench' FROM generate_series(0, ${ENTRIES} - 1) g`

type Phase = 'idle' | 'add' | 'remove'
type Who = 'changes' | 'hears'
const results = new Map<string, number[]>()
const record = (key: string, v: number) => (results.get(key) ?? results.set(key, []).get(key))?.push(v)

for (const store of freshStores(work)) {
  for (let round = 0; round < ROUNDS; round++) {
    for (const command of commands) {
      const opened = await store.open()
      const dataDir = mkdtempSync(join(work, 'dir-'))
      const twoProcesses = store.name === 'postgres'
      const env = keygateEnv(dataDir, upstream, { ...opened.env, KEYGATE_REDIS_KEY_PREFIX: `keygate-bench-${process.pid}-${round}-${commands.indexOf(command)}:`, ...(twoProcesses ? { REDIS_URL: process.env.REDIS_URL ?? '' } : {}) })
      execFileSync(process.execPath, [command, 'migrate'], { env: { ...process.env, ...env }, stdio: 'ignore' })
      if (store.name === 'postgres') {
        const c = new pg.Client({ connectionString: env.DATABASE_URL })
        await c.connect()
        await c.query(SEED)
        await c.query('VACUUM ANALYZE deny_list')
        await c.end()
      } else {
        const db = await openDb({ dataDir: env.KEYGATE_DATA_DIR })
        await db.query(SEED)
        await db.close()
      }
      const servers: Array<{ who: Who; server: Server }> = [{ who: 'changes', server: await startKeygate(env, [], command) }]
      if (twoProcesses) servers.push({ who: 'hears', server: await startKeygate(env, [], command) })
      const address = await adminAddress(servers[0]!.server)
      const watchers = await Promise.all(servers.map((s) => pinger(s.server.port)))
      const last = servers[servers.length - 1]!.server.port
      const phase = async (name: Phase, during: () => Promise<void>) => {
        await Promise.all(watchers.map((w) => w.take()))
        await during()
        await sleep(PHASE_MS)
        const waits = await Promise.all(watchers.map((w) => w.take()))
        servers.forEach((s, i) => record(`${store.name}|${s.who}|${command}|${name}`, waits[i]!))
      }
      await sleep(500)
      await phase('idle', async () => {})
      let id = ''
      await phase('add', async () => void (id = (await admin(address, 'POST', '/v1/deny-list', { cidr: ADDED })).id))
      if (!(await blocks(last))) throw new Error(`${store.name}: the last gateway does not block ${ADDED} ${PHASE_MS} ms after it was added`)
      await phase('remove', async () => void (await admin(address, 'DELETE', `/v1/deny-list/${id}`)))
      if (await blocks(last)) throw new Error(`${store.name}: the last gateway still blocks ${ADDED} ${PHASE_MS} ms after it was removed`)
      await Promise.all(watchers.map((w) => w.stop()))
      for (const { server } of servers) {
        server.child.kill('SIGTERM')
        await new Promise((r) => server.child.once('exit', r))
      }
      await opened.drop()
      rmSync(dataDir, { recursive: true, force: true })
    }
  }
}

const lines = [
  `One deny list change among ${ENTRIES.toLocaleString('en')} stored entries: the longest wait of a gateway /healthz, ms, medians of ${ROUNDS} rounds (ratio to the idle phase just before), Node ${process.version}`,
  '',
  '| store | process | keygate | idle | add | remove |',
  '| --- | --- | --- | --- | --- | --- |',
]
for (const store of ['embedded', 'postgres'])
  for (const who of ['changes', 'hears'])
    for (const command of commands) {
      const of = (p: Phase) => results.get(`${store}|${who}|${command}|${p}`)
      const idle = of('idle')
      if (!idle) continue
      const cell = (p: Phase) => {
        const xs = of(p) as number[]
        return `${median(xs).toFixed(1)} (${median(xs.map((x, i) => x / (idle[i] as number))).toFixed(1)})`
      }
      lines.push(`| ${store} | ${who === 'changes' ? 'makes the change' : 'hears of it (Redis)'} | ${command} | ${median(idle).toFixed(1)} | ${cell('add')} | ${cell('remove')} |`)
    }
process.stdout.write(`${lines.join('\n')}\n`)
if (process.env.DATABASE_URL && process.env.REDIS_URL) await removeBenchRedisKeys(process.env.REDIS_URL)
process.exit(0)
