// node bench/instructions.ts [--requests 3000] [--reps 5] [--warm 40000] [--only keygate,redis]
// CPU per request without the noise of a shared machine: the bare proxy and keygate (memory
// limiter, every stage on) each run under valgrind's callgrind, which counts the instructions the
// process executes (every thread) whatever else the machine does. Each is warmed up with
// instrumentation off, then measured over `reps` runs of `requests` requests (32 keep-alive
// connections, the same requests as npm run bench). V8's optimising compilers (TurboFan, Maglev)
// still recompile now and then, which moves a run's total by up to 25%; their functions are
// counted apart ("net" is the rest). Garbage collection also comes in bursts (a run with a full
// collection counts up to ~15% more), and both only ever add: the comparison takes each server's
// lowest net run, which repeats within a few percent.
// A third server is the baseline setting the headers SPEC §3 has keygate set (baseline-proxy.ts
// --contract-headers): what those cost in undici's and Node's header handling, apart from
// keygate's checks. A fourth is keygate with the Redis limiter (REDIS_URL, default
// redis://127.0.0.1:6379; left out, saying so, when no Redis answers there): its instructions are
// keygate's alone, Redis's own work is in Redis's process. Its leases are sized by time (about
// 100 ms of a key's requests), and under valgrind far fewer requests come in 100 ms, so Redis is
// asked far more often per request than at full speed: the figure is an upper bound of what the
// Redis limiter costs keygate per request. Needs valgrind (callgrind_control comes with it); about
// 2 minutes per server. `--only` measures some of the servers (baseline, contract, keygate, redis):
// to compare two commits' keygate, run each alone (`--only keygate`, not side by side: counts
// moved with the machine's load) and compare the keygate rows.
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { createKey, countArg as arg, forkServer, freshStores, here, keygateEnv, median, redisAnswer, redisUsedThroughout, removeBenchRedisKeys, startKeygate, type Server, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('requests', 'reps', 'warm', 'only')

const REQUESTS = arg('requests', 3000)
const REPS = arg('reps', 5)
const WARM = arg('warm', 40_000)
const CONNECTIONS = 32
const SERVERS = ['baseline', 'contract', 'keygate', 'redis'] as const
type ServerName = (typeof SERVERS)[number]
const onlyAt = process.argv.indexOf('--only')
const only = new Set(onlyAt === -1 ? SERVERS : (process.argv[onlyAt + 1] ?? '').split(','))
for (const name of only) {
  if (!(SERVERS as readonly string[]).includes(name)) {
    process.stderr.write(`--only takes a comma-separated list of ${SERVERS.join(', ')}\n`)
    process.exit(2)
  }
}
const measured = (name: ServerName) => only.has(name)

try {
  execFileSync('valgrind', ['--version'], { stdio: 'ignore' })
  execFileSync('callgrind_control', ['--version'], { stdio: 'ignore' })
} catch {
  process.stderr.write('bench/instructions.ts needs valgrind with callgrind (Debian: apt-get install valgrind)\n')
  process.exit(2)
}

const work = mkdtempSync(join(tmpdir(), 'keygate-instructions-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
// valgrind's pipes to vgdb (callgrind_control talks through them) in the work folder: in the
// temporary folder they outlived every run, the servers being killed.
const VGDB_PREFIX = `--vgdb-prefix=${join(work, 'vgdb')}`
const wrapper = (name: string) => ['valgrind', '--tool=callgrind', '--instr-atstart=no', '-q', VGDB_PREFIX, `--callgrind-out-file=${join(work, name)}.%p.out`]

/** What V8's optimising compilers run: counted apart, since when they run is not per request. */
const COMPILER = /compiler::|turboshaft|maglev|Maglev|::Zone|Zone::|Compiler|OptimizingCompile|RegisterAllocat|InstructionSelector|LiveRange|CodeGenerator|Assembler|Pipeline/

/** A callgrind dump's instructions: all of them, and those in compiler functions. */
function readDump(file: string): { total: number; compiler: number } {
  const names = new Map<string, string>()
  let fn = ''
  let inCall = false
  let total = 0
  let compiler = 0
  for (const line of readFileSync(file, 'utf8').split('\n')) {
    if (line.startsWith('fn=')) {
      const m = /^\((\d+)\)(?: (.*))?$/.exec(line.slice(3))
      if (m?.[2] !== undefined) names.set(m[1] as string, m[2])
      fn = m ? (names.get(m[1] as string) ?? '') : line.slice(3)
    } else if (line.startsWith('cfn=')) {
      // Names are compressed in one space for fn= and cfn=: a function first named as a callee
      // is later given by its number alone. Missed before (2026-12-05), such a function read as
      // nameless, and much of the compilers' work was counted as the request path's: the "net"
      // of a run that recompiled rose with it.
      const m = /^\((\d+)\) (.*)$/.exec(line.slice(4))
      if (m) names.set(m[1] as string, m[2] as string)
    } else if (line.startsWith('calls=')) inCall = true
    else if (/^[0-9+-]/.test(line)) {
      // A cost line: after calls= it is the call's inclusive cost (counted in the callee), else the function's own.
      if (inCall) inCall = false
      else {
        const cost = Number(line.trim().split(/\s+/)[1] ?? 0)
        total += cost
        if (COMPILER.test(fn)) compiler += cost
      }
    }
  }
  return { total, compiler }
}

function drive(port: number, headers: Record<string, string>, requests: number): void {
  const out = JSON.parse(execFileSync(process.execPath, [here('./drive.ts'), `http://127.0.0.1:${port}/`, JSON.stringify(headers), String(requests), String(CONNECTIONS)], { encoding: 'utf8' })) as { done: number; other: number }
  if (out.other > 0) throw new Error(`${out.other} of ${out.done} requests were not answered 200`)
}

interface Figures {
  net: number[]
  total: number[]
}

/** Warms `server` up, then measures REPS runs of REQUESTS requests: instructions per request. */
function measure(name: string, server: Server, headers: Record<string, string>): Figures {
  drive(server.port, headers, WARM)
  const control = (...args: string[]) => execFileSync('callgrind_control', [VGDB_PREFIX, ...args, String(server.pid)], { stdio: 'ignore' })
  control('-i', 'on')
  const figures: Figures = { net: [], total: [] }
  for (let rep = 1; rep <= REPS; rep++) {
    control('-z')
    drive(server.port, headers, REQUESTS)
    control('-d')
    const dump = join(work, `${name}.${server.pid}.out.${rep}`)
    const { total, compiler } = readDump(dump)
    figures.total.push(total / REQUESTS)
    figures.net.push((total - compiler) / REQUESTS)
    process.stderr.write(`${name}: run ${rep} of ${REPS}: ${Math.round(total / REQUESTS)} instructions per request, ${Math.round((total - compiler) / REQUESTS)} without the compilers\n`)
  }
  server.child.kill('SIGTERM')
  return figures
}

const upstream = (await forkServer('./upstream.ts')).port
// Under valgrind a second of the clock passes every few dozen requests, so work done per second
// (the usage and anomaly counts written to the store) weighs far more per request than it does at
// full speed; on the embedded store that work runs in this process (PGlite on a worker thread).
// With DATABASE_URL it runs in PostgreSQL instead (a fresh database on that server), and only the
// request path is counted.
// A fresh database on that server, dropped at the end: before, keygate's tables and the bench's
// keys went into the database DATABASE_URL names (a deployment's, say).
const postgres = process.env.DATABASE_URL ? await freshStores(work).find((s) => s.name === 'postgres')?.open() : undefined
const database: Record<string, string> = postgres?.env ?? {}
const env = keygateEnv(join(work, 'memory'), upstream, database)
const key = createKey(env)
const headers = { 'x-forwarded-for': '203.0.113.9', authorization: `Bearer ${key}` }
const baseline = measured('baseline') ? measure('baseline', await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`], wrapper('baseline')), headers) : undefined
const contract = measured('contract') ? measure('contract', await forkServer('./baseline-proxy.ts', [`http://127.0.0.1:${upstream}`, '--contract-headers'], wrapper('contract')), headers) : undefined
const keygate = measured('keygate') ? measure('keygate', await startKeygate(env, wrapper('keygate')), headers) : undefined

const REDIS_URL = process.env.REDIS_URL || 'redis://127.0.0.1:6379'
const pong = measured('redis') ? await redisAnswer(REDIS_URL) : 'not asked (--only)'
let redis: Figures | undefined
if (pong === 'PONG') {
  const redisEnv = keygateEnv(join(work, 'redis'), upstream, { ...database, REDIS_URL })
  const redisHeaders = { ...headers, authorization: `Bearer ${createKey(redisEnv)}` }
  const server = await startKeygate(redisEnv, wrapper('redis'))
  redis = measure('redis', server, redisHeaders)
  redisUsedThroughout(server)
}

const least = (xs: number[]) => Math.min(...xs)
const row = (name: string, f: Figures | undefined) => (f ? [`| ${name} | ${Math.round(least(f.net))} | ${f.net.map((x) => Math.round(x)).join(', ')} | ${Math.round(median(f.total))} |`] : [])
const ratio = (f: Figures | undefined) => (f && baseline ? (least(f.net) / least(baseline.net)).toFixed(3) : 'not measured')
process.stdout.write(
  [
    `Instructions per request under callgrind (${REPS} runs of ${REQUESTS} requests after ${WARM} to warm up, ${CONNECTIONS} connections, Node ${process.version}):`,
    '',
    '| server | net (lowest run) | net, each run | all, with the compilers (median) |',
    '| --- | --- | --- | --- |',
    ...row('baseline (bare undici proxy)', baseline),
    ...row('baseline setting the headers of SPEC §3 (--contract-headers)', contract),
    ...row('keygate, valid cached key (memory limiter)', keygate),
    ...row('keygate, valid cached key (Redis limiter)', redis),
    '',
    `keygate's store: ${process.env.DATABASE_URL ? 'PostgreSQL (DATABASE_URL)' : 'embedded (its work per second is counted too, and weighs more per request under valgrind than at full speed)'}.`,
    ...(baseline
      ? [
          `Net (lowest runs), against the baseline: the contract's headers alone ${ratio(contract)}, keygate ${ratio(keygate)}` +
            (redis ? `, keygate with the Redis limiter ${ratio(redis)} (an upper bound, see the top of bench/instructions.ts).` : `; the Redis limiter not measured (Redis at ${REDIS_URL}: ${pong}).`),
        ]
      : ['No ratios: the baseline was not measured (--only).']),
    '',
  ].join('\n'),
)
await postgres?.drop()
if (pong === 'PONG') await removeBenchRedisKeys(REDIS_URL)
process.exit(0)
