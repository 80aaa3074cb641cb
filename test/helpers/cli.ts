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

/**
 * The environment of a process a test starts: the test's own, without what tap set for its test
 * processes, and with `extra` (undefined removes). Tap's NODE_OPTIONS loads its process-info
 * hooks into every Node process below it, which made each keygate command start 0.15 s slower
 * (and n8n far more) for nothing: coverage is off.
 */
export function childEnv(extra: Record<string, string | undefined> = {}): Record<string, string> {
  const env: Record<string, string> = {}
  for (const [k, v] of Object.entries({ ...process.env, ...extra })) {
    if (v !== undefined && !k.startsWith('TAP') && !k.startsWith('_TAPJS_')) env[k] = v
  }
  if (env.NODE_OPTIONS !== undefined) {
    const rest = env.NODE_OPTIONS.split(/\s+/).filter((o) => o !== '' && !o.includes('@tapjs/'))
    if (rest.length > 0) env.NODE_OPTIONS = rest.join(' ')
    else delete env.NODE_OPTIONS
  }
  return env
}

export function runCli(args: string[], options: { env?: Record<string, string | undefined>; input?: string; cwd?: string } = {}): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    const env = childEnv(options.env)
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
