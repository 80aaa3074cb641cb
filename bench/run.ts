// npm run bench [-- --quick] [-- --write] [-- --dump FILE]
// In one run: a fixed-response upstream, a bare undici proxy with no checks (the baseline), and
// keygate with every stage on (trusted proxies, deny list, lockout, per-address and per-key
// limits, key validation, route scopes): one process for valid keys and one for bad keys with the
// in-memory limiter, and one with Redis; and the baseline setting the headers SPEC §3 has keygate
// set (X-Forwarded-*, X-Keygate-*, X-Request-Id, RateLimit-*), to tell their cost from the checks'.
// Each is driven with the same requests from a separate process, in short slices: every keygate
// scenario in blocks of baseline, keygate, keygate, baseline, compared within the block (the
// speed of a shared machine changes within seconds, so a baseline measured a minute apart is no
// yardstick), and the median over the blocks reported with the spread of the middle half; then
// the CPU per request of keygate and the baseline loaded side by side, at the same time. Then
// the heap held by 100,000 cached keys. --write records the results in bench/RESULTS.md.
// req/s is measured with wrk when it is installed (Debian: apt-get install wrk): on two cores shared
// by the load generator, the upstream and the proxy, the less CPU the client takes, the more the
// proxy under test is what limits req/s (autocannon spends about half the bare proxy's CPU per
// request, wrk about a third). The same slices are also run with autocannon and reported beside;
// latency and CPU at a fixed rate are autocannon's (wrk cannot pace).
// bench/instructions.ts compares the CPU per request without the machine's noise (callgrind).
import { execFileSync, spawn, spawnSync } from 'node:child_process'
import { mkdtempSync, readFileSync, writeFileSync, rmSync } from 'node:fs'
import { tmpdir, cpus } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { BENCH_REDIS_PREFIX, createKey, forkServer, here, keygateEnv, median, redisAnswer, redisUsedThroughout, removeBenchRedisKeys, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('quick', 'write', 'dump')

const quick = process.argv.includes('--quick')
const write = process.argv.includes('--write')
const BLOCKS = quick ? 2 : 6
const SIDE_SLICES = quick ? 3 : 8
/** Seconds of one slice as fast as the server answers, and of one at the fixed rate. */
const SLICE_S = 2
const PACED_S = 3
const SECONDS = 3
const CONNECTIONS = 32
const REDIS_URL = process.env.REDIS_URL ?? 'redis://127.0.0.1:6379'

interface Load {
  rps: number
  total: number
  p50: number
  p99: number
  errors: number
  timeouts: number
  statuses: Record<string, number>
  /** CPU seconds the load generator itself used. */
  cpu: number
}

function load(url: string, headers: Record<string, string>, seconds: number, rate = 0): Promise<Load> {
  return new Promise((resolve, reject) => {
    const child = spawn(process.execPath, [here('./load.ts'), JSON.stringify({ url, seconds, connections: CONNECTIONS, headers, rate })], { stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
    child.once('exit', (code) => (code === 0 ? resolve(JSON.parse(out) as Load) : reject(new Error(`load exited with ${code}`))))
  })
}

/** The fields of /proc/<pid>/stat after the command (Linux): state is field 3, at index 0. */
function statFields(pid: number | 'self'): string[] {
  return readFileSync(`/proc/${pid}/stat`, 'utf8').replace(/^.*\) /, '').split(' ')
}

/** CPU seconds (user + system) a process has used so far. */
function cpuSeconds(pid: number): number {
  const fields = statFields(pid)
  // utime (14) and stime (15).
  return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS
}

/** CPU seconds of this process's children that have exited and been waited for: cutime (16) and cstime (17). */
function reapedCpuSeconds(): number {
  const fields = statFields('self')
  return (Number(fields[13]) + Number(fields[14])) / CLOCK_TICKS
}

/** wrk on PATH (`wrk --version` prints its version and exits 1; missing, spawning it fails). */
const wrkProbe = spawnSync('wrk', ['--version'], { encoding: 'utf8' })
const HAVE_WRK = wrkProbe.error === undefined
/** `wrk 4.1.0`, as it names itself. */
const WRK_VERSION = /^wrk \S+/.exec(`${wrkProbe.stdout ?? ''}${wrkProbe.stderr ?? ''}`)?.[0] ?? 'wrk'

interface Fast {
  rps: number
  total: number
  /** Answers not 2xx or 3xx (wrk counts no more finely). */
  non2xx: number
  errors: number
  /** CPU seconds wrk used. */
  cpu: number
}

/** As fast as the server answers, with wrk: one thread, the same connections and headers. */
function wrk(url: string, headers: Record<string, string>, seconds: number): Promise<Fast> {
  const args = ['-t1', `-c${CONNECTIONS}`, `-d${seconds}s`, '--timeout', '5s', ...Object.entries(headers).flatMap(([k, v]) => ['-H', `${k}: ${v}`]), url]
  return new Promise((resolve, reject) => {
    const cpuBefore = reapedCpuSeconds()
    const child = spawn('wrk', args, { stdio: ['ignore', 'pipe', 'inherit'] })
    let out = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d))
    child.once('exit', (code) => {
      const num = (re: RegExp) => Number(re.exec(out)?.[1] ?? NaN)
      const rps = num(/Requests\/sec:\s+([\d.]+)/)
      if (code !== 0 || !Number.isFinite(rps)) return reject(new Error(`wrk exited with ${code}:\n${out}`))
      const socket = /Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)/.exec(out)
      resolve({
        rps,
        total: num(/(\d+) requests in/),
        non2xx: num(/Non-2xx or 3xx responses: (\d+)/) || 0,
        errors: socket ? socket.slice(1).reduce((a, b) => a + Number(b), 0) : 0,
        cpu: reapedCpuSeconds() - cpuBefore,
      })
    })
  })
}
const CLOCK_TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100

// The Redis scenario is measured on Redis or not at all: keygate starts without it (on its
// in-memory insurance, as documented), so a Redis that does not answer here would have been
// measured as the memory limiter under the Redis limiter's name (found by a review).
{
  const pong = await redisAnswer(REDIS_URL)
  if (pong !== 'PONG') {
    process.stderr.write(`bench: Redis at ${REDIS_URL} does not answer (${pong}); the Redis limiter scenario needs it: start Redis, or set REDIS_URL\n`)
    process.exit(1)
  }
}
const STARTED = new Date()

const work = mkdtempSync(join(tmpdir(), 'keygate-bench-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))

const upstreamServer = await forkServer('./upstream.ts')
const upstream = upstreamServer.port
const baselineServer = await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`])
const baseline = baselineServer.port
// The baseline again, setting the headers SPEC §3 has keygate set: what they cost, apart from the checks.
const contractServer = await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`, '--contract-headers'])

const memEnv = keygateEnv(join(work, 'memory'), upstream)
const redisEnv = keygateEnv(join(work, 'redis'), upstream, { REDIS_URL })
const memKey = createKey(memEnv)
const redisKey = createKey(redisEnv)
// Well-formed (right prefix, length and checksum) but stored only elsewhere: the store is asked
// once, then the negative cache answers.
const unknownKey = createKey(keygateEnv(join(work, 'other'), upstream))
const keygateServer = await startKeygate(memEnv)
// Bad keys go to a keygate of their own (on its own store, where the unknown key is unknown too):
// a process that answers only refusals, like the one that answers only valid keys, is measured
// with its code optimised for what it measures, not for the other scenario it ran a moment ago.
const keygateBadServer = await startKeygate(keygateEnv(join(work, 'bad'), upstream))
const keygateRedisServer = await startKeygate(redisEnv)
const keygate = keygateServer.port
const keygateRedis = keygateRedisServer.port
// The same requests for every scenario ("the same load"): the baseline and the upstream alone
// get the valid key's Authorization and the X-Forwarded-For too, and pass them on unread.
const xff = { 'x-forwarded-for': '203.0.113.9' }
{
  // And it counts there: one request, then its counts are looked for in Redis.
  const answer = await fetch(`http://127.0.0.1:${keygateRedis}/`, { headers: { ...xff, authorization: `Bearer ${redisKey}` } })
  await answer.arrayBuffer()
  const probe = new Redis(REDIS_URL)
  let counted = false
  for (let cursor = '0', first = true; first || cursor !== '0'; first = false) {
    // Counts of this run's key (its id is in the name): another run's left in a shared Redis do not count.
    const [next, found] = await probe.scan(cursor, 'MATCH', `${BENCH_REDIS_PREFIX}keygate:rl:*${redisKey.split('_')[1]}*`, 'COUNT', 1000)
    cursor = next
    if (found.length > 0) {
      counted = true
      break
    }
  }
  probe.disconnect()
  if (answer.status !== 200 || !counted) throw new Error(`keygate with REDIS_URL answered ${answer.status} and left no counts in Redis at ${REDIS_URL}:\n${keygateRedisServer.output()}`)
}

const sameLoad = { ...xff, authorization: `Bearer ${memKey}` }
const scenarios = [
  { name: 'direct (upstream alone)', url: `http://127.0.0.1:${upstream}/`, headers: sameLoad, pid: upstreamServer.pid },
  { name: 'baseline (bare undici proxy)', url: `http://127.0.0.1:${baseline}/`, headers: sameLoad, pid: baselineServer.pid },
  { name: 'baseline setting the headers of SPEC §3', url: `http://127.0.0.1:${contractServer.port}/`, headers: sameLoad, pid: contractServer.pid },
  { name: 'keygate, valid cached key', url: `http://127.0.0.1:${keygate}/`, headers: sameLoad, pid: keygateServer.pid },
  { name: 'keygate, rejecting bad keys', url: `http://127.0.0.1:${keygateBadServer.port}/`, headers: { ...xff, authorization: `Bearer ${unknownKey}` }, pid: keygateBadServer.pid },
  { name: 'keygate, Redis limiter', url: `http://127.0.0.1:${keygateRedis}/`, headers: { ...xff, authorization: `Bearer ${redisKey}` }, pid: keygateRedisServer.pid },
] as const
type Scenario = (typeof scenarios)[number]
const [direct, base, contract, valid, bad, redis] = scenarios
const compared = [contract, valid, bad, redis] as const

// Warm-up: JIT, connection pools, the key caches.
for (const s of scenarios) await load(s.url, s.headers, 2)
const capacity = await load(base.url, base.headers, SECONDS)
const fixedRate = Math.max(500, Math.round((capacity.rps * 0.5) / 100) * 100)

interface Slice {
  /** As fast as the server answers: with wrk when installed, else autocannon. */
  rps: number
  /** As fast as the server answers, with autocannon (when wrk measured rps). */
  rpsAc: number
  /** CPU of the load generator per request at full speed, µs: wrk's (or autocannon's) and autocannon's. */
  gen: number
  genAc: number
  p50: number
  p99: number
  cpu: number
  /** CPU of the load generator, the upstream and the server together (not Redis), µs per request. */
  all: number
}
const slices = new Map<Scenario, Slice[]>(scenarios.map((s) => [s, []]))
const statuses = new Map<Scenario, Record<string, number>>(scenarios.map((s) => [s, {}]))
/** One block's figures of a compared scenario against the baseline slices around it. */
type BlockFigures = { rps: number; rpsAc: number; p99: number; cpu: number; all: number }
const blocks = new Map<Scenario, BlockFigures[]>(compared.map((s) => [s, []]))

/** One kind of slice in a block: the baseline's two and the scenario's two. */
type Abba = { b: Array<Partial<Slice>>; x: Array<Partial<Slice>> }

/** What a slice measures: as fast as the server answers (with wrk if installed), the same with autocannon, or at the fixed rate. */
type Kind = 'max' | 'max-ac' | 'paced'
const KINDS: readonly Kind[] = HAVE_WRK ? ['max', 'max-ac', 'paced'] : ['max', 'paced']

/**
 * One slice of a scenario: as fast as it answers for SLICE_S, or at fixedRate for PACED_S
 * (autocannon's rate: each second's requests sent in a burst at the start of the second).
 */
async function measure(s: Scenario, what: Kind): Promise<Partial<Slice>> {
  const cpuBefore = cpuSeconds(s.pid)
  const upstreamBefore = cpuSeconds(upstreamServer.pid)
  if (what === 'max' && HAVE_WRK) {
    const f = await wrk(s.url, s.headers, SLICE_S)
    const seen = statuses.get(s) as Record<string, number>
    if (f.non2xx > 0) seen['non-2xx (wrk)'] = (seen['non-2xx (wrk)'] ?? 0) + f.non2xx
    if (f.errors > 0) console.error(`${s.name}: ${f.errors} socket errors (wrk)`)
    return { rps: f.rps, gen: (f.cpu * 1e6) / Math.max(1, f.total) }
  }
  const l = what === 'paced' ? await load(s.url, s.headers, PACED_S, fixedRate) : await load(s.url, s.headers, SLICE_S)
  const seen = statuses.get(s) as Record<string, number>
  for (const [code, count] of Object.entries(l.statuses)) seen[code] = (seen[code] ?? 0) + count
  if (l.errors + l.timeouts > 0) console.error(`${s.name}: ${l.errors} errors, ${l.timeouts} timeouts`)
  const gen = (l.cpu * 1e6) / Math.max(1, l.total)
  if (what === 'max') return { rps: l.rps, gen }
  if (what === 'max-ac') return { rpsAc: l.rps, genAc: gen }
  const server = cpuSeconds(s.pid) - cpuBefore
  const all = l.cpu + server + (s === direct ? 0 : cpuSeconds(upstreamServer.pid) - upstreamBefore)
  return { p50: l.p50, p99: l.p99, cpu: (server * 1e6) / Math.max(1, l.total), all: (all * 1e6) / Math.max(1, l.total) }
}

/**
 * baseline, scenario, scenario, baseline: a drift of the machine's speed within the block
 * (which on a shared machine changes within seconds) weighs on both sides alike.
 */
async function abba(s: Scenario, what: Kind): Promise<Abba> {
  const b1 = await measure(base, what)
  const x1 = await measure(s, what)
  const x2 = await measure(s, what)
  const b2 = await measure(base, what)
  return { b: [b1, b2], x: [x1, x2] }
}

const mean2 = (a: Array<Partial<Slice>>, k: keyof Slice) => ((a[0]?.[k] as number) + (a[1]?.[k] as number)) / 2
/** One slice's figures of every kind together (the autocannon ones absent without wrk). */
const sliceOf = (parts: Array<Partial<Slice> | undefined>): Slice => Object.assign({ rpsAc: NaN, genAc: NaN }, ...parts) as Slice
const merged = (runs: Abba[], side: 'b' | 'x', i: number): Slice => sliceOf(runs.map((r) => r[side][i]))
for (let block = 0; block < BLOCKS; block++) {
  // Each block starts one scenario later, so none is always measured first or last.
  const order = compared.map((_, i) => compared[(i + block) % compared.length] as Scenario)
  for (const s of order) {
    const runs: Abba[] = []
    for (const kind of KINDS) runs.push(await abba(s, kind))
    const b = [merged(runs, 'b', 0), merged(runs, 'b', 1)]
    const x = [merged(runs, 'x', 0), merged(runs, 'x', 1)]
    ;(slices.get(base) as Slice[]).push(...b)
    ;(slices.get(s) as Slice[]).push(...x)
    ;(blocks.get(s) as BlockFigures[]).push({
      rps: mean2(x, 'rps') / mean2(b, 'rps'),
      rpsAc: mean2(x, 'rpsAc') / mean2(b, 'rpsAc'),
      p99: mean2(x, 'p99') - mean2(b, 'p99'),
      cpu: mean2(x, 'cpu') / mean2(b, 'cpu'),
      all: mean2(x, 'all') / mean2(b, 'all'),
    })
  }
  // The upstream alone, for scale (not compared block by block).
  const alone: Array<Partial<Slice>> = []
  for (const kind of KINDS) alone.push(await measure(direct, kind))
  ;(slices.get(direct) as Slice[]).push(sliceOf(alone))
  const last = (s: Scenario) => (blocks.get(s) as BlockFigures[])[block] as BlockFigures
  console.error(`block ${block + 1} of ${BLOCKS}: req/s vs baseline ${compared.map((s) => `${s.name} ${last(s).rps.toFixed(3)}${HAVE_WRK ? ` (autocannon ${last(s).rpsAc.toFixed(3)})` : ''}`).join(', ')}`)
}

// Side by side: the baseline and a keygate scenario loaded at the same time, each at half the
// fixed rate from its own load generator, and the CPU per request of the two servers taken over
// the same seconds. Whatever the machine does meanwhile, it does to both: the steadiest
// comparison of what a request costs each (it is not a target of the issue; req/s is).
const sideBySide = new Map<Scenario, number[]>([valid, redis].map((s) => [s, []]))
for (let slice = 0; slice < SIDE_SLICES; slice++) {
  for (const [s, ratios] of sideBySide) {
    const baseBefore = cpuSeconds(base.pid)
    const before = cpuSeconds(s.pid)
    const [lb, lk] = await Promise.all([load(base.url, base.headers, PACED_S, fixedRate / 2), load(s.url, s.headers, PACED_S, fixedRate / 2)])
    ratios.push((cpuSeconds(s.pid) - before) / Math.max(1, lk.total) / ((cpuSeconds(base.pid) - baseBefore) / Math.max(1, lb.total)))
  }
}

// --dump FILE: every slice and block figure as JSON, to check the report's arithmetic.
const dumpAt = process.argv.indexOf('--dump')
if (dumpAt !== -1) {
  const named = <T>(m: Map<Scenario, T>) => Object.fromEntries([...m].map(([s, v]) => [s.name, v]))
  writeFileSync(process.argv[dumpAt + 1] as string, JSON.stringify({ slices: named(slices), blocks: named(blocks), sideBySide: named(sideBySide) }, null, 1))
}

redisUsedThroughout(keygateRedisServer)
for (const s of [upstreamServer, baselineServer, contractServer, keygateServer, keygateBadServer, keygateRedisServer]) s.child.kill('SIGTERM')
const cacheHeap = (...args: string[]) => JSON.parse(execFileSync(process.execPath, ['--expose-gc', here('./cache-heap.ts'), '100000', ...args], { encoding: 'utf8' })) as { heapMiB: number; bytesPerKey: number }
// The target's figure: keys without an expiry, sharing type, scopes and limits (so their profile).
// Then keys that each have an expiry, which each holds itself, for the reader.
const heap = cacheHeap()
const heapExpiring = cacheHeap('--expiring')

const quantile = (xs: number[], q: number) => {
  const s = [...xs].sort((a, b) => a - b)
  const at = (s.length - 1) * q
  const lo = Math.floor(at)
  return (s[lo] as number) + ((s[Math.min(lo + 1, s.length - 1)] as number) - (s[lo] as number)) * (at - lo)
}
const of = (s: Scenario, k: keyof Slice) => (slices.get(s) as Slice[]).map((x) => x[k])
const blockOf = (s: Scenario, k: keyof BlockFigures) => (blocks.get(s) as BlockFigures[]).map((x) => x[k])
// A block's figure, the median over the blocks, and the middle half of the blocks as the spread.
const spread = (xs: number[], digits: number, sign = false) => {
  const f = (x: number) => (sign && x >= 0 ? '+' : '') + x.toFixed(digits)
  return `${f(median(xs))} (${f(quantile(xs, 0.25))} to ${f(quantile(xs, 0.75))})`
}
/** What measured req/s at full speed. */
const GEN = HAVE_WRK ? 'wrk' : 'autocannon'
const row = (s: Scenario) => {
  const vs = s === base || s === direct
  /** Against the baseline: 1.00 for itself, the ratio of medians for the upstream alone, else the blocks' median and middle half. */
  const against = (k: 'rps' | 'rpsAc' | 'cpu' | 'all') => (s === base ? '1.00' : vs ? (median(of(s, k)) / median(of(base, k))).toFixed(2) : spread(blockOf(s, k), 2))
  const cells = [
    s.name,
    Math.round(median(of(s, 'rps'))),
    ...(HAVE_WRK ? [Math.round(median(of(s, 'rpsAc')))] : []),
    median(of(s, 'p50')).toFixed(2),
    median(of(s, 'p99')).toFixed(2),
    median(of(s, 'cpu')).toFixed(1),
    median(of(s, 'all')).toFixed(1),
    against('rps'),
    ...(HAVE_WRK ? [against('rpsAc')] : []),
    vs ? '' : spread(blockOf(s, 'p99'), 2, true),
    against('cpu'),
    against('all'),
    Object.entries(statuses.get(s) ?? {})
      .map(([c, n]) => `${c}×${n}`)
      .join(' '),
  ]
  return `| ${cells.join(' | ')} |`
}
const columns = [
  'scenario',
  `req/s (${GEN})`,
  ...(HAVE_WRK ? ['req/s (autocannon)'] : []),
  'p50 ms',
  'p99 ms',
  'CPU µs/req',
  'CPU µs/req, all',
  `req/s vs baseline, ${GEN} (middle half)`,
  ...(HAVE_WRK ? ['req/s vs baseline, autocannon (middle half)'] : []),
  'p99 vs baseline, ms (middle half)',
  'CPU vs baseline (middle half)',
  'CPU, all, vs baseline (middle half)',
  'statuses',
]
/** The load generators' own CPU per request at full speed, on the baseline's slices. */
const genCpu = HAVE_WRK
  ? `At full speed against the baseline, wrk used ${median(of(base, 'gen')).toFixed(1)} µs of CPU per request and autocannon ${median(of(base, 'genAc')).toFixed(1)} µs; the baseline itself used ${median(of(base, 'cpu')).toFixed(1)} µs (at the fixed rate). req/s is wrk's: the less of the two cores the client takes, the more the proxy under test is what limits req/s. The autocannon columns are the same blocks with autocannon, for comparison with earlier runs.`
  : `wrk is not installed (Debian: apt-get install wrk), so req/s is autocannon's, which at full speed used ${median(of(base, 'gen')).toFixed(1)} µs of CPU per request against the baseline, where the baseline itself used ${median(of(base, 'cpu')).toFixed(1)} µs (at the fixed rate): on a machine of few cores, such req/s is as much the client's as the proxy's.`
const ratio = (s: Scenario) => median(blockOf(s, 'rps'))
const p99Delta = (s: Scenario) => median(blockOf(s, 'p99'))
const ms = (x: number) => `${x >= 0 ? '+' : ''}${x.toFixed(2)} ms`
const checks = [
  // Three decimals: two would show a ratio just under its line as the line itself.
  [`keygate/baseline req/s with the memory limiter ≥ 0.90 (${GEN})`, ratio(valid) >= 0.9, ratio(valid).toFixed(3)],
  [`keygate/baseline req/s with the Redis limiter ≥ 0.80 (${GEN})`, ratio(redis) >= 0.8, ratio(redis).toFixed(3)],
  [`keygate p99 ≤ baseline p99 + 1 ms, memory limiter (at ${fixedRate} req/s)`, p99Delta(valid) <= 1, ms(p99Delta(valid))],
  [`keygate p99 ≤ baseline p99 + 1 ms, Redis limiter (at ${fixedRate} req/s)`, p99Delta(redis) <= 1, ms(p99Delta(redis))],
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

/** The command that produced this run, as typed, and what it found on the machine. */
const command = `Command: \`npm run bench --${process.argv.slice(2).map((a) => ` ${a}`).join('')}\`, with REDIS_URL ${process.env.REDIS_URL ? 'set' : `unset (the default, ${REDIS_URL})`}${HAVE_WRK ? ` and ${WRK_VERSION}` : ', without wrk'}.`

const report = [
  `${code} ${command}`,
  `Measured from ${STARTED.toISOString().slice(0, 16).replace('T', ' ')} UTC on ${cpus().length} × ${cpus()[0]?.model.trim()}, Node ${process.version}; ${CONNECTIONS} connections; every scenario sent the same requests (Authorization and X-Forwarded-For included).`,
  `Each keygate scenario (and the baseline setting the headers of SPEC §3) was measured in ${BLOCKS} blocks of baseline, keygate, keygate, baseline (each block in another order of scenarios), ${SLICE_S} s per slice as fast as the server answers (req/s, ${HAVE_WRK ? `with wrk, one thread, then the same with autocannon` : 'with autocannon'}), then the same at ${fixedRate} req/s, half the baseline's capacity, ${PACED_S} s per slice (p50, p99, CPU). autocannon's rate is not even pacing: each connection sends its share of a second's requests as fast as it can at the start of the second, then waits, so these slices are a burst of ${fixedRate} requests a second, and their p99 is mostly the time the server takes to drain the burst (a comparison of the cost per request under a burst, not of an idle server's latency). Comparisons with the baseline are taken within each block; the table gives their median over the blocks and, in brackets, the middle half of the blocks (25th to 75th percentile). Absolute figures are medians over all slices.`,
  `CPU µs/req: user + system CPU of the measured server process per request during the fixed-rate slices; "all" adds the load generator's and the upstream's (not Redis's). On two cores shared by the three, autocannon's req/s at full load follows the "all" figure: what keygate adds to the upstream's work (the identity and X-Forwarded headers it parses) and to the client's (the RateLimit and X-Request-Id headers) counts there.`,
  '',
  genCpu,
  '',
  `| ${columns.join(' | ')} |`,
  `| ${columns.map(() => '---').join(' | ')} |`,
  ...scenarios.map(row),
  '',
  `Side by side (${SIDE_SLICES} slices of ${PACED_S} s, the baseline and keygate each at ${fixedRate / 2} req/s at the same time): keygate's CPU per request against the baseline's, with the memory limiter ${spread(sideBySide.get(valid) as number[], 2)}, with the Redis limiter ${spread(sideBySide.get(redis) as number[], 2)} (median, and the middle half of the slices).`,
  '',
  '| target | met | measured |',
  '| --- | --- | --- |',
  ...checks.map(([what, ok, value]) => `| ${what} | ${ok ? 'yes' : 'NO'} | ${value} |`),
  '',
  `The heap is of 100,000 keys of one type, scopes and limits, none with an expiry; 100,000 keys that each have an expiry hold ${heapExpiring.heapMiB} MiB (${heapExpiring.bytesPerKey} B/key).`,
  '',
  ...(HAVE_WRK
    ? [`With autocannon at full speed instead of wrk, keygate/baseline req/s was ${median(blockOf(valid, 'rpsAc')).toFixed(3)} with the memory limiter and ${median(blockOf(redis, 'rpsAc')).toFixed(3)} with the Redis limiter.`, '']
    : []),
].join('\n')
process.stdout.write(report)

if (write) {
  const file = here('./RESULTS.md')
  let previous = ''
  // The file's own head is kept, notes written into it included (before, it was written anew and
  // the correction of 2026-12-03 above the runs was lost).
  let head = [
    '# Benchmark results',
    '',
    'Command: `npm run bench -- --write` (bench/run.ts). Every figure is relative to the bare undici',
    'proxy measured in the same run: these machines are shared and noisy, so absolute req/s vary',
    'from run to run while the ratios hold. Newest run first.',
    '',
    '<!-- runs -->',
    '',
  ].join('\n')
  try {
    const text = readFileSync(file, 'utf8')
    const at = text.indexOf('<!-- runs -->\n')
    if (at !== -1) {
      head = text.slice(0, at + '<!-- runs -->\n'.length)
      previous = text.slice(head.length)
    }
  } catch {}
  writeFileSync(file, `${head}## ${new Date().toISOString().slice(0, 10)}\n\n${report}\n${previous}`)
}
await removeBenchRedisKeys(REDIS_URL)
process.exit(0)
