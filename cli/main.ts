// The keygate command line: dispatch, configuration, and the one place failures become exit
// codes (0 done, 1 refused, 2 usage) with the reason on stderr.
import { userInfo } from 'node:os'
import { readFileSync } from 'node:fs'
import { loadConfig, renderConfigDocs } from '../config/load.ts'
import type { Config } from '../config/schema.ts'
import { isKeygateError, KeygateError } from '../core/errors.ts'
import { createLogger, type Level } from '../core/log.ts'
import { openDb } from '../core/db.ts'
import { migrate } from '../core/migrate.ts'
import { EventBus } from '../core/events.ts'
import { openRuntime } from '../core/runtime.ts'
import { bindKeyEvents, WebhookService } from '../core/webhooks.ts'
import { API_KEY_COMMANDS } from './api-key.ts'
import { localOperations } from './key-operations.ts'
import { remoteOperations } from './remote-operations.ts'
import { EXIT_OK, UsageError, fail, parse, printJson, processIo, type Io, type Parsed } from './io.ts'

const VERSION = (JSON.parse(readFileSync(new URL('../package.json', import.meta.url), 'utf8')) as { version: string }).version

const HELP = `keygate ${VERSION}: API-key authentication sidecar

usage: keygate <command> [options]

commands:
  serve                       start the gateway and admin listeners
  migrate                     apply pending database migrations
  config check [FILE]         validate a configuration file without starting anything
  config docs                 print the configuration reference (Markdown)
  api-key <command>           manage keys: ${Object.keys(API_KEY_COMMANDS).join(', ')}

options every command takes:
  --config FILE               configuration file (else KEYGATE_CONFIG, else ./keygate.yaml)
  --data-dir DIR              embedded store folder (KEYGATE_DATA_DIR, default ./.keygate)
  --database-url URL          PostgreSQL instead of the embedded store (DATABASE_URL)
  --admin-url URL             api-key commands go through this server's admin API
                              (KEYGATE_ADMIN_URL; needs KEYGATE_ADMIN_TOKEN)
  --json                      machine-readable output
  -h, --help                  help for a command

exit codes: 0 done, 1 refused (e.g. an invalid key), 2 usage error; the reason is on stderr.
`

function apiKeyHelp(): string {
  return `usage: keygate api-key <command> [options]\n\n${Object.entries(API_KEY_COMMANDS)
    .map(([name, c]) => `  ${name.padEnd(10)} ${c.summary}\n             ${c.usage}`)
    .join('\n')}\n`
}

function configFrom(p: Parsed, io: Io, onlyFile = false): Config {
  return loadConfig({
    file: p.values.config as string | undefined,
    env: io.env,
    onlyFile,
    flags: {
      'data-dir': p.values['data-dir'] as string | undefined,
      'database-url': p.values['database-url'] as string | undefined,
      'admin-url': p.values['admin-url'] as string | undefined,
    },
  })
}

/** Commands other than serve log to stderr, at warn unless LOG_LEVEL says otherwise. */
function cliLogger(io: Io, config: Config) {
  const level = (io.env.LOG_LEVEL ? config.log.level : 'warn') as Level
  return createLogger({ level, write: (line) => io.err(line), fields: { component: 'cli' } })
}

function actorName(): string {
  try {
    return `cli:${userInfo().username}`
  } catch {
    return 'cli'
  }
}

async function runApiKey(argv: string[], io: Io): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined) throw new UsageError(apiKeyHelp().trimEnd())
  if (name === '--help' || name === '-h' || name === 'help') {
    io.out(apiKeyHelp())
    return EXIT_OK
  }
  const sub = API_KEY_COMMANDS[name]
  if (!sub) throw new UsageError(`unknown api-key command ${JSON.stringify(name)}\n${apiKeyHelp()}`)
  const p = parse(rest, sub.options, sub.positionals, sub.usage)
  if (p.values.help) {
    io.out(`${sub.summary}\nusage: ${sub.usage}\n`)
    return EXIT_OK
  }
  const action = sub.prepare(p)
  const config = configFrom(p, io)
  const json = p.values.json === true
  if (config.admin.url) {
    // A running server owns the store: go through its admin API instead of opening it.
    if (!config.admin.token) throw new KeygateError('config_invalid', 'KEYGATE_ADMIN_URL is set but KEYGATE_ADMIN_TOKEN is not: set it to an admin key or the bootstrap token of that server')
    return action({ io, json, ops: remoteOperations(config.admin.url, config.admin.token) })
  }
  const log = cliLogger(io, config)
  const runtime = await openRuntime(config, log)
  // Key events of changes made here are queued in the store; the running servers deliver them.
  const webhooks = new WebhookService({ db: runtime.db, config: config.webhooks, log, deliver: false })
  const events = new EventBus()
  const queued: Array<Promise<unknown>> = []
  const offQueue = events.on((e) => queued.push(webhooks.enqueue(e).catch((err: unknown) => log.warn('could not queue webhook deliveries', { event: e.type, err: err as Error }))))
  const offKeys = bindKeyEvents(runtime.keys, events)
  try {
    return await action({ io, json, ops: localOperations(runtime.keys, { actor: actorName() }) })
  } finally {
    offKeys()
    offQueue()
    await Promise.all(queued)
    await webhooks.close()
    await runtime.close()
  }
}

async function runConfig(argv: string[], io: Io): Promise<number> {
  const [name, ...rest] = argv
  if (name === 'docs') {
    parse(rest, {}, { min: 0, max: 0 }, 'keygate config docs')
    io.out(renderConfigDocs())
    return EXIT_OK
  }
  if (name !== 'check') throw new UsageError('usage: keygate config check [FILE] [--json] | keygate config docs')
  const p = parse(rest, {}, { min: 0, max: 1 }, 'keygate config check [FILE] [--json]')
  const file = (p.positionals[0] ?? p.values.config) as string | undefined
  if (file === undefined) throw new UsageError('give the file to check: keygate config check FILE')
  const config = loadConfig({ file, env: io.env, onlyFile: true })
  if (p.values.json) printJson(io, { valid: true, file, routes: config.routes.map((r) => r.name) })
  else io.out(`${file}: valid (${config.routes.length} route${config.routes.length === 1 ? '' : 's'})\n`)
  return EXIT_OK
}

async function runMigrate(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, {}, { min: 0, max: 0 }, 'keygate migrate [--json]')
  if (p.values.help) {
    io.out('usage: keygate migrate [--json]\napplies pending migrations; safe to run from several instances at once\n')
    return EXIT_OK
  }
  const config = configFrom(p, io)
  const db = await openDb({ databaseUrl: config.store.database_url, dataDir: config.store.data_dir, poolMax: 2 })
  try {
    const applied = await migrate(db)
    if (p.values.json) printJson(io, { applied, store: db.kind })
    else io.out(applied.length ? `applied ${applied.join(', ')}\n` : 'nothing to apply: the database is up to date\n')
    return EXIT_OK
  } finally {
    await db.close()
  }
}

export async function main(argv: string[], io: Io = processIo): Promise<number> {
  const json = argv.includes('--json')
  try {
    const [command, ...rest] = argv
    switch (command) {
      case undefined:
        io.err(HELP)
        return 2
      case 'help':
      case '--help':
      case '-h':
        io.out(HELP)
        return EXIT_OK
      case '--version':
      case 'version':
        io.out(`${VERSION}\n`)
        return EXIT_OK
      case 'api-key':
        return await runApiKey(rest, io)
      case 'config':
        return await runConfig(rest, io)
      case 'migrate':
        return await runMigrate(rest, io)
      case 'serve': {
        const { runServe } = await import('./serve.ts')
        return await runServe(rest, io)
      }
      default:
        throw new UsageError(`unknown command ${JSON.stringify(command)}; run keygate --help`)
    }
  } catch (err) {
    if (isKeygateError(err)) return fail(io, json, err.code, err.message, err.details)
    return fail(io, json, 'internal_error', `unexpected error: ${(err as Error).message}`)
  }
}


