// npm run bench [-- --quick] [-- --write]
// In one run: a fixed-response upstream, a bare undici proxy with no checks (the baseline), and
// keygate with every stage on (trusted proxies, deny list, lockout, per-address and per-key
// limits, key validation, route scopes), once with the in-memory limiter and once with Redis.
// Each is driven with the same load from a separate process, in interleaved rounds (each in
// another order); each round's figures are compared with that round's baseline, and the medians
// are reported. Then the heap held by 100,000 cached keys. --write records the results in
// bench/RESULTS.md.
import { fork, spawn, type ChildProcess } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir, cpus } from 'node:os'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { execFileSync } from 'node:child_process'

const here = (f: string) => fileURLToPath(new URL(f, import.meta.url))
const KEYGATE = here('../bin/keygate.ts')
const quick = process.argv.includes('--quick')
const write = process.argv.includes('--write')
const ROUNDS = quick ? 3 : 5
const SECONDS = quick ? 3 : 5
const CONNECTIONS = 32
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'
const children: ChildProcess[] = []

process.on('exit', () => {
  for (const c of children) c.kill('SIGKILL')
})

interface Server {
  port: number
  pid: number
}

function forkServer(file: string, args: string[] = []): Promise<Server> {
  const child = fork(here(file), args, { stdio: ['ignore', 'ignore', 'inherit', 'ipc'] })
  children.push(child)
  return new Promise((resolve, reject) => {
    child.once('message', (m: { port: number }) => resolve({ port: m.port, pid: child.pid as number }))
    child.once('exit', (code) => reject(new Error(`${file} exited with ${code}`)))
  })
}

function cli(args: string[], env: Record<string, string>): string {
  return execFileSync(process.execPath, [KEYGATE, ...args], { env: { ...process.env, ...env }, encoding: 'utf8' })
}

/** Starts `keygate serve` and resolves with its gateway port once it listens. */
function startKeygate(env: Record<string, string>): Promise<Server> {
  const child = spawn(process.execPath, [KEYGATE, 'serve'], { env: { ...process.env, ...env }, stdio: ['ignore', 'pipe', 'inherit'] })
  children.push(child)
  return new Promise((resolve, reject) => {
    let buffer = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      buffer += d
      const m = /"msg":"gateway listening","address":"[^"]*:(\d+)"/.exec(buffer)
      if (m) resolve({ port: Number(m[1]), pid: child.pid as number })
    })
    child.once('exit', (code) => reject(new Error(`keygate serve exited with ${code}:\n${buffer}`)))
  })
}

interface Load {
  rps: number
  total: number
  p50: number
  p99: number
  errors: number
  timeouts: number
  statuses: Record<string, number>
}

function load(url: string, headers: Record<string, string>, seconds: number, rate = 0): Promise<Load> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [here('./load.ts'), JSON.stringify({ url, seconds, connections: CONNECTIONS, headers, rate })], { stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
    child.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as Load) : reject(new Error(`load exited with ${code}`))))
  })
}

/** CPU seconds (user + system) a process has used so far, from /proc (Linux). */
function cpuSeconds(pid: number): number {
  const fields = readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')
  // After the command: state is field 3, so utime (14) and stime (15) are at indexes 11 and 12.
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS
}
const CLOCK_TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100

const median = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b)
  return s.length % 2 ? (s[(s.length - 1) / 2] as number) : ((s[s.length / 2 - 1] as number) + (s[s.length / 2] as number)) / 2
}

// Every stage on: keygate believes X-Forwarded-For from loopback, has deny entries, counts
// failed attempts, limits per address and per key (high enough never to refuse here), checks
// the route's scope.
function keygateEnv(dataDir: string, upstream: number, extra: Record<string, string> = {}): Record<string, string> {
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
  return { KEYGATE_CONFIG: config, KEYGATE_DATA_DIR: dataDir, KEYGATE_ADMIN_TOKEN: 'bench-admin-token-0123456789', LOG_LEVEL: 'info', DATABASE_URL: '', REDIS_URL: '', ...extra }
}

function createKey(env: Record<string, string>): string {
  return (JSON.parse(cli(['api-key', 'create', '--type', 'service', '--name', 'bench', '--scopes', 'bench', '--json'], env)) as { key: string }).key
}

const work = mkdtempSync(join(tmpdir(), 'keygate-bench-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))

const upstreamServer = await forkServer('./upstream.ts')
const upstream = upstreamServer.port
const baselineServer = await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`])
const baseline = baselineServer.port

const memDir = join(work, 'memory')
const redisDir = join(work, 'redis')
const memEnv = keygateEnv(mkdirp(memDir), upstream)
const redisEnv = keygateEnv(mkdirp(redisDir), upstream, { REDIS_URL })
const memKey = createKey(memEnv)
const redisKey = createKey(redisEnv)
const unknownKey = (() => {
  // Well-formed (right prefix, length and checksum) but never stored: the store is asked once,
  // then the negative cache answers.
  const made = createKey(keygateEnv(mkdirp(join(work, 'other')), upstream))
  return made
})()
const keygateServer = await startKeygate(memEnv)
const keygateRedisServer = await startKeygate(redisEnv)
const keygate = keygateServer.port
const keygateRedis = keygateRedisServer.port

function mkdirp(dir: string): string {
  execFileSync('mkdir', ['-p', dir])
  return dir
}

const xff = { 'x-forwarded-for': '203.0.113.9' }
const scenarios = [
  { name: 'direct (upstream alone)', url: `http://127.0.0.1:${upstream}/`, headers: {}, pid: upstreamServer.pid },
  { name: 'baseline (bare undici proxy)', url: `http://127.0.0.1:${baseline}/`, headers: {}, pid: baselineServer.pid },
  { name: 'keygate, valid cached key', url: `http://127.0.0.1:${keygate}/`, headers: { ...xff, authorization: `Bearer ${memKey}` }, pid: keygateServer.pid },
  { name: 'keygate, rejecting bad keys', url: `http://127.0.0.1:${keygate}/`, headers: { ...xff, authorization: `Bearer ${unknownKey}` }, pid: keygateServer.pid },
  { name: 'keygate, Redis limiter', url: `http://127.0.0.1:${keygateRedis}/`, headers: { ...xff, authorization: `Bearer ${redisKey}` }, pid: keygateRedisServer.pid },
] as const

// Warm-up: JIT, connection pools, the key caches.
for (const s of scenarios) await load(s.url, s.headers, 2)
const capacity = await load(scenarios[1].url, scenarios[1].headers, SECONDS)
const fixedRate = Math.max(500, Math.round((capacity.rps * 0.5) / 100) * 100)

const rps: Record<string, number[]> = {}
const p50: Record<string, number[]> = {}
const p99: Record<string, number[]> = {}
const cpu: Record<string, number[]> = {}
const statuses: Record<string, Record<string, number>> = {}
for (let round = 0; round < ROUNDS; round++) {
  // Each round starts one scenario later, so none is always measured first or last (where a
  // drift of the machine's speed within a round would always count against it).
  const order = scenarios.map((_, i) => scenarios[(i + round) % scenarios.length] as (typeof scenarios)[number])
  for (const s of order) {
    const max = await load(s.url, s.headers, SECONDS)
    const cpuBefore = cpuSeconds(s.pid)
    const paced = await load(s.url, s.headers, SECONDS, fixedRate)
    ;(cpu[s.name] ??= []).push(((cpuSeconds(s.pid) - cpuBefore) * 1e6) / Math.max(1, paced.total))
    ;(rps[s.name] ??= []).push(max.rps)
    ;(p50[s.name] ??= []).push(paced.p50)
    ;(p99[s.name] ??= []).push(paced.p99)
    const seen = (statuses[s.name] ??= {})
    for (const [code, count] of Object.entries({ ...max.statuses, ...paced.statuses })) seen[code] = (seen[code] ?? 0) + count
    if (max.errors + max.timeouts + paced.errors + paced.timeouts > 0) console.error(`${s.name}: ${max.errors + paced.errors} errors, ${max.timeouts + paced.timeouts} timeouts`)
  }
  console.error(`round ${round + 1} of ${ROUNDS} done`)
}

for (const c of children) c.kill('SIGTERM')
const heap = JSON.parse(execFileSync(process.execPath, ['--expose-gc', here('./cache-heap.ts'), '100000'], { encoding: 'utf8' })) as { heapMiB: number; bytesPerKey: number }

const base = scenarios[1].name
// Ratios and differences are taken within each round (keygate against the baseline measured
// minutes, not a quarter of an hour, apart) and the median of those is reported: the speed of a
// shared machine drifts between rounds more than within one.
const perRound = (name: string, of: Record<string, number[]>, f: (x: number, b: number) => number) =>
  median((of[name] as number[]).map((x, i) => f(x, (of[base] as number[])[i] as number)))
const ratio = (name: string) => perRound(name, rps, (x, b) => x / b)
const p99Delta = (name: string) => perRound(name, p99, (x, b) => x - b)
const cpuRatio = (name: string) => perRound(name, cpu, (x, b) => x / b)
const row = (name: string) => {
  const d99 = p99Delta(name)
  return `| ${name} | ${Math.round(median(rps[name] as number[]))} | ${median(p50[name] as number[]).toFixed(2)} | ${median(p99[name] as number[]).toFixed(2)} | ${median(cpu[name] as number[]).toFixed(1)} | ${name === base ? '1.00' : ratio(name).toFixed(2)} | ${name === base ? '' : (d99 >= 0 ? '+' : '') + d99.toFixed(2)} | ${name === base ? '1.00' : cpuRatio(name).toFixed(2)} | ${Object.entries(statuses[name] ?? {}).map(([c, n]) => `${c}×${n}`).join(' ')} |`
}
const valid = scenarios[2].name
const redis = scenarios[4].name
const checks = [
  [`keygate/baseline req/s with the memory limiter ≥ 0.90`, ratio(valid) >= 0.9, ratio(valid).toFixed(2)],
  [`keygate/baseline req/s with the Redis limiter ≥ 0.80`, ratio(redis) >= 0.8, ratio(redis).toFixed(2)],
  [`keygate p99 ≤ baseline p99 + 1 ms (at ${fixedRate} req/s)`, p99Delta(valid) <= 1, `${p99Delta(valid) >= 0 ? '+' : ''}${p99Delta(valid).toFixed(2)} ms`],
  ['heap per 100,000 cached keys ≤ 24 MiB', heap.heapMiB <= 24, `${heap.heapMiB} MiB (${heap.bytesPerKey} B/key)`],
] as const

/** The commit measured, and whether the work tree differed from it (`git` missing: unknown). */
const code = (() => {
  try {
    const rev = execFileSync('git', ['rev-parse', '--short', 'HEAD'], { cwd: here('..'), encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim()
    const dirty = execFileSync('git', ['status', '--porcelain', '--untracked-files=no', '--', '.', ':!bench/RESULTS.md'], { cwd: here('..'), encoding: 'utf8', stdio: ['ignore', 'pipe', 'ignore'] }).trim() !== ''
    return `Code: ${rev}${dirty ? ' with uncommitted changes' : ''}.`
  } catch {
    return 'Code: unknown (no git).'
  }
})()

const report = [
  code,
  `Measured ${new Date().toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} × ${cpus()[0]?.model.trim()}, Node ${process.version}; ${ROUNDS} interleaved rounds, each starting one scenario later; ${CONNECTIONS} connections. Absolute figures are medians over the rounds; ratios and differences to the baseline are the medians of each round's own.`,
  `req/s: as fast as each answers for ${SECONDS} s; p50/p99 (ms): a fixed ${fixedRate} req/s (half the baseline's capacity), so they show the cost per request, not queueing.`,
  `CPU µs/req: user + system CPU of the measured server process (not the upstream, not Redis) per request during the fixed-rate run; it depends far less on what else the machine is doing than req/s does.`,
  '',
  '| scenario | req/s | p50 ms | p99 ms | CPU µs/req | req/s vs baseline | p99 vs baseline (ms) | CPU vs baseline | statuses |',
  '| --- | --- | --- | --- | --- | --- | --- | --- | --- |',
  ...scenarios.map((s) => row(s.name)),
  '',
  '| target | met | measured |',
  '| --- | --- | --- |',
  ...checks.map(([what, ok, value]) => `| ${what} | ${ok ? 'yes' : 'NO'} | ${value} |`),
  '',
].join('\n')
process.stdout.write(report)

if (write) {
  const file = here('./RESULTS.md')
  let previous = ''
  try {
    previous = readFileSync(file, 'utf8').replace(/^[\s\S]*?<!-- runs -->\n/, '')
  } catch {}
  const head = [
    '# Benchmark results',
    '',
    'Command: `npm run bench -- --write` (bench/run.ts). Every figure is relative to the bare undici',
    'proxy measured in the same run: these machines are shared and noisy, so absolute req/s vary',
    'from run to run while the ratios hold. Newest run first.',
    '',
    '<!-- runs -->',
    '',
  ].join('\n')
  writeFileSync(file, `${head}## ${new Date().toISOString().slice(0, 10)}\n\n${report}\n${previous}`)
}
process.exit(0)
