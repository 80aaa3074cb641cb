// Runs the real `keygate` command as a child process.
import { spawn, type ChildProcess, type SpawnOptions } from 'node:child_process'
import { readdirSync, readFileSync } from 'node:fs'
import { join } from 'node:path'
import { fileURLToPath } from 'node:url'
import { SHORT_COMMAND_V8_FLAGS } from '../../bin/v8-flags.ts'

export const KEYGATE_BIN = fileURLToPath(new URL('../../bin/keygate.js', import.meta.url))

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
 * processes, and with `extra` (undefined removes). Start such a process with `spawnClean`, or tap
 * puts its own back.
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

/**
 * Spawns `command` with `options.env` as it is. Tap's process-info hook (process-on-spawn, loaded
 * into every test process) rewrites the environment of every spawn, whatever env is given: its
 * loader goes back into NODE_OPTIONS and its _TAPJS_PROCESSINFO_* variables back in. keygate and
 * n8n then ran with tap's module hooks on every file they loaded, and with its signal-exit
 * handlers, which catch SIGHUP among others: a keygate that would have died of a signal lived
 * under test. `env` runs after the hook and removes them again before it executes the command
 * (in its place: same pid, signals reach the command).
 */
export function spawnClean(command: string, args: readonly string[], options: SpawnOptions & { env: Record<string, string> }): ChildProcess {
  const hooked = ['NODE_OPTIONS', ...Object.keys(process.env).filter((k) => k.startsWith('_TAPJS_'))]
  const own = options.env.NODE_OPTIONS === undefined ? [] : [`NODE_OPTIONS=${options.env.NODE_OPTIONS}`]
  return spawn('env', [...hooked.flatMap((k) => ['-u', k]), ...own, command, ...args], options)
}

export interface RunOptions {
  env?: Record<string, string | undefined>
  input?: string
  cwd?: string
  /** Another keygate command to run (an installed package's), run as installed. */
  bin?: string
  /**
   * Run as a user's shell runs it: `keygate` itself decides, and a command that may open the
   * embedded store starts its second process on V8's baseline compiler (bin/keygate.ts). By
   * default the tests start the command with that process's flags (bin/v8-flags.ts), which is that
   * second process, so it runs in one: the first only starts the second and waits, about 0.16 s
   * of CPU a command (43 s of the suite's, in 272 commands). The tests of the two processes
   * themselves (signals passed on, the child's command line) start `keygate` with spawnClean.
   */
  asInstalled?: boolean
}

/** Runs `keygate args`. */
export function runCli(args: string[], options: RunOptions = {}): Promise<CliResult> {
  const env = childEnv(options.env)
  const v8 = options.asInstalled === true || options.bin !== undefined ? [] : SHORT_COMMAND_V8_FLAGS
  const child = spawnClean(process.execPath, [...v8, options.bin ?? KEYGATE_BIN, ...args], { env, cwd: options.cwd ?? process.cwd(), stdio: ['pipe', 'pipe', 'pipe'] })
  child.stdin!.end(options.input ?? '')
  return outcome(child, args)
}

/** What `child`, a run of `keygate args` (or another command, for `args`), gave once it has ended. */
export function outcome(child: ChildProcess, args: string[]): Promise<CliResult> {
  return new Promise((resolve, reject) => {
    let stdout = ''
    let stderr = ''
    child.stdout!.setEncoding('utf8').on('data', (d: string) => (stdout += d))
    child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d))
    child.on('error', reject)
    child.on('close', (code) => resolve(cliResult(args, code, stdout, stderr)))
  })
}

function cliResult(args: string[], code: number | null, stdout: string, stderr: string): CliResult {
  capturedStderr.push(stderr)
  return {
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
  }
}

/**
 * Runs `keygate args` in this process, through the command line's own entry (cli/main.ts `main`)
 * with output captured, `env` as its environment and `input` as its stdin: for long tables of
 * usage errors, which end before anything is opened, and for commands whose store or answers are
 * what a test checks, where a process per command cost 0.5 to 1.5 s of CPU. Each such test also
 * runs a few of its commands through `runCli`, the real process, or another test runs the same
 * commands so.
 */
export async function runCliHere(args: string[], options: { env?: Record<string, string | undefined>; input?: string } = {}): Promise<CliResult> {
  const { main } = await import('../../cli/main.ts')
  const { forgetKnownSecrets } = await import('../../core/log.ts')
  let stdout = ''
  let stderr = ''
  const input = Buffer.from(options.input ?? '')
  // The secrets of the command's configuration are this run's: the next run here has its own.
  const code = await main(args, {
    out: (text) => void (stdout += text),
    err: (text) => void (stderr += text),
    // `input` read as cli/io.ts reads stdin: up to its first line break when asked, undefined past maxBytes.
    readStdin: async ({ maxBytes, firstLine = false }) => {
      const end = firstLine ? input.indexOf(0x0a) : -1
      const part = end === -1 ? input : input.subarray(0, end)
      return part.length > maxBytes ? undefined : part
    },
    env: childEnv(options.env),
  }).finally(forgetKnownSecrets)
  return cliResult(args, code, stdout, stderr)
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
