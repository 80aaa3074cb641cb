// node bench/admin-import.ts [--rounds 3] [--keygate OTHER/bin/keygate.ts]
// How long an import through the admin API holds `keygate serve`'s event loop, and with it the
// gateway where one process serves both listeners: POST /v1/keys/import of the largest body it
// takes in rows (10,000 legacy keys with 2.6 KB of metadata each, 28 MB), on a fresh embedded
// store each round. Meanwhile a separate thread asks the gateway's /healthz, one request after
// another on one connection, and keeps the longest any of them waited. The baseline is the same
// requests for as long again with no import: the longest wait of an idle server on this machine
// now. Prints, per keygate, the medians over the rounds of the import's time, the longest wait
// during it and that wait as a ratio of the baseline's. `--keygate` measures another checkout's
// command beside this one's, in the same rounds (the code before a change, say).
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { parseArgs } from 'node:util'
import { Worker } from 'node:worker_threads'
import { adminAddress, countArg as arg, forkServer, here, keygateEnv, median, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('rounds', 'keygate')

const ROUNDS = arg('rounds', 3)
const ROWS = 10_000
const TOKEN = 'bench-admin-token-0123456789'
const { values } = parseArgs({ options: { keygate: { type: 'string', multiple: true }, rounds: { type: 'string' } } })
const commands = [here('../bin/keygate.ts'), ...(values.keygate ?? [])]

const work = mkdtempSync(join(tmpdir(), 'keygate-admin-import-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const upstream = (await forkServer('./upstream.ts')).port

/** A body of ROWS new legacy keys, each with 50 metadata fields of 40 characters. */
function importBody(): string {
  const metadata: Record<string, string> = {}
  for (let i = 0; i < 50; i++) metadata[`field_${i}`] = 'v'.repeat(40)
  const rows = Array.from({ length: ROWS }, (_, i) => ({ key_hash: createHash('sha256').update(randomUUID()).digest('hex'), name: `legacy ${i}`, owner: 'team-a', scopes: ['orders:read'], metadata }))
  return JSON.stringify({ rows })
}

// The requests to the gateway, in a thread of their own: this thread's reading of the import's
// 31 MB answer would otherwise delay them too.
const PINGER = `
const { parentPort, workerData } = require('node:worker_threads')
const http = require('node:http')
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 })
let running = true, longest = 0, count = 0
parentPort.once('message', () => (running = false))
const one = () => new Promise((resolve, reject) => {
  const started = performance.now()
  http.get({ host: '127.0.0.1', port: workerData.port, path: '/healthz', agent }, (res) => {
    res.resume().once('end', () => { longest = Math.max(longest, performance.now() - started); count++; resolve() })
  }).once('error', reject)
})
;(async () => { while (running) await one(); parentPort.postMessage({ longest, count }); agent.destroy() })()
`

/** The longest a /healthz of the gateway on `port` waits while `during` runs, in ms, and how many were answered. */
async function longestWait(port: number, during: () => Promise<void>): Promise<{ longest: number; count: number }> {
  const pinger = new Worker(PINGER, { eval: true, workerData: { port } })
  await new Promise((r) => setTimeout(r, 200))
  await during()
  pinger.postMessage('stop')
  const result = await new Promise<{ longest: number; count: number }>((resolve) => pinger.once('message', resolve))
  await pinger.terminate()
  return result
}

interface Round {
  importMs: number
  longest: number
  baseline: number
}
const results = new Map<string, Round[]>(commands.map((c) => [c, []]))
for (let round = 0; round < ROUNDS; round++) {
  for (const command of commands) {
    const server = await startKeygate(keygateEnv(join(work, `store-${round}-${results.get(command)?.length}-${commands.indexOf(command)}`), upstream), [], command)
    const admin = await adminAddress(server)
    const body = importBody()
    let importMs = 0
    const during = await longestWait(server.port, async () => {
      const started = performance.now()
      const answer = await fetch(`http://${admin}/v1/keys/import`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body })
      await answer.arrayBuffer()
      importMs = performance.now() - started
      if (answer.status !== 201) throw new Error(`the import was answered ${answer.status}, not 201`)
    })
    const idle = await longestWait(server.port, () => new Promise((r) => setTimeout(r, importMs)))
    results.get(command)?.push({ importMs, longest: during.longest, baseline: idle.longest })
    server.child.kill('SIGTERM')
    await new Promise((r) => server.child.once('exit', r))
  }
}

const lines = [
  `POST /v1/keys/import of ${ROWS.toLocaleString('en')} rows (${(importBody().length / 1e6).toFixed(1)} MB) on the embedded store, medians of ${ROUNDS} rounds, Node ${process.version}:`,
  '',
  '| keygate | import, ms | longest wait of a gateway request during it, ms | the same, idle, ms | ratio |',
  '| --- | --- | --- | --- | --- |',
  ...commands.map((c) => {
    const rounds = results.get(c) ?? []
    const m = (f: (r: Round) => number) => median(rounds.map(f))
    return `| ${c} | ${m((r) => r.importMs).toFixed(0)} | ${m((r) => r.longest).toFixed(0)} | ${m((r) => r.baseline).toFixed(1)} | ${m((r) => r.longest / r.baseline).toFixed(0)} |`
  }),
  '',
]
process.stdout.write(lines.join('\n'))
process.exit(0)
