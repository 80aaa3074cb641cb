// How long the admin listener is held by a query of many parameters: a real `keygate serve` on the
// embedded store, admin.max_header_bytes at its largest (1 MiB), GET /v1/keys with n distinct
// unknown parameters (`q0=a&q1=a&...`, refused 400 naming the first 20) and with one parameter
// repeated n times (`scope=a&scope=a&...`, refused as repeated), for n = 1,000, 4,000, 16,000 and
// 64,000. Prints the median of `reps` answers of each in ms and its ratio to the n = 1,000 case
// (4 times the parameters: 4 times the time when the work is linear, 16 when quadratic). With
// --keygate, another checkout's bin/keygate.ts (the one before a change).
// node bench/admin-query.ts [--reps 5] [--keygate other/bin/keygate.ts]
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { adminAddress, countArg, forkServer, here, keygateEnv, median, refuseUnknownFlags, startKeygate } from './servers.ts'
refuseUnknownFlags('reps', 'keygate')

const REPS = countArg('reps', 5)
const i = process.argv.indexOf('--keygate')
const keygate = i === -1 ? here('../bin/keygate.ts') : (process.argv[i + 1] as string)
const TOKEN = 'bench-admin-token-0123456789'
const SIZES = [1000, 4000, 16_000, 64_000]

const work = mkdtempSync(join(tmpdir(), 'keygate-admin-query-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const upstream = (await forkServer('./upstream.ts')).port
const env = keygateEnv(join(work, 'store'), upstream)
writeFileSync(env.KEYGATE_CONFIG as string, readFileSync(env.KEYGATE_CONFIG as string, 'utf8').replace('admin: { ', 'admin: { max_header_bytes: 1048576, '))
const server = await startKeygate(env, [], keygate)
const address = await adminAddress(server)

/** The median of REPS answers to GET `path`, in ms (each must be a 400). */
async function timed(path: string): Promise<number> {
  const ms: number[] = []
  for (let rep = 0; rep < REPS + 1; rep++) {
    const started = performance.now()
    const answer = await fetch(`http://${address}${path}`, { headers: { authorization: `Bearer ${TOKEN}` } })
    await answer.arrayBuffer()
    if (rep > 0) ms.push(performance.now() - started)
    if (answer.status !== 400) throw new Error(`answered ${answer.status}, not 400`)
  }
  return median(ms)
}

const shapes: Array<[string, (n: number) => string]> = [
  ['distinct unknown names', (n) => `/v1/keys?${Array.from({ length: n }, (_, k) => `q${k}=a`).join('&')}`],
  ['one name repeated', (n) => `/v1/keys?${Array(n).fill('scope=a').join('&')}`],
]
const rows: string[] = []
for (const [name, make] of shapes) {
  const times: number[] = []
  for (const n of SIZES) times.push(await timed(make(n)))
  const first = times[0] as number
  rows.push(`| ${name} | ${times.map((ms) => `${ms.toFixed(1)} (${(ms / first).toFixed(1)})`).join(' | ')} |`)
}
process.stdout.write(
  [
    `GET /v1/keys with n query parameters, refused 400 (median of ${REPS} answers, ms, and the ratio to n = 1,000; Node ${process.version}):`,
    '',
    `| query | ${SIZES.map((n) => `n = ${n.toLocaleString('en')}`).join(' | ')} |`,
    `| --- | ${SIZES.map(() => '---').join(' | ')} |`,
    ...rows,
    '',
  ].join('\n'),
)
server.child.kill('SIGTERM')
process.exit(0)
