// node bench/idle-connections.ts [--connections N]: the memory an idle client connection holds in
// `keygate serve` (the embedded store, every stage on), for a connection that has sent nothing,
// one kept alive after a small GET, one kept alive after a GET with 12 KiB of headers (under
// gateway.max_header_bytes, 16 KiB by default), and one after a GET whose X-Forwarded-For (from
// the trusted loopback proxy) is 12 KiB of a client's own hops. Each kind in a fresh process, twice: the live
// heap and external memory after a full collection (through the inspector) and the RSS, per
// connection, against the same process before the connections. gateway.keep_alive_timeout_ms
// (75 s) is how long a kept-alive connection holds it.
import { mkdtempSync, readFileSync, rmSync } from 'node:fs'
import { connect, type Socket } from 'node:net'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { countArg, createKey, forkServer, keygateEnv, startKeygate, refuseUnknownFlags } from './servers.ts'
refuseUnknownFlags('connections')

const connections = countArg('connections', 1000)
const work = mkdtempSync(join(tmpdir(), 'keygate-idle-connections-'))
process.on('exit', () => rmSync(work, { recursive: true, force: true }))
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms))
const upstream = (await forkServer('./upstream.ts')).port
const env = keygateEnv(join(work, 'store'), upstream)
const key = createKey(env)

/** Live heap + external bytes after full collections (the inspector's), and the RSS. */
async function memory(inspectPort: number, pid: number): Promise<{ live: number; rss: number }> {
  const [target] = (await (await fetch(`http://127.0.0.1:${inspectPort}/json/list`)).json()) as Array<{ webSocketDebuggerUrl: string }>
  const ws = new WebSocket((target as { webSocketDebuggerUrl: string }).webSocketDebuggerUrl)
  await new Promise((resolve) => ws.addEventListener('open', resolve, { once: true }))
  let last = 0
  const call = (method: string, params: object = {}) =>
    new Promise<{ result?: { value?: string } }>((resolve) => {
      const id = ++last
      const on = (e: MessageEvent) => {
        const m = JSON.parse(String(e.data)) as { id?: number; result: { result?: { value?: string } } }
        if (m.id === id) {
          ws.removeEventListener('message', on)
          resolve(m.result)
        }
      }
      ws.addEventListener('message', on)
      ws.send(JSON.stringify({ id, method, params }))
    })
  for (let i = 0; i < 3; i++) await call('HeapProfiler.collectGarbage')
  const answer = await call('Runtime.evaluate', { expression: 'JSON.stringify(process.memoryUsage())', returnByValue: true })
  ws.close()
  const m = JSON.parse(answer.result?.value as string) as { heapUsed: number; external: number }
  const rss = Number(/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1]) * 1024
  return { live: m.heapUsed + m.external, rss }
}

const request = (extra: string) => `GET /x HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer ${key}\r\n${extra}\r\n`
const kinds: Array<[string, ((i: number) => string) | null]> = [
  ['sent nothing', null],
  ['after a small GET', () => request('')],
  ['after a GET with 12 KiB of headers', (i) => request(`X-Pad: ${String(i).padEnd(12 * 1024, 'p')}\r\n`)],
  ['after a GET with a 12 KiB X-Forwarded-For', (i) => request(`X-Forwarded-For: ${Array.from({ length: 1000 }, (_, j) => `198.18.${j >> 8}.${j & 255}`).join(', ')}, 10.0.${i >> 8}.${i & 255}\r\n`)],
]
let inspectPort = 19_000 + (process.pid % 1000)
for (const round of [1, 2]) {
  for (const [kind, head] of kinds) {
    const port = inspectPort++
    const keygate = await startKeygate({ ...env, NODE_OPTIONS: `--inspect=127.0.0.1:${port}` })
    for (let i = 0; i < 200; i++) await send(keygate.port, request('Connection: close\r\n'))
    await sleep(1500)
    const before = await memory(port, keygate.pid)
    const sockets: Socket[] = []
    for (let i = 0; i < connections; i++) {
      const socket = connect(keygate.port, '127.0.0.1').on('error', () => {})
      await new Promise((resolve) => socket.once('connect', resolve))
      if (head) {
        const status = new Promise<string>((resolve) => socket.once('data', (d) => resolve(String(d).split('\r\n')[0] as string)))
        socket.write(head(i))
        if (!(await status).includes(' 200 ')) throw new Error(`${kind}: answered ${await status}`)
      }
      sockets.push(socket)
    }
    await sleep(3000)
    const after = await memory(port, keygate.pid)
    const open = sockets.filter((s) => s.readyState === 'open').length
    const each = (bytes: number) => `${(bytes / connections / 1024).toFixed(1)} KiB`
    console.log(`round ${round}, ${connections} connections ${kind} (${open} open): live heap and external ${each(after.live - before.live)} each, RSS ${each(after.rss - before.rss)} each`)
    for (const s of sockets) s.destroy()
    keygate.child.kill('SIGKILL')
    await new Promise((resolve) => keygate.child.once('exit', resolve))
  }
}
process.exit(0)

function send(port: number, text: string): Promise<void> {
  return new Promise((resolve) => {
    const socket = connect(port, '127.0.0.1', () => socket.write(text))
    socket.on('data', () => {}).on('close', () => resolve()).on('error', () => resolve())
  })
}
