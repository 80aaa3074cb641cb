#!/usr/bin/env node
// The keygate command, as bin/keygate.js starts it (which keeps V8's compiled code on disk).
import { spawn } from 'node:child_process'
import cluster from 'node:cluster'
import { armEarlyStop } from '../core/early-stop.ts'
import { SHORT_COMMAND_V8_FLAGS } from './v8-flags.ts'

// A diagnostic report an operator turns on (NODE_OPTIONS=--report-on-signal, --report-on-fatalerror)
// leaves out the environment, where keygate's secrets are (KEYGATE_ENCRYPTION_KEY, the admin
// token, DATABASE_URL's password): Node lists every variable in it by default (found by a review).
process.report.excludeEnv = true

const command = process.argv[2]
const [LIFTOFF] = SHORT_COMMAND_V8_FLAGS
const STORE_COMMANDS = new Set(['api-key', 'deny-list', 'gitea', 'n8n', 'migrate'])

// A debugger attached to this process would find no command in it: such a run stays in one process.
const debugging = process.execArgv.some((a) => a.startsWith('--inspect'))
// Set in the child: it ends when the command that started it is gone, whatever ended that.
const REEXEC = 'KEYGATE_REEXEC_CHILD'

// A command given an admin API (KEYGATE_ADMIN_URL or --admin-url) opens no store here (migrate
// refuses --admin-url and ignores the variable): the second process would only add its start.
// An admin.url from the configuration file is not read here: such a command still starts the
// second process, which costs its start and nothing else.
const remote = command !== 'migrate' && (!!process.env.KEYGATE_ADMIN_URL || process.argv.slice(3).some((a) => a === '--admin-url' || a.startsWith('--admin-url=')))

if (STORE_COMMANDS.has(command as string) && !remote && !process.execArgv.includes(LIFTOFF) && !debugging && process.env.KEYGATE_WASM_TIERING !== 'full') {
  // A command that may open the embedded store is short, and for such a run V8's optimising
  // compiler costs more than it saves: PGlite's WebAssembly starts with V8's baseline compiler
  // (Liftoff), and the hot parts of its start-up are compiled again by TurboFan on the side,
  // nearly as much CPU as all the rest of `keygate api-key list` (5.2 s of CPU in all, 2.9 s
  // this way, second process included, here). V8 takes the flag only as it starts, so the
  // command runs again, in a child process with it, sharing this one's standard streams.
  // `serve`, which runs for days, keeps TurboFan; so does KEYGATE_WASM_TIERING=full.
  // --single-threaded too: for a short command V8's background threads (concurrent compilation
  // and marking, parallel scavenges) cost more CPU than they save (without them `api-key list`
  // took about 6 % less CPU, a 10,000-key import 17 % less and finished 10 % sooner; 2026-12-05).
  // An IPC channel beside the standard streams: it closes when this process ends, even by
  // SIGKILL, which nothing here can pass on.
  const child = spawn(process.execPath, [...SHORT_COMMAND_V8_FLAGS, ...process.execArgv, ...process.argv.slice(1)], {
    stdio: ['inherit', 'inherit', 'inherit', 'ipc'],
    env: { ...process.env, [REEXEC]: '1' },
  })
  // A signal sent to this process alone (by a supervisor, or `timeout`) reaches the command too.
  const pass = (signal: NodeJS.Signals) => () => child.kill(signal)
  for (const signal of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) process.on(signal, pass(signal))
  child.on('error', (err) => {
    process.stderr.write(`keygate: could not start ${process.execPath}: ${err.message}\n`)
    process.exitCode = 1
  })
  child.on('exit', (code, signal) => {
    if (signal === null) {
      process.exitCode = code ?? 1
      return
    }
    // Ended by a signal: end the same way, so that the caller sees what the command saw.
    process.removeAllListeners(signal)
    process.kill(process.pid, signal)
  })
} else {
  if (process.env[REEXEC] === '1' && process.channel !== undefined) {
    delete process.env[REEXEC]
    process.channel.unref()
    process.on('disconnect', () => process.kill(process.pid, 'SIGTERM'))
  }
  // `serve` never ends on SIGHUP (the systemd unit's reload sends it). Its own handler comes once
  // its modules have loaded; until then this one keeps Node's default, which ends the process.
  if (command === 'serve') {
    process.on('SIGHUP', () => {})
    // A SIGTERM or SIGINT before serve's own handler is kept for it (core/early-stop.ts).
    armEarlyStop()
  }
  const { main } = await import('../cli/main.ts')
  process.exitCode = await main(process.argv.slice(2))
  // A `serve --workers` worker, stopped or unable to start (its store out of reach, say): its
  // IPC channel to the primary would keep it alive, not listening, for ever, and never replaced.
  // Disconnected, it ends, and the primary starts another unless it is stopping.
  if (cluster.isWorker && process.connected) {
    // Node's cluster ends a worker whose channel goes with process.exit(0): the code is set again
    // as it exits, so the primary's 'worker died' says it failed (before, found by a review, code 0;
    // and 0 again, found by a later one, for a worker that failed after its store opened, which
    // serve disconnected itself before its code was known).
    const code = process.exitCode
    process.once('exit', () => {
      process.exitCode = code
    })
    process.disconnect()
  }
}
