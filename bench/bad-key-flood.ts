// Memory under a flood of bad keys: `keygate serve` on the embedded store (no DATABASE_URL, no
// REDIS_URL, the lockout and limits at their defaults) answers N requests, each with a distinct
// well-formed random key (so each one is a store look-up) from a distinct address (X-Forwarded-For
// from a trusted loopback proxy). Prints one JSON line per sample: requests sent, the server's
// RSS (/proc), and its main thread's heap and external memory (/metrics); and with --snapshots,
// writes a heap snapshot at each sample (node --heapsnapshot-signal, in --dir). Each sample also
// gives the server's CPU (user + system, /proc) per request since the one before, in µs. With
// --malformed, each key is malformed instead (refused before any look-up, counted toward the
// lockout all the same), so that the flood is as fast as the gateway refuses.
// node bench/bad-key-flood.ts [--requests 900000] [--every 100000] [--connections 32] [--malformed] [--snapshots] [--dir D] [--keygate other/bin/keygate.ts]
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Pool, request } from 'undici'
import { generateKey } from '../core/keys/format.ts'
import { adminAddress, countArg, here, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('requests', 'every', 'connections', 'malformed', 'snapshots', 'dir', 'keygate')

const requests = countArg('requests', 900_000)
const every = countArg('every', 100_000)
const connections = countArg('connections', 32)
const snapshots = process.argv.includes('--snapshots')
const malformed = process.argv.includes('--malformed')
const arg = (name: string): string | undefined => {
  const i = process.argv.indexOf(`--${name}`)
  return i === -1 ? undefined : process.argv[i + 1]
}
const dir = arg('dir') ?? mkdtempSync(join(tmpdir(), 'kg-flood-'))
const keygate = arg('keygate') ?? here('../bin/keygate.ts')
const keep = arg('dir') !== undefined
// Removed however the run ends (bench/servers.ts exits on SIGINT, SIGTERM and SIGHUP): before, only
// a run that finished removed it, and an interrupted one left it (the embedded store) behind.
if (!keep) process.on('exit', () => rmSync(dir, { recursive: true, force: true }))

const config = join(dir, 'keygate.yaml')
writeFileSync(config, ['gateway: { listen: "127.0.0.1:0", trusted_proxies: ["127.0.0.1/32"] }', 'admin: { listen: "127.0.0.1:0" }', 'routes: [ { name: api, path: /, upstream: "http://127.0.0.1:9" } ]', ''].join('\n'))
const server = await startKeygate(
  {
    KEYGATE_CONFIG: config,
    KEYGATE_DATA_DIR: join(dir, 'store'),
    KEYGATE_ADMIN_TOKEN: 'flood-admin-token-0123456789',
    DATABASE_URL: '',
    REDIS_URL: '',
    LOG_LEVEL: 'info',
    NODE_OPTIONS: snapshots ? `--heapsnapshot-signal=SIGUSR2 --diagnostic-dir=${dir}` : '',
  },
  [],
  keygate,
)
const admin = await adminAddress(server)

const metric = (text: string, name: string): number => Number(new RegExp(`^${name} (\\S+)$`, 'm').exec(text)?.[1] ?? NaN)
const mib = (bytes: number) => Math.round((bytes / 1048576) * 10) / 10
/**
 * The server's resident memory by kind of mapping (/proc/PID/smaps), in KiB: `malloc_main` the
 * main thread's malloc heap ([heap]), `malloc_threads` other threads' malloc arenas (anonymous,
 * at a 64 MiB boundary, at most 64 MiB: glibc's), `anon` the other anonymous mappings (V8's
 * heaps, the embedded store's WebAssembly memory), `files` the mapped files (code).
 */
const residentByKind = (): Record<string, number> => {
  const kinds = { malloc_main: 0, malloc_threads: 0, anon: 0, files: 0 }
  let kind: keyof typeof kinds = 'anon'
  for (const line of readFileSync(`/proc/${server.pid}/smaps`, 'utf8').split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \d+\s*(.*)$/.exec(line)
    if (head) {
      const start = BigInt(`0x${head[1]}`)
      const size = BigInt(`0x${head[2]}`) - start
      const name = head[3] as string
      kind = name === '[heap]' ? 'malloc_main' : name.startsWith('/') ? 'files' : start % 0x4000000n === 0n && size <= 0x4000000n ? 'malloc_threads' : 'anon'
      continue
    }
    const rss = /^Rss:\s+(\d+) kB/.exec(line)
    if (rss) kinds[kind] += Number(rss[1])
  }
  return kinds
}

const TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
/** The server's CPU so far (user + system), in µs. */
const cpuUs = () => {
  const fields = readFileSync(`/proc/${server.pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
  return ((Number(fields[11]) + Number(fields[12])) * 1e6) / TICKS
}
let lastCpu = { at: cpuUs(), sent: 0 }

const sample = async (sent: number, statuses: Record<number, number>) => {
  const cpu = cpuUs()
  const cpuPerRequest = sent > lastCpu.sent ? Math.round((cpu - lastCpu.at) / (sent - lastCpu.sent)) : null
  lastCpu = { at: cpu, sent }
  const rssKb = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${server.pid}/status`, 'utf8'))?.[1])
  const kinds = residentByKind()
  const text = await (await request(`http://${admin}/metrics`)).body.text()
  const line: Record<string, unknown> = {
    sent,
    cpu_us_per_request: cpuPerRequest,
    rss_mib: mib(rssKb * 1024),
    heap_used_mib: mib(metric(text, 'keygate_nodejs_heap_size_used_bytes')),
    heap_total_mib: mib(metric(text, 'keygate_nodejs_heap_size_total_bytes')),
    external_mib: mib(metric(text, 'keygate_nodejs_external_memory_bytes')),
    ...Object.fromEntries(Object.entries(kinds).map(([k, kb]) => [`${k}_mib`, mib(kb * 1024)])),
    statuses: { ...statuses },
  }
  if (snapshots) {
    const before = new Set(readdirSync(dir))
    process.kill(server.pid, 'SIGUSR2')
    // The snapshot is written on the server's main thread, which stops meanwhile.
    for (let waited = 0; waited < 600_000; waited += 200) {
      const made = readdirSync(dir).find((f) => f.endsWith('.heapsnapshot') && !before.has(f))
      if (made !== undefined && (await request(`http://${admin}/healthz`).then((r) => r.body.text().then(() => true), () => false))) {
        line.snapshot = join(dir, made)
        break
      }
      await new Promise((r) => setTimeout(r, 200))
    }
  }
  process.stdout.write(JSON.stringify(line) + '\n')
}

const pool = new Pool(`http://127.0.0.1:${server.port}`, { connections, pipelining: 1 })
const statuses: Record<number, number> = {}
let sent = 0
let done = 0
const address = (i: number) => `10.${(i >>> 16) & 255}.${(i >>> 8) & 255}.${i & 255}`
await sample(0, statuses)
while (sent < requests) {
  const until = Math.min(requests, sent + every)
  await new Promise<void>((resolve, reject) => {
    let running = 0
    const next = (): void => {
      if (sent === until) {
        if (running === 0) resolve()
        return
      }
      const i = sent++
      running++
      pool.request({ path: '/', method: 'GET', headers: { authorization: `Bearer ${malformed ? 'kg_notakey' : generateKey('kg_').key}`, 'x-forwarded-for': address(i) } }).then(async (r) => {
        statuses[r.statusCode] = (statuses[r.statusCode] ?? 0) + 1
        await r.body.dump()
        done++
        running--
        next()
      }, reject)
    }
    for (let c = 0; c < connections; c++) next()
  })
  await sample(done, statuses)
}
await pool.close()
server.child.kill('SIGTERM')
await new Promise((r) => server.child.once('exit', r))
