// A Redis server of the test's own (redis-server on a free port, no persistence), so a test may
// stop, restart, pause and resume it without touching the machine's Redis that other suites use.
// Killed with the test.
import { spawn, type ChildProcess } from 'node:child_process'
import net from 'node:net'
import type { Tap } from './gateway.ts'

export interface RedisServer {
  url: string
  port: number
  /** Stops the server at once (SIGKILL: what a crash looks like to clients). */
  stop(): Promise<void>
  /** Starts it again on the same port, empty. */
  start(): Promise<void>
  /** SIGSTOP: the server holds connections but answers nothing (a slow or frozen Redis). */
  pause(): void
  resume(): void
}

async function freePort(): Promise<number> {
  const server = net.createServer()
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve))
  const port = (server.address() as net.AddressInfo).port
  await new Promise((resolve) => server.close(resolve))
  return port
}

/** `args`: more of redis-server's options (`--rename-command SUBSCRIBE ''`, say). */
export async function startRedisServer(t: Tap, args: string[] = []): Promise<RedisServer> {
  const port = await freePort()
  let child: ChildProcess | undefined
  const start = async (): Promise<void> => {
    const c = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '', '--appendonly', 'no', ...args], { stdio: ['ignore', 'pipe', 'pipe'] })
    child = c
    let out = ''
    await new Promise<void>((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`redis-server on port ${port} did not start:\n${out}`)), 10_000)
      c.stdout!.setEncoding('utf8').on('data', (d: string) => {
        out += d
        if (out.includes('Ready to accept connections')) {
          clearTimeout(timer)
          resolve()
        }
      })
      c.on('exit', (code) => {
        clearTimeout(timer)
        reject(new Error(`redis-server exited (${code}):\n${out}`))
      })
      c.on('error', reject)
    })
    c.removeAllListeners('exit')
  }
  const stop = async (): Promise<void> => {
    const c = child
    child = undefined
    if (!c || c.exitCode !== null) return
    const exited = new Promise((resolve) => c.once('exit', resolve))
    c.kill('SIGCONT')
    c.kill('SIGKILL')
    await exited
  }
  await start()
  t.teardown(stop)
  return {
    url: `redis://127.0.0.1:${port}`,
    port,
    stop,
    start,
    pause: () => void child?.kill('SIGSTOP'),
    resume: () => void child?.kill('SIGCONT'),
  }
}
