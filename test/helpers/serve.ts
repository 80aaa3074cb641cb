// Runs `keygate serve` as a real child process on port 0 and reads the listening addresses from
// its JSON log lines (stdout). Every process is killed with the test if it is still running.
import type { ChildProcess } from 'node:child_process'
import net from 'node:net'
import { Client } from 'undici'
import { KEYGATE_BIN, capturedStderr, childEnv, spawnClean } from './cli.ts'
import type { Tap } from './gateway.ts'

export interface LogLine {
  level: string
  message: string
  [field: string]: unknown
}

export interface Served {
  child: ChildProcess
  /** http://host:port of the gateway ('' when not waited for). */
  gateway: string
  /** http://host:port of the admin (or health and metrics) listener ('' when not waited for). */
  admin: string
  logs: LogLine[]
  stdout(): string
  stderr(): string
  /** Resolves with the exit code (or signal name) once the process has ended and all its output has been read. */
  exited: Promise<number | string>
  stop(signal?: NodeJS.Signals): Promise<number | string>
  /** Waits until a log line matches. */
  waitForLog(match: (line: LogLine) => boolean, timeoutMs?: number): Promise<LogLine>
}

/** An environment for `keygate serve` free of the machine's own keygate settings, plus `extra`. */
export function isolatedEnv(extra: Record<string, string | undefined>): Record<string, string | undefined> {
  return {
    DATABASE_URL: undefined,
    REDIS_URL: undefined,
    KEYGATE_CONFIG: undefined,
    KEYGATE_ENCRYPTION_KEY: undefined,
    KEYGATE_ADMIN_TOKEN: undefined,
    KEYGATE_ADMIN_URL: undefined,
    KEYGATE_UPSTREAM: undefined,
    ...extra,
  }
}

export interface ServeOptions {
  args?: string[]
  env?: Record<string, string | undefined>
  cwd?: string
  /** Which listeners to wait for; by default both. */
  waitFor?: { gateway?: boolean; admin?: boolean }
  /** How many gateway listeners to wait for (--workers N reports N). */
  gateways?: number
  timeoutMs?: number
  /** In a process group of its own, as a service manager starts it (so the test can signal the group). */
  detached?: boolean
  /** Another keygate command to run (an installed package's). */
  bin?: string
  /**
   * `full`: V8's default tiering and store.embedded_shared_buffers_mb, as `serve` runs in production. By default the tests start it on
   * V8's baseline compiler alone (`--liftoff-only`), as the test processes and the short commands
   * run: a test's `serve` lives for seconds, and V8's optimising compiler, recompiling PGlite's
   * WebAssembly on the side, took about a third of its CPU (a start and a second of idling: 3.5
   * to 4.0 s of CPU, 2.2 to 2.5 s with the flag).
   */
  tiering?: 'liftoff' | 'full'
  /** The process's open-file limit, soft and hard (`ulimit -n`, which Node cannot raise then). */
  openFiles?: number
}

export async function serve(t: Tap, options: ServeOptions = {}): Promise<Served> {
  // A test's embedded store holds a few rows: 16 MiB of shared buffers, not 128, saves about 0.45 s
  // of CPU a start (2.8 s against 2.4 s, here) that zeroing them cost. `full` keeps serve's default.
  const buffers = options.tiering === 'full' ? {} : { KEYGATE_EMBEDDED_SHARED_BUFFERS_MB: '16' }
  const env = childEnv({ KEYGATE_LISTEN: '127.0.0.1:0', KEYGATE_ADMIN_LISTEN: '127.0.0.1:0', LOG_LEVEL: 'info', ...buffers, ...options.env })
  const v8 = options.tiering === 'full' ? [] : ['--liftoff-only']
  const command = [process.execPath, ...v8, options.bin ?? KEYGATE_BIN, 'serve', ...(options.args ?? [])]
  // The shell replaces itself with the process (exec): its pid is serve's.
  const limited = options.openFiles === undefined ? command : ['sh', '-c', `ulimit -n ${options.openFiles} && exec "$@"`, 'sh', ...command]
  const child = spawnClean(limited[0] as string, limited.slice(1), { env, cwd: options.cwd ?? process.cwd(), stdio: ['ignore', 'pipe', 'pipe'], detached: options.detached ?? false })
  let out = ''
  let err = ''
  let partial = ''
  const logs: LogLine[] = []
  const waiters = new Set<() => void>()
  child.stdout!.setEncoding('utf8').on('data', (d: string) => {
    out += d
    partial += d
    const lines = partial.split('\n')
    partial = lines.pop() ?? ''
    for (const line of lines) {
      try {
        logs.push(JSON.parse(line) as LogLine)
      } catch {
        logs.push({ level: 'raw', message: line })
      }
    }
    for (const w of waiters) w()
  })
  child.stderr!.setEncoding('utf8').on('data', (d: string) => (err += d))
  // On 'close', not 'exit': the process can have ended with its last lines ('stopped') still in
  // the pipe, unread, so logs read at once after a stop missed them on a loaded machine. Set
  // before the waiters look, so that one waiting for a line that will never come fails at once.
  let done = false
  const exited = new Promise<number | string>((resolve) => {
    child.on('close', (code, signal) => {
      done = true
      capturedStderr.push(err)
      resolve(code ?? signal ?? -1)
      for (const w of waiters) w()
    })
  })
  // The process itself: a child of its own (a frozen --workers worker) can hold the pipes open after it.
  const ended = new Promise<void>((resolve) => child.on('exit', () => resolve()))
  t.teardown(async () => {
    if (!done) {
      child.kill('SIGKILL')
      await ended
    }
  })
  // A hang guard, not a latency bound: under the suite's full load on two cores a cold start of
  // the embedded store once took over 30 s (two serve tests failed so; alone, the file passes in
  // 42 s), so it waits 90 s, within tap's 600 s a file.
  const waitForLog = (match: (line: LogLine) => boolean, timeoutMs = options.timeoutMs ?? 90_000) =>
    new Promise<LogLine>((resolve, reject) => {
      const check = () => {
        const hit = logs.find(match)
        if (hit) {
          waiters.delete(check)
          clearTimeout(timer)
          resolve(hit)
        } else if (done) {
          waiters.delete(check)
          clearTimeout(timer)
          reject(new Error(`keygate serve exited before the expected log line\nstdout:\n${out}\nstderr:\n${err}`))
        }
      }
      const timer = setTimeout(() => {
        waiters.delete(check)
        reject(new Error(`no expected log line within ${timeoutMs} ms\nstdout:\n${out}\nstderr:\n${err}`))
      }, timeoutMs)
      waiters.add(check)
      check()
    })
  const served: Served = {
    child,
    gateway: '',
    admin: '',
    logs,
    stdout: () => out,
    stderr: () => err,
    exited,
    waitForLog,
    stop: async (signal = 'SIGTERM') => {
      if (!done) child.kill(signal)
      return exited
    },
  }
  const wantGateway = options.waitFor?.gateway ?? true
  const wantAdmin = options.waitFor?.admin ?? true
  if (wantGateway) {
    const listening = (l: LogLine) => l.message === 'gateway listening'
    served.gateway = `http://${(await waitForLog(listening)).address as string}`
    const count = options.gateways ?? 1
    await waitForLog(() => logs.filter(listening).length >= count)
  }
  if (wantAdmin) served.admin = `http://${(await waitForLog((l) => l.message === 'admin listening' || l.message === 'health and metrics listening')).address as string}`
  return served
}

/**
 * One keep-alive connection to each of a `--workers` gateway's workers, told apart by the
 * per-process prefix of the request id: the kernel spreads new connections over the workers by a
 * hash of their addresses (SO_REUSEPORT), not in turn. Asked without a key (401 key_missing),
 * which counts towards neither a lockout nor an anomaly.
 */
export async function connectionPerWorker(t: Tap, gateway: string, workers: number): Promise<Client[]> {
  const found = new Map<string, Client>()
  for (let tries = 0; found.size < workers; tries++) {
    if (tries === 200) throw new Error(`200 new connections reached ${found.size} of ${workers} workers`)
    const client = new Client(gateway)
    const answer = await client.request({ method: 'GET', path: '/which-worker' })
    await answer.body.dump()
    const worker = String(answer.headers['x-request-id']).split('-')[0] as string
    if (found.has(worker)) {
      await client.close()
      continue
    }
    found.set(worker, client)
    t.teardown(() => client.close())
  }
  return [...found.values()]
}

/** A raw client connection: what it received (latin1), and `closed`, settled with it when the connection ends. */
export interface RawClient {
  socket: net.Socket
  received(): string
  closed: Promise<string>
}

/** A TCP connection to `url` that writes `first` (nothing by default) and then waits. */
export function rawClient(url: string, first = ''): RawClient {
  const { hostname, port } = new URL(url)
  const socket = net.connect(Number(port), hostname, () => void (first && socket.write(first)))
  let text = ''
  socket.setEncoding('latin1').on('data', (d: string) => (text += d))
  socket.on('error', () => {})
  return { socket, received: () => text, closed: new Promise((resolve) => socket.once('close', () => resolve(text))) }
}
