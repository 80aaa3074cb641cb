// node bench/shared-buffers.ts [--keys 100000] [--rounds 3] [--seconds 15]
// What store.embedded_shared_buffers_mb costs and saves, in one run: an embedded store of
// `keys` legacy keys (imported with `keygate api-key import`, 10,000 rows a file), served by
// `keygate serve` with 128 (PostgreSQL's default, the baseline), 32 and 16 MiB of shared buffers
// in turn, the order the same in every round. Each serve has cache.max_capacity 1, so nearly
// every request is a key-cache miss answered from the store: the case the buffers can matter to.
// 16 keep-alive connections present random keys for 5 s (not counted), then for `seconds`. For
// each run: requests answered 200 a second, and the serve process's resident memory at the end
// (VmRSS). Prints the medians, and each setting's req/s as a ratio of 128's in the same round.
// Linux only (/proc).
import { createHash, randomUUID } from 'node:crypto'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Pool } from 'undici'
import { countArg as arg, cli, forkServer, median, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('keys', 'rounds', 'seconds')

const KEYS = arg('keys', 100_000)
const ROUNDS = arg('rounds', 3)
const SECONDS = arg('seconds', 15)
const SETTINGS = [128, 32, 16]
const CONNECTIONS = 16

const dir = mkdtempSync(join(tmpdir(), 'keygate-bench-buffers-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
const dataDir = join(dir, 'store')
// The embedded store whatever the shell names: with DATABASE_URL set (as beside a PostgreSQL
// deployment), the import went to that database, or failed for want of KEYGATE_ENCRYPTION_KEY.
const EMBEDDED = { KEYGATE_DATA_DIR: dataDir, DATABASE_URL: '', REDIS_URL: '' }
const keys: string[] = []
for (let file = 0; file * 10_000 < KEYS; file++) {
  const rows: string[] = []
  for (let i = file * 10_000; i < Math.min(KEYS, (file + 1) * 10_000); i++) {
    const key = randomUUID()
    keys.push(key)
    rows.push(JSON.stringify({ key_hash: createHash('sha256').update(key).digest('hex'), name: `k${i}` }))
  }
  const path = join(dir, `rows${file}.jsonl`)
  writeFileSync(path, rows.join('\n') + '\n')
  cli(['api-key', 'import', path, '--type', 'service'], EMBEDDED)
}
process.stdout.write(`${keys.length} keys imported into ${dataDir}\n`)

// The fixed-response upstream in a process of its own, as in the other benches: in this one it took
// the event loop and CPU the load generator needs.
const upstream = await forkServer('./upstream.ts')
const config = join(dir, 'keygate.yaml')
writeFileSync(config, 'rate_limits:\n  per_address: { limit: 1000000000, window_s: 1 }\n')

async function measure(mb: number): Promise<{ reqps: number; rssMiB: number }> {
  const env = {
    KEYGATE_CONFIG: config,
    ...EMBEDDED,
    KEYGATE_LISTEN: '127.0.0.1:0',
    KEYGATE_ADMIN_LISTEN: '127.0.0.1:0',
    KEYGATE_UPSTREAM: `http://127.0.0.1:${upstream.port}`,
    KEYGATE_ADMIN_TOKEN: 'a-bench-admin-token-of-32-chars!',
    CACHE_MAX_CAPACITY: '1',
    KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: String(mb),
    LOG_LEVEL: 'info',
  }
  const { port, pid, child } = await startKeygate(env)
  const pool = new Pool(`http://127.0.0.1:${port}`, { connections: CONNECTIONS })
  let ok = 0
  let other = 0
  const drive = async (until: number) => {
    while (Date.now() < until) {
      const res = await pool.request({ path: '/', method: 'GET', headers: { authorization: `Bearer ${keys[Math.floor(Math.random() * keys.length)]}` } })
      await res.body.dump()
      if (res.statusCode === 200) ok++
      else other++
    }
  }
  await Promise.all(Array.from({ length: CONNECTIONS }, () => drive(Date.now() + 5000)))
  ok = 0
  other = 0
  const began = Date.now()
  await Promise.all(Array.from({ length: CONNECTIONS }, () => drive(began + SECONDS * 1000)))
  const reqps = ok / ((Date.now() - began) / 1000)
  const rssMiB = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]) / 1024
  await pool.close()
  const exited = new Promise((resolve) => child.once('exit', resolve))
  child.kill('SIGTERM')
  await exited
  if (other > 0) throw new Error(`${other} requests were not answered 200 (shared buffers ${mb} MiB)`)
  return { reqps, rssMiB }
}

const runs = new Map<number, Array<{ reqps: number; rssMiB: number; ratio: number }>>(SETTINGS.map((mb) => [mb, []]))
for (let round = 1; round <= ROUNDS; round++) {
  let base = 0
  for (const mb of SETTINGS) {
    const r = await measure(mb)
    if (mb === SETTINGS[0]) base = r.reqps
    runs.get(mb)?.push({ ...r, ratio: r.reqps / base })
    process.stdout.write(`round ${round}: ${mb} MiB: ${Math.round(r.reqps)} req/s, ${Math.round(r.rssMiB)} MiB resident\n`)
  }
}
upstream.child.kill('SIGTERM')
process.stdout.write('\nshared buffers | req/s (median) | ratio to 128 (median) | resident MiB (median)\n')
for (const [mb, rs] of runs) {
  process.stdout.write(`${mb} | ${Math.round(median(rs.map((r) => r.reqps)))} | ${median(rs.map((r) => r.ratio)).toFixed(2)} | ${Math.round(median(rs.map((r) => r.rssMiB)))}\n`)
}
