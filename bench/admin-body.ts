// node bench/admin-body.ts [--reps 7]
// How long the admin listener's one thread is held by a body of many small values within
// admin.max_body_bytes (1 MiB): a real `keygate serve` on the embedded store, POST /v1/keys with
// bodies of about 960 KB, each refused (400). The baseline is a body of the same size that is
// white space and one number (read, decoded and parsed as the others, then refused at once by
// the schema, its value shown in a few characters); each other body is given as a ratio to it,
// from the fastest of `reps` answers of each. What a body costs past that baseline is the checks
// walking its parsed values, and the showing of what is refused.
import { mkdtempSync, rmSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { adminAddress, countArg as arg, forkServer, keygateEnv, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('reps')

const REPS = arg('reps', 7)
const TOKEN = 'bench-admin-token-0123456789'

const work = mkdtempSync(join(tmpdir(), 'keygate-admin-body-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const upstream = (await forkServer('./upstream.ts')).port
const server = await startKeygate(keygateEnv(join(work, 'store'), upstream))
const address = await adminAddress(server)

const N = 480_000
const bodies: Array<[string, string]> = [
  ['white space and a number (the baseline)', `${' '.repeat(2 * N - 1)}1`],
  ['one string as the body', JSON.stringify('a'.repeat(2 * N - 2))],
  [`${N.toLocaleString('en')} numbers as the body`, JSON.stringify(Array(N).fill(1))],
  [`${N.toLocaleString('en')} numbers as scopes`, JSON.stringify({ name: 'b', type: 'user', scopes: Array(N).fill(1) })],
  [`${N.toLocaleString('en')} numbers in metadata`, JSON.stringify({ name: 'b', type: 'user', metadata: { a: Array(N).fill(1) } })],
  ['200,000 strings as scopes', JSON.stringify({ name: 'b', type: 'user', scopes: Array(200_000).fill('a') })],
  ['120,000 objects as the body', JSON.stringify(Array(120_000).fill({ a: 1 }))],
]

/** The fastest of REPS answers to `body`, in ms (each must be a 400). */
async function fastest(body: string): Promise<number> {
  let best = Infinity
  for (let i = 0; i < REPS; i++) {
    const started = performance.now()
    const answer = await fetch(`http://${address}/v1/keys`, { method: 'POST', headers: { authorization: `Bearer ${TOKEN}`, 'content-type': 'application/json' }, body })
    await answer.arrayBuffer()
    best = Math.min(best, performance.now() - started)
    if (answer.status !== 400) throw new Error(`answered ${answer.status}, not 400`)
  }
  return best
}

const rows: Array<[string, number, number]> = []
for (const [name, body] of bodies) rows.push([name, body.length, await fastest(body)])
const base = rows[0]?.[2] as number
process.stdout.write(
  [
    `The admin listener answering POST /v1/keys with bodies refused 400 (fastest of ${REPS} each, Node ${process.version}):`,
    '',
    '| body | bytes | ms | against the baseline |',
    '| --- | --- | --- | --- |',
    ...rows.map(([name, bytes, ms]) => `| ${name} | ${bytes} | ${ms.toFixed(1)} | ${(ms / base).toFixed(2)} |`),
    '',
  ].join('\n'),
)
server.child.kill('SIGTERM')
process.exit(0)
