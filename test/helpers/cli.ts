// Runs the real `keygate` command as a child process.
import { spawn } from 'node:child_process'
import { fileURLToPath } from 'node:url'

export const KEYGATE_BIN = fileURLToPath(new URL('../../bin/keygate.ts', import.meta.url))

export interface CliResult {
  code: number | null
  stdout: string
  stderr: string
  json<T = any>(): T
}

/** Every stderr the tests captured, for the no-plaintext check. */
export const capturedStderr: string[] = []

export function runCli(args: string[], options: { env?: Record<string, string | undefined>; input?: string; cwd?: string } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const env: Record<string, string> = {}
    for (const [k, v] of Object.entries({ ...process.env, ...options.env })) {
      if (v !== undefined && !k.startsWith('TAP')) env[k] = v
    }
    const child = spawn(process.execPath, [KEYGATE_BIN, ...args], { env, cwd: options.cwd ?? process.cwd(), stdio: ['pipe', 'pipe', 'pipe'] })
    let stdout = ''
    let stderr = ''
    child.stdout.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => {
      capturedStderr.push(stderr)
      resolve({
        code,
        stdout,
        stderr,
        json: () => {
          try {
            return JSON.parse(stdout)
          } catch {
            throw new Error(`keygate ${args.join(' ')} printed no JSON (exit ${code}):\n${stdout}\n${stderr}`)
          }
        },
      })
    })
    child.stdin.end(options.input ?? '')
  })
}

export interface ServeProcess {
  gatewayUrl: string
  adminUrl: string
  /** Everything printed so far. */
  stdout(): string
  stderr(): string
  /** SIGTERM, then the exit code. */
  stop(): Promise<number | null>
}

/**
 * Starts `keygate serve` as a real process and waits until its listeners (`gatewayCount`
 * gateway ones, one admin) report their addresses in the JSON log on stdout; killed with the test.
 */
export function startServe(
  t: { teardown(fn: () => unknown): void },
  args: string[],
  options: { env?: Record<string, string | undefined>; cwd?: string; gatewayCount?: number; timeoutMs?: number } = {},
): Promise<ServeProcess> {
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries({ ...process.env, ...options.env })) {
    if (v !== undefined && !k.startsWith('TAP')) env[k] = v
  }
  const child = spawn(process.execPath, [KEYGATE_BIN, 'serve', ...args], { env, cwd: options.cwd ?? process.cwd(), stdio: ['ignore', 'pipe', 'pipe'] })
  let stdout = ''
  let stderr = ''
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  t.teardown(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL')
    capturedStderr.push(stderr)
  })
  return new Promise((resolve, reject) => {
    let gateway: string | undefined
    let gatewaysUp = 0
    let admin: string | undefined
    let lines = 0
    const timer = setTimeout(() => reject(new Error(`keygate serve did not start:\n${stdout}\n${stderr}`)), options.timeoutMs ?? 60_000)
    const check = () => {
      const all = stdout.split('\n')
      for (; lines < all.length - 1; lines++) {
        let entry: { msg?: string; address?: string }
        try {
          entry = JSON.parse(all[lines] as string)
        } catch {
          continue
        }
        if (entry.msg === 'gateway listening' && entry.address) {
          gateway = entry.address
          gatewaysUp++
        }
        if (entry.msg === 'admin listening' && entry.address) admin = entry.address
      }
      if (admin && gateway && gatewaysUp >= (options.gatewayCount ?? 1)) {
        clearTimeout(timer)
        resolve({
          gatewayUrl: `http://${gateway}`,
          adminUrl: `http://${admin}`,
          stdout: () => stdout,
          stderr: () => stderr,
          stop: () => {
            child.kill('SIGTERM')
            return exited
          },
        })
      }
    }
    child.stdout.setEncoding('utf8').on('data', (d: string) => {
      stdout += d
      check()
    })
    child.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.on('exit', (code) => {
      clearTimeout(timer)
      reject(new Error(`keygate serve exited with ${code} before it was ready:\n${stdout}\n${stderr}`))
    })
  })
}
