// node bench/create.ts [--blocks 20] [--per 25] [--keygate OTHER/bin/keygate.ts]
// What one key's creation costs through the admin API (POST /v1/keys: the key, its audit row and
// its key.created event, one transaction), on the embedded store and, with DATABASE_URL, on
// PostgreSQL. Each checkout (this one, and those given with `--keygate`: the code before a
// change, say) runs `keygate serve --only admin` on a fresh store of each kind; in each block,
// every server in turn is sent `per` creations, then `per` reads of a key (GET /v1/keys/{id}: the
// same listener, authentication and store round trip, no write), one at a time. Prints the median
// latency of each, and a creation as a ratio of a read, taken within each block.
import { spawn } from 'node:child_process'
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { countArg as arg, freshStores, here, median, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('blocks', 'per', 'keygate')

const BLOCKS = arg('blocks', 20)
const PER = arg('per', 25)
const { values } = parseArgs({ options: { keygate: { type: 'string', multiple: true }, blocks: { type: 'string' }, per: { type: 'string' } } })
const commands = [here('../bin/keygate.ts'), ...(values.keygate ?? [])]
const TOKEN = 'bench-admin-token-0123456789'

const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-create-'))
const stops: Array<() => void> = []
process.on('exit', () => {
  for (const stop of stops) stop()
  rmSync(dir, { recursive: true, force: true })
})

/** `keygate serve --only admin` of `command` on the store of `env`; its admin port. */
function serveAdmin(command: string, env: Record<string, string>): Promise<number> {
  const config = join(mkdtempSync(join(dir, 'config-')), 'keygate.yaml')
  writeFileSync(config, 'gateway: { listen: "127.0.0.1:0" }\nadmin: { listen: "127.0.0.1:0" }\nroutes: [ { name: api, path: /, upstream: "http://127.0.0.1:9" } ]\n')
  const child = spawn(process.execPath, [command, 'serve', '--only', 'admin'], {
    env: { ...process.env, ...env, KEYGATE_CONFIG: config, KEYGATE_ADMIN_TOKEN: TOKEN, LOG_LEVEL: 'info' },
    stdio: ['ignore', 'pipe', 'inherit'],
  })
  stops.push(() => child.kill('SIGKILL'))
  return new Promise((resolve, reject) => {
    let out = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      out += d
      const m = /"message":"admin listening","address":"[^"]*:(\d+)"/.exec(out)
      if (m) resolve(Number(m[1]))
    })
    child.once('exit', (code) => reject(new Error(`keygate serve exited with ${code}:\n${out}`)))
  })
}

let made = 0
/** One admin call's latency in ms; `expect` is its status. */
async function timed(port: number, method: string, path: string, expect: number, body?: unknown): Promise<{ ms: number; json: Record<string, unknown> }> {
  const start = performance.now()
  const r = await fetch(`http://127.0.0.1:${port}${path}`, {
    method,
    headers: { authorization: `Bearer ${TOKEN}`, ...(body === undefined ? {} : { 'content-type': 'application/json' }) },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  })
  const json = (await r.json()) as Record<string, unknown>
  const ms = performance.now() - start
  if (r.status !== expect) throw new Error(`${method} ${path} answered ${r.status}: ${JSON.stringify(json)}`)
  return { ms, json }
}
const create = (port: number) => timed(port, 'POST', '/v1/keys', 201, { name: `bench ${made++}`, type: 'service', scopes: ['orders:read', 'orders:write'], owner: 'team-a', metadata: { ticket: 'OPS-1' } })

interface Server {
  store: string
  command: string
  port: number
  keyId: string
  create: number[]
  read: number[]
  ratio: number[]
}
const servers: Server[] = []
const drops: Array<() => Promise<void>> = []
for (const store of freshStores(dir)) {
  for (const command of commands) {
    const { env, drop } = await store.open()
    drops.push(drop)
    const port = await serveAdmin(command, env)
    const first = await create(port)
    const keyId = (first.json.record as { id: string } | undefined)?.id ?? (first.json.id as string)
    servers.push({ store: store.name, command, port, keyId, create: [], read: [], ratio: [] })
  }
}
// Warm-up, not counted: the first statements of each kind are planned and compiled.
for (const s of servers) {
  for (let i = 0; i < 30; i++) {
    await create(s.port)
    await timed(s.port, 'GET', `/v1/keys/${s.keyId}`, 200)
  }
}
for (let block = 0; block < BLOCKS; block++) {
  // Each block in another order of servers: none is always measured first.
  const order = servers.map((_, i) => servers[(i + block) % servers.length] as Server)
  for (const s of order) {
    const creates: number[] = []
    const reads: number[] = []
    for (let i = 0; i < PER; i++) creates.push((await create(s.port)).ms)
    for (let i = 0; i < PER; i++) reads.push((await timed(s.port, 'GET', `/v1/keys/${s.keyId}`, 200)).ms)
    s.create.push(...creates)
    s.read.push(...reads)
    s.ratio.push(median(creates) / median(reads))
  }
}
for (const stop of stops) stop()
for (const drop of drops) await drop()

process.stdout.write(`\n${BLOCKS} blocks of ${PER} creations and ${PER} reads a server; medians (the ratio: over the blocks, each within its block)\n\n`)
process.stdout.write('| store | keygate | create ms | read ms | create / read |\n| --- | --- | --- | --- | --- |\n')
for (const s of servers) {
  process.stdout.write(`| ${s.store} | ${s.command} | ${median(s.create).toFixed(2)} | ${median(s.read).toFixed(2)} | ${median(s.ratio).toFixed(2)} |\n`)
}
process.exit(0)
