// A real n8n 1.123.0 for the end-to-end suite, from .ci/n8n.sh: installed into the cache folder
// when missing (minutes, once per machine), started on a free loopback port from a copy of the
// migrated template user folder, its owner set up with a fresh password, stopped at teardown,
// or when the test process ends however it ends (`.ci/n8n.sh tied`).
// n8n being absent is never a reason to skip: the install runs, or the suite fails saying why.
import { execFile, type ChildProcess } from 'node:child_process'
import { cpSync, mkdtempSync, rmSync, readFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import { join } from 'node:path'
import { randomBytes } from 'node:crypto'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import type { Test } from 'tap'
import { childEnv, spawnClean } from './cli.ts'
import { freePort } from './integrations.ts'

const SCRIPT = fileURLToPath(new URL('../../.ci/n8n.sh', import.meta.url))

export interface RunningN8n {
  url: string
  /** n8n's user folder (N8N_USER_FOLDER), removed at teardown. */
  folder: string
  email: string
  password: string
  /** Stops the process (the suite's "n8n stopped" cases); teardown does it otherwise. */
  stop(): Promise<void>
  log(): string
}

/**
 * /healthz answers before the REST routes are mounted; /rest/settings answers once they are, with
 * JSON. While it starts, n8n answers every path 200 with the text "n8n is starting up. Please
 * wait": taken for its settings, the owner's setup was taken as done and the login that followed
 * got the same text and no session cookie (a loaded run).
 */
async function answers(url: string): Promise<boolean> {
  try {
    const res = await fetch(`${url}/rest/settings`, { signal: AbortSignal.timeout(2000) })
    await res.arrayBuffer()
    return res.status === 200 && isJson(res)
  } catch {
    return false
  }
}

function isJson(res: Response): boolean {
  return (res.headers.get('content-type') ?? '').startsWith('application/json')
}

function exited(child: ChildProcess): Promise<void> {
  return child.exitCode !== null || child.signalCode !== null ? Promise.resolve() : new Promise((r) => child.once('exit', () => r()))
}

export async function startN8n(t: Test, options: { startTimeoutMs?: number } = {}): Promise<RunningN8n> {
  // The template is made (and n8n installed) on first use; both are reused afterwards.
  const { stdout } = await promisify(execFile)('bash', [SCRIPT, 'template'], { env: childEnv(), maxBuffer: 16 * 1024 * 1024, timeout: 280_000 }).catch((err: Error & { stderr?: string }) => {
    throw new Error(`.ci/n8n.sh could not install or prepare n8n 1.123.0: ${err.stderr ?? err.message}`)
  })
  const template = stdout.trim().split('\n').at(-1) as string
  const folder = mkdtempSync(join(tmpdir(), 'keygate-n8n-'))
  cpSync(template, folder, { recursive: true })
  rmSync(join(folder, '.migrated'), { force: true })
  const port = await freePort()
  const url = `http://127.0.0.1:${port}`
  const logFile = join(folder, 'n8n.log')
  // Its standard input is a pipe this process holds the other end of and never writes to: n8n is
  // stopped once it ends, which the kernel does however this process ends. Before (found by a
  // review), n8n was stopped by the teardown or an exit handler only, and tap's kill of a test
  // file at its timeout (SIGALRM, then SIGKILL) ran neither: n8n was left running, its parent PID 1.
  // The user folder (76 MB) is removed then too, when this process is gone; else by the teardown.
  const run = `bash "$0" tied "$1" "$2" >"$3" 2>&1; status=$?; kill -0 "$PPID" 2>/dev/null || rm -rf "$2"; exit "$status"`
  const child = spawnClean('bash', ['-c', run, SCRIPT, String(port), folder, logFile], { env: childEnv(), stdio: ['pipe', 'ignore', 'ignore'] })
  child.stdin?.on('error', () => {})
  const log = () => {
    try {
      return readFileSync(logFile, 'utf8')
    } catch {
      return ''
    }
  }
  // The end of its input: SIGTERM, SIGKILL 10 s later, and it ends once n8n has.
  const stop = async () => {
    child.stdin?.end()
    await exited(child)
  }
  t.teardown(async () => {
    await stop()
    rmSync(folder, { recursive: true, force: true })
  })
  try {
    return { url, folder, ...(await ready(url, child, log, options.startTimeoutMs ?? 120_000)), stop, log }
  } catch (err) {
    await stop()
    throw err
  }
}

/** Waits until n8n answers, then sets up its owner with a fresh password. */
async function ready(url: string, child: ChildProcess, log: () => string, timeoutMs: number): Promise<{ email: string; password: string }> {
  const deadline = Date.now() + timeoutMs
  while (!(await answers(url))) {
    if (child.exitCode !== null) throw new Error(`n8n exited during start-up (code ${child.exitCode}):\n${log().slice(-3000)}`)
    if (Date.now() > deadline) throw new Error(`n8n did not answer ${url}/rest/settings in time:\n${log().slice(-3000)}`)
    await new Promise((r) => setTimeout(r, 250))
  }
  const email = 'owner@keygate.test'
  const password = `Kg${randomBytes(12).toString('base64url')}9z`
  const setUp = () =>
    fetch(`${url}/rest/owner/setup`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ email, firstName: 'Keygate', lastName: 'Test', password }),
    })
  // n8n answers /rest/settings a moment before it has registered every route: a 404 here
  // (Express's "Cannot POST") means not yet, so ask again until the deadline.
  let setup = await setUp()
  while ((setup.status === 404 || (setup.status === 200 && !isJson(setup))) && Date.now() < deadline) {
    await setup.text()
    await new Promise((r) => setTimeout(r, 250))
    setup = await setUp()
  }
  if (setup.status !== 200 || !isJson(setup)) throw new Error(`n8n owner setup answered ${setup.status}: ${(await setup.text()).slice(0, 300)}`)
  return { email, password }
}

/** The n8n internal REST API as the owner (for the drift cases: changes behind keygate's back). */
export async function ownerSession(n8n: RunningN8n): Promise<(method: string, path: string, body?: unknown) => Promise<{ status: number; body: any }>> {
  const login = await fetch(`${n8n.url}/rest/login`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ emailOrLdapLoginId: n8n.email, password: n8n.password }),
  })
  const cookie = (login.headers.getSetCookie().find((c) => c.startsWith('n8n-auth=')) ?? '').split(';')[0] as string
  if (login.status !== 200 || !cookie) throw new Error(`owner login answered ${login.status}`)
  return async (method, path, body) => {
    const res = await fetch(`${n8n.url}${path}`, {
      method,
      headers: { cookie, ...(body !== undefined ? { 'content-type': 'application/json' } : {}) },
      ...(body !== undefined ? { body: JSON.stringify(body) } : {}),
    })
    const text = await res.text()
    return { status: res.status, body: text ? JSON.parse(text) : null }
  }
}
