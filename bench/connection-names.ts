// What a client's Connection header naming many headers costs the gateway: `keygate serve` on the
// embedded store forwards N requests with a valid key, each with as many header lines as allowed
// (gateway.max_headers less 10, at most 900) and a header block near gateway.max_header_bytes,
// in two phases of the same bytes: `plain`, where Connection says keep-alive and the bytes are in an X-Pad line, and
// `named`, where Connection names as many (distinct, absent) headers as those bytes hold. Prints
// the server's CPU (user + system, /proc) per request in µs for each phase and their ratio. With
// --max, the gateway's largest limits (max_header_bytes 1 MiB, max_headers 1000) instead of the
// defaults (16 KiB, 100).
// node bench/connection-names.ts [--requests 4000] [--max] [--keygate other/bin/keygate.ts]
import { execFileSync } from 'node:child_process'
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs'
import http from 'node:http'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { countArg, createKey, forkServer, here, keygateEnv, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('requests', 'max', 'keygate')

const max = process.argv.includes('--max')
const requests = countArg('requests', max ? 200 : 4000)
const i = process.argv.indexOf('--keygate')
const keygate = i === -1 ? here('../bin/keygate.ts') : (process.argv[i + 1] as string)
const headerBytes = max ? 1_048_576 : 16_384
const headerLines = max ? 1000 : 100

const dir = mkdtempSync(join(tmpdir(), 'kg-connection-names-'))
process.on('exit', () => rmSync(dir, { recursive: true, force: true }))
// The plain phase's pad reaches the upstream: it takes header blocks of any size the gateway does.
process.env.NODE_OPTIONS = `${process.env.NODE_OPTIONS ?? ''} --max-http-header-size=${2 * headerBytes}`
const upstream = await forkServer('upstream.ts')
delete process.env.NODE_OPTIONS
const env = keygateEnv(join(dir, 'store'), upstream.port)
// keygateEnv's configuration, with the header limits of this run.
const config = readFileSync(env.KEYGATE_CONFIG as string, 'utf8').replace('gateway: { ', `gateway: { max_header_bytes: ${headerBytes}, max_headers: ${headerLines}, `)
writeFileSync(env.KEYGATE_CONFIG as string, config)
const key = createKey(env)
const server = await startKeygate(env, [], keygate)

const TICKS = Number(execFileSync('getconf', ['CLK_TCK'], { encoding: 'utf8' }).trim()) || 100
const cpuUs = () => {
  const fields = readFileSync(`/proc/${server.pid}/stat`, 'utf8').split(') ')[1]!.split(' ')
  return ((Number(fields[11]) + Number(fields[12])) * 1e6) / TICKS
}

// Room left for the names (or the pad): the limit less the other lines and some slack.
const lines: Record<string, string> = { authorization: `Bearer ${key}` }
// 900 at most: 990 lines and the gateway's own reached the bench upstream as a 431 (Node's).
for (let n = 0; n < Math.min(headerLines - 10, 900); n++) lines[`x-line-${n}`] = '1'
const room = headerBytes - 20 * headerLines - 2048
const names: string[] = []
for (let n = 0, len = 0; len + 8 < room; n++) {
  names.push(`n${n}`)
  len += `n${n}`.length + 1
}
const named = names.join(',')
const phases = {
  plain: { ...lines, connection: 'keep-alive', 'x-pad': 'p'.repeat(named.length) },
  named: { ...lines, connection: `keep-alive,${named}` },
}

const agent = new http.Agent({ keepAlive: true, maxSockets: 4 })
const one = (headers: Record<string, string>) =>
  new Promise<number>((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port: server.port, path: '/', headers, agent }, (res) => {
      let body = ''
      res.setEncoding('utf8').on('data', (d: string) => (body += d))
      res.on('end', () => (res.statusCode === 200 ? resolve(200) : reject(new Error(`answered ${res.statusCode}: ${body}`))))
    })
    req.on('error', reject)
    req.end()
  })
const run = async (headers: Record<string, string>, count: number): Promise<number> => {
  const start = cpuUs()
  let next = 0
  const worker = async () => {
    while (next++ < count) {
      await one(headers)
    }
  }
  await Promise.all([worker(), worker(), worker(), worker()])
  return (cpuUs() - start) / count
}

// Warm-up of both, then alternating halves so drift hits both phases alike.
await run(phases.plain, Math.ceil(requests / 10))
await run(phases.named, Math.ceil(requests / 10))
const cpu = { plain: 0, named: 0 }
for (let half = 0; half < 2; half++) {
  cpu.plain += (await run(phases.plain, requests / 2)) / 2
  cpu.named += (await run(phases.named, requests / 2)) / 2
}
console.log(
  JSON.stringify({
    limits: { max_header_bytes: headerBytes, max_headers: headerLines },
    connection_names: names.length,
    requests,
    plain_us: Math.round(cpu.plain),
    named_us: Math.round(cpu.named),
    ratio: Math.round((cpu.named / cpu.plain) * 100) / 100,
  }),
)
agent.destroy()
process.exit(0)
