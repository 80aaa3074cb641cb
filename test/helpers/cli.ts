// Runs the real `keygate` command as a child process.
import { spawn } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
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

/** The bytes of every file below `dir` (an embedded store's data folder), for the no-plaintext checks. */
export function folderBytes(dir: string): Buffer {
  const files: string[] = []
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name))
      else files.push(join(d, e.name))
    }
  }
  walk(dir)
  return Buffer.concat(files.map((f) => readFileSync(f)))
}
