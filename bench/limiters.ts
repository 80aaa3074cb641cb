// node bench/limiters.ts [--requests 30000] [--pairs 8] [--rate R --seconds 3]
// What the Redis limiter costs keygate per request, against the memory limiter, in one run: two
// keygates with every stage on (bench/servers.ts), one without Redis and one with REDIS_URL
// (default redis://127.0.0.1:6379), driven in turn with the same closed-loop requests
// (bench/drive.ts: 32 keep-alive connections), the order swapped from pair to pair, so that a
// change of the shared machine's speed falls on both. For each run: the keygate process's CPU per
// request (user + system, /proc), and the commands Redis ran in it per 1,000 requests (INFO
// commandstats; other clients of the same Redis count too). Prints the medians, and the median of
// the pairs' ratios. With --rate, each run is `seconds` of R requests a second instead (bench/load.ts,
// autocannon's pacing as in npm run bench's fixed-rate slices: each second's requests in a burst
// at its start), so leases are sized to a rate that comes and goes.
// Linux only (/proc); needs Redis.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { Redis } from 'ioredis'
import { countArg as arg, createKey, forkServer, here, keygateEnv, median, redisAnswer, redisUsedThroughout, removeBenchRedisKeys, startKeygate, type Server, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('requests', 'pairs', 'rate', 'seconds')

const REQUESTS = arg('requests', 30_000)
const PAIRS = arg('pairs', 8)
const RATE = process.argv.includes('--rate') ? arg('rate', 1) : 0
const SECONDS = arg('seconds', 3)
const WARM = 40_000
const CONNECTIONS = 32
const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379'
const TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100

const pong = await redisAnswer(REDIS_URL)
if (pong !== 'PONG') {
  process.stderr.write(`bench/limiters.ts: Redis at ${REDIS_URL} does not answer (${pong}): start Redis, or set REDIS_URL\n`)
  process.exit(1)
}
const redis = new Redis(REDIS_URL)

/** Commands Redis has run since it started, all kinds together. */
async function redisCommands(): Promise<number> {
  const info = await redis.info('commandstats')
  let n = 0
  for (const m of info.matchAll(/^cmdstat_[^:]+:calls=(\d+)/gm)) n += Number(m[1])
  return n
}

/** User + system CPU seconds `pid` has used. */
function cpuSeconds(pid: number): number {
  const fields = (readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1] as string).split(' ')
  return (Number(fields[11]) + Number(fields[12])) / TICKS
}

const work = mkdtempSync(join(tmpdir(), 'keygate-limiters-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const upstream = (await forkServer('./upstream.ts')).port

interface Subject {
  name: string
  server: Server
  headers: string
  cpuUs: number[]
  commands: number[]
}
async function subject(name: string, extra: Record<string, string>): Promise<Subject> {
  const env = keygateEnv(join(work, name), upstream, extra)
  const headers = JSON.stringify({ 'x-forwarded-for': '203.0.113.9', authorization: `Bearer ${createKey(env)}` })
  return { name, server: await startKeygate(env), headers, cpuUs: [], commands: [] }
}
const memory = await subject('memory', {})
const withRedis = await subject('redis', { REDIS_URL })

/** Drives `s` with `requests` requests in a closed loop, or (with --rate) for SECONDS at RATE a second: how many were answered. */
function drive(s: Subject, requests: number, paced = false): number {
  if (paced) {
    const out = JSON.parse(execFileSync(process.execPath, [here('./load.ts'), JSON.stringify({ url: `http://127.0.0.1:${s.server.port}/`, seconds: SECONDS, connections: CONNECTIONS, headers: JSON.parse(s.headers), rate: RATE })], { encoding: 'utf8' })) as { total: number; statuses: Record<string, number> }
    const other = out.total - (out.statuses['200'] ?? 0)
    if (other > 0) throw new Error(`${s.name}: ${other} of ${out.total} requests were not answered 200`)
    return out.total
  }
  const out = JSON.parse(execFileSync(process.execPath, [here('./drive.ts'), `http://127.0.0.1:${s.server.port}/`, s.headers, String(requests), String(CONNECTIONS)], { encoding: 'utf8' })) as { done: number; other: number }
  if (out.other > 0) throw new Error(`${s.name}: ${out.other} of ${out.done} requests were not answered 200`)
  return out.done
}

for (const s of [memory, withRedis]) drive(s, WARM)
for (let pair = 0; pair < PAIRS; pair++) {
  for (const s of pair % 2 === 0 ? [memory, withRedis] : [withRedis, memory]) {
    const cpu = cpuSeconds(s.server.pid)
    const commands = await redisCommands()
    const answered = drive(s, REQUESTS, RATE > 0)
    s.cpuUs.push(((cpuSeconds(s.server.pid) - cpu) * 1e6) / answered)
    // Less the INFO call that reads the count.
    s.commands.push((((await redisCommands()) - commands - 1) * 1000) / answered)
  }
}
redisUsedThroughout(withRedis.server)

// Each pair's two runs are seconds apart, so their ratio is steadier than the ratio of medians taken over minutes.
const pairRatios = withRedis.cpuUs.map((r, i) => r / (memory.cpuUs[i] as number))
const f = (xs: number[]) => xs.map((x) => x.toFixed(1)).join(', ')
process.stdout.write(
  [
    `keygate's CPU per request and Redis commands per 1,000 requests (${PAIRS} pairs of ${RATE > 0 ? `${SECONDS} s at ${RATE} requests a second` : `${REQUESTS} requests`} after ${WARM} to warm up, ${CONNECTIONS} connections, Node ${process.version}):`,
    '',
    '| keygate | CPU µs/request (median) | each run | Redis commands per 1,000 requests (median) |',
    '| --- | --- | --- | --- |',
    `| memory limiter | ${median(memory.cpuUs).toFixed(1)} | ${f(memory.cpuUs)} | ${median(memory.commands).toFixed(1)} |`,
    `| Redis limiter | ${median(withRedis.cpuUs).toFixed(1)} | ${f(withRedis.cpuUs)} | ${median(withRedis.commands).toFixed(1)} |`,
    '',
    `Redis limiter against memory limiter, CPU per request: ${median(pairRatios).toFixed(3)} (median of the ${PAIRS} pairs' ratios; each: ${pairRatios.map((r) => r.toFixed(2)).join(', ')}).`,
    '',
  ].join('\n'),
)
redis.disconnect()
await removeBenchRedisKeys(REDIS_URL)
process.exit(0)
