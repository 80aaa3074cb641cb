// The keygate command line: dispatch, configuration, and the one place failures become exit
// codes (0 done, 1 refused, 2 usage) with the reason on stderr.
import { userInfo } from 'node:os'
import { defaultConfigFile, FLAG_NAMES, hideConfigSecrets, loadConfig, renderConfigDocs } from '../config/load.ts'
import type { Config } from '../config/schema.ts'
import { isKeygateError, KeygateError } from '../core/errors.ts'
import { createLogger, type Level, type Logger } from '../core/log.ts'
import { VERSION } from '../core/package.ts'
import { shownInput } from '../core/validate.ts'
import type { Runtime } from '../core/runtime.ts'
import type { ServiceName } from '../core/integrations/http.ts'
import { denyListWarnings, type DenyListService } from '../core/deny-list.ts'
import { API_KEY_COMMANDS } from './api-key.ts'
import { GITEA_COMMANDS, GITEA_FLAGS, N8N_COMMANDS, N8N_FLAGS, type IntegrationContext } from './integrations.ts'
import { DENY_LIST_COMMANDS, LOCKOUT_COMMANDS, LOCKOUTS_NEED_ADMIN, localDenyOperations, remoteDenyOperations, remoteLockoutOperations } from './deny-list.ts'
import { localOperations } from './key-operations.ts'
import { remoteOperations } from './remote-operations.ts'
import { remoteGitea, remoteN8n } from './remote-integrations.ts'
import { EXIT_OK, UsageError, fail, fileArgument, parse, printDone, printJson, processIo, refuseEmptyTarget, refuseFlags, refusePastExpiry, type Command, type Io, type Parsed } from './io.ts'
import { exposureWarning, Router, shortcutWarning } from '../gateway/route.ts'

const HELP = `keygate ${VERSION}: API-key authentication sidecar

usage: keygate <command> [options]

commands:
  serve                       start the gateway and admin listeners
  migrate                     apply pending database migrations
  config check [FILE]         validate a configuration file without starting anything
  config docs                 print the configuration reference (Markdown)
  api-key <command>           manage keys: ${Object.keys(API_KEY_COMMANDS).join(', ')}
  gitea <command>             Gitea personal access tokens: ${Object.keys(GITEA_COMMANDS).join(', ')}
  n8n <command>               n8n API keys: ${Object.keys(N8N_COMMANDS).join(', ')}
  deny-list <command>         the stored IP deny list: ${Object.keys(DENY_LIST_COMMANDS).join(', ')}
  lockouts <command>          addresses locked out after failed keys (admin API only): ${Object.keys(LOCKOUT_COMMANDS).join(', ')}
  --version [--json]          print keygate's version

options (a command refuses, with exit 2, one it has no use for):
  --config FILE               configuration file (else KEYGATE_CONFIG, else ./keygate.yaml)
  --data-dir DIR              embedded store folder (KEYGATE_DATA_DIR, default ./.keygate); not config
  --database-url URL          PostgreSQL instead of the embedded store (DATABASE_URL); not config
  --admin-url URL             api-key, gitea, n8n, deny-list and lockouts commands go through this server's
                              admin API (KEYGATE_ADMIN_URL; needs KEYGATE_ADMIN_TOKEN)
  --json                      machine-readable output; not serve (its output is its log) nor config docs
  -h, --help                  help for a command

exit codes: 0 done, 1 refused (e.g. an invalid key), 2 usage error; the reason is on stderr.
`

function groupHelp<C>(group: string, commands: Record<string, Command<C>>): string {
  return `usage: keygate ${group} <command> [options]\n\n${Object.entries(commands)
    .map(([name, c]) => `  ${name.padEnd(10)} ${c.summary}\n             ${c.usage}`)
    .join('\n')}\n`
}

/** The configuration from the file, the environment and every config flag the command declared. */
export function configFrom(p: Parsed, io: Io, options: { onlyFile?: boolean; viaAdminUrl?: boolean } = {}): Config {
  const flags: Record<string, string | undefined> = {}
  for (const name of FLAG_NAMES) if (typeof p.values[name] === 'string') flags[name] = p.values[name] as string
  const config = loadConfig({ file: p.values.config as string | undefined, env: io.env, onlyFile: options.onlyFile === true, viaAdminUrl: options.viaAdminUrl === true, flags })
  hideConfigSecrets(config)
  return config
}

/** Commands other than serve log to stderr, at warn unless LOG_LEVEL says otherwise. */
export function cliLogger(io: Io, config: Config) {
  const level = (io.env.LOG_LEVEL ? config.log.level : 'warn') as Level
  return createLogger({ level, write: (line) => io.err(line), fields: { component: 'cli' } })
}

/**
 * A `gitea` or `n8n` command: its service on the store opened here, or the server's through the
 * admin API. Through the admin API the server calls Gitea or n8n with its own settings: the flags
 * that would set them here are refused, not ignored.
 */
function runIntegrationGroup<S>(
  group: ServiceName,
  commands: Record<string, Command<IntegrationContext<S>>>,
  argv: string[],
  io: Io,
  o: { local: (deps: ReturnType<typeof integrationDeps>) => Promise<S & { close(): Promise<void> }>; remote: (adminUrl: string, token: string) => S; flags: Record<string, unknown>; service: string },
): Promise<number> {
  const actor = { actor: actorName() }
  // The settings a command calls the service with (every command's but verify's include the
  // login) are checked before a new store would be made (Action's beforeMaking). On a store that
  // is there the store comes first, as before: one a server holds is told with the advice to go
  // through its admin API, which calls the service with the server's own settings.
  const checked = Object.fromEntries(
    Object.entries(commands).map(([name, c]): [string, Command<IntegrationContext<S>>] => [
      name,
      {
        ...c,
        prepare: (p) => {
          const action = c.prepare(p)
          action.beforeMaking ??= async (_io, config) => {
            const { assertConfigured } = await import('../core/integrations/track.ts')
            assertConfigured(group, config, name !== 'verify', true)
          }
          return action
        },
      },
    ]),
  )
  return runGroup(
    group,
    checked,
    argv,
    io,
    async (runtime, log, json) => {
      const service = await o.local(integrationDeps(runtime, log))
      return { ctx: { io, json, service, actor }, close: () => service.close() }
    },
    (adminUrl, token, json, p) => {
      refuseFlags(p, Object.keys(o.flags), `through the admin API (KEYGATE_ADMIN_URL or --admin-url) the server calls ${o.service} with its own settings; these flags apply only when the command opens the store itself`)
      return { io, json, service: o.remote(adminUrl, token), actor }
    },
  )
}

/** `cli:<user>`; for a uid no user is named by (a container's runAsUser), `cli:<uid>`, as ls and ps show it. */
export function actorName(): string {
  try {
    return `cli:${userInfo().username}`
  } catch {
    const uid = process.getuid?.()
    return uid === undefined ? 'cli' : `cli:${uid}`
  }
}

const STORE_FLAGS = ['data-dir', 'database-url'] as const

/**
 * Why `config check` and `config docs` refuse the flags every other command takes for its store
 * and admin API: they open neither (before, the flags were taken and ignored).
 */
const NOT_FOR_CONFIG = 'the config commands do not use them: they open no store and call no admin API, and `config check` checks the file alone (the environment and the flags are checked when a command starts)'

/** Why a command that only reads refuses a data folder without a store, and what makes one. */
const NO_STORE_HINT =
  'this command only reads, and makes no store; check the data folder (--data-dir, KEYGATE_DATA_DIR or store.data_dir; by default ./.keygate in the working folder), or make the store there with `keygate migrate`, `keygate serve` or a command that changes something (api-key create or import)'
const NO_STORE_TO_CHANGE_HINT =
  'this command changes what a store holds already (a new store would hold nothing to change), and makes no store; check the data folder (--data-dir, KEYGATE_DATA_DIR or store.data_dir; by default ./.keygate in the working folder)'

/**
 * Runs one subcommand of a group: help, usage checks (before anything is opened), then the
 * action with the context `open` builds from the store runtime; both are closed after. When
 * KEYGATE_ADMIN_URL (or --admin-url) is set, the context `remote` builds is used instead: the
 * command goes through that server's admin API and opens nothing here.
 */
export async function runGroup<C>(
  group: string,
  commands: Record<string, Command<C>>,
  argv: string[],
  io: Io,
  /** The context on the store opened here; or, for a group that works only through an admin API, why (refused without an admin URL). */
  open: ((runtime: Runtime, log: Logger, json: boolean) => Promise<{ ctx: C; close?: () => Promise<void>; denyList?: DenyListService }>) | string,
  remote: (adminUrl: string, token: string, json: boolean, p: Parsed) => C,
): Promise<number> {
  const [name, ...rest] = argv
  if (name === undefined) throw new UsageError(groupHelp(group, commands).trimEnd())
  if (name === '--help' || name === '-h' || name === 'help') {
    io.out(groupHelp(group, commands))
    return EXIT_OK
  }
  const sub = Object.hasOwn(commands, name) ? commands[name] : undefined
  if (!sub) throw new UsageError(`unknown ${group} command ${JSON.stringify(shownInput(name))}\n${groupHelp(group, commands)}`)
  const p = parse(rest, sub.options, sub.positionals, sub.usage)
  if (p.values.help) {
    io.out(`${sub.summary}\nusage: ${sub.usage}\n`)
    return EXIT_OK
  }
  refuseEmptyTarget(p, sub)
  const action = sub.prepare(p)
  // With an admin URL, a store flag is refused below as one the admin API makes no use of.
  const config = configFrom(p, io, { viaAdminUrl: true })
  if (config.admin.url) {
    // A running server owns the store: go through its admin API instead of opening it. A store
    // named on the command line contradicts that: before, the flag was ignored and the change
    // made on the server's store (found by a review).
    refuseFlags(p, STORE_FLAGS, `the command goes through the admin API at ${config.admin.url} (KEYGATE_ADMIN_URL or --admin-url), which opens no store here; unset the admin URL to work on that store, or leave the flag out`)
    if (!config.admin.token) throw new KeygateError('config_invalid', `${adminUrlFrom(p, io)} names an admin API, but no admin credential is set: set KEYGATE_ADMIN_TOKEN to an admin key or the bootstrap token of that server`)
    // As on the store: before (found by a review), the admin API's words, `expires_at: ... is in
    // the past (admin API at ...)`, where the store's path names the flag.
    refusePastExpiry(p)
    return action(remote(config.admin.url, config.admin.token, p.values.json === true, p))
  }
  if (typeof open === 'string') throw new KeygateError('config_invalid', open)
  refusePastExpiry(p)
  const answered = await action.beforeStore?.(io, config)
  if (answered !== undefined) return answered
  const log = cliLogger(io, config)
  const { runLocal, newEmbeddedStoreAt } = await import('./local.ts')
  const existingOnly = sub.readOnly ? NO_STORE_HINT : sub.changesStored === true || action.changesStored === true ? NO_STORE_TO_CHANGE_HINT : undefined
  // The folder of the embedded store the command will make, when it makes one.
  const fresh = existingOnly === undefined && !config.store.database_url ? newEmbeddedStoreAt(config.store.data_dir) : undefined
  if (fresh !== undefined) await action.beforeMaking?.(io, config)
  return runLocal(config, log, { existingOnly, readOnly: sub.readOnly === true, fresh }, (runtime) => open(runtime, log, p.values.json === true), action)
}

/**
 * Where the admin URL came from, the flag before the environment before the file, as they
 * override each other (before, found by a review, a missing credential was always told as
 * "KEYGATE_ADMIN_URL is set", for --admin-url and the file's admin.url too).
 */
function adminUrlFrom(p: Parsed, io: Io): string {
  if (typeof p.values['admin-url'] === 'string') return '--admin-url'
  if (io.env.KEYGATE_ADMIN_URL?.trim()) return 'KEYGATE_ADMIN_URL'
  return `admin.url in ${(p.values.config as string | undefined) ?? defaultConfigFile(io.env) ?? 'the configuration file'}`
}

function integrationDeps(runtime: Runtime, log: Logger) {
  return { db: runtime.db, audit: runtime.audit, log, config: runtime.config, flags: true }
}

async function runConfig(argv: string[], io: Io): Promise<number> {
  const [name, ...rest] = argv
  if (name === 'docs') {
    const usage = 'keygate config docs'
    const p = parse(rest, {}, { min: 0, max: 0 }, usage)
    if (p.values.help) {
      io.out(`usage: ${usage}\nprints the configuration reference (docs/configuration.md) as Markdown\n`)
      return EXIT_OK
    }
    refuseFlags(p, [...STORE_FLAGS, 'admin-url'], NOT_FOR_CONFIG)
    // The reference of every setting, read from no file; Markdown only (before, found by a review:
    // both flags were taken, and ignored).
    refuseFlags(p, ['config', 'json'], 'config docs prints the reference of every setting as Markdown, from no file')
    io.out(renderConfigDocs())
    return EXIT_OK
  }
  const groupUsage = 'usage: keygate config check [FILE] [--json] | keygate config docs'
  // Help, as on every other command (before: exit 2, with the usage on stderr).
  if (name === '--help' || name === '-h' || name === 'help') {
    io.out(`${groupUsage}\ncheck: checks a configuration file and lists every problem\ndocs: prints the configuration reference as Markdown\n`)
    return EXIT_OK
  }
  if (name !== 'check') throw new UsageError(groupUsage)
  const usage = 'keygate config check [FILE] [--json]'
  const p = parse(rest, {}, { min: 0, max: 1 }, usage)
  if (p.values.help) {
    io.out(`usage: ${usage}\nchecks FILE (else KEYGATE_CONFIG, else ./keygate.yaml) and lists every problem; exit 0 when valid, 1 when not\n`)
    return EXIT_OK
  }
  refuseFlags(p, [...STORE_FLAGS, 'admin-url'], NOT_FOR_CONFIG)
  // Before (found by a review): `--config A B` checked B alone, without a word.
  if (p.positionals[0] !== undefined && p.values.config !== undefined) throw new UsageError(`give the file once: as FILE or as --config, not both\nusage: ${usage}`)
  // The file every other command would read when none is named (KEYGATE_CONFIG, else ./keygate.yaml).
  const file = ((fileArgument(p, usage) ?? p.values.config) as string | undefined) ?? defaultConfigFile(io.env)
  if (file === undefined) throw new UsageError('give the file to check (keygate config check FILE), or set KEYGATE_CONFIG')
  const config = loadConfig({ file, env: io.env, onlyFile: true, bothListeners: true })
  // Valid, and still worth a word: a route's scopes another route's paths go around, a deny list
  // entry that denies every client.
  const shortcut = shortcutWarning(config)
  const warnings = [...new Router(config.routes).exposures().map(exposureWarning), ...(shortcut === undefined ? [] : [shortcut]), ...denyListWarnings(config.deny_list)]
  if (p.values.json) printJson(io, { valid: true, file, routes: config.routes.map((r) => r.name), warnings })
  else io.out(`${file}: valid (${config.routes.length} route${config.routes.length === 1 ? '' : 's'})\n${warnings.map((w) => `warning: ${w}\n`).join('')}`)
  return EXIT_OK
}

/**
 * What `migrate` refused with store_locked is told when `serve` (or an unknown process) holds the
 * store: it works on the store itself (before, found by a review: the CLI's advice, to use the
 * admin API, which migrate refuses).
 */
const MIGRATE_LOCKED_HINT = 'migrate works on the store itself, never through an admin API: serve applies pending migrations as it starts, so restart it, or stop it and run migrate'

/**
 * The same with store.auto_migrate off (as migrate's own configuration has it): a restarted serve
 * applies nothing and is refused, "run keygate migrate" (before, found by a review, it was told
 * to restart serve, on the embedded store too since auto_migrate holds there).
 */
const MIGRATE_LOCKED_NO_AUTO_HINT = 'migrate works on the store itself, never through an admin API: with store.auto_migrate off, serve applies no migration as it starts, so stop it, run migrate, and start it again'

async function runMigrate(argv: string[], io: Io): Promise<number> {
  const p = parse(argv, {}, { min: 0, max: 0 }, 'keygate migrate [--json]')
  if (p.values.help) {
    io.out(
      'usage: keygate migrate [--json]\n' +
        'applies pending migrations; safe to run from several instances at once\n' +
        'a database with migrations newer than this keygate (a newer one migrated it: a rolling upgrade, or a\n' +
        'rollback of the binary) is reported on stderr (--json: "newer") and exits 0: each migration leaves\n' +
        'the release before it working; nothing is undone\n',
    )
    return EXIT_OK
  }
  // The store is the one migrated (before, --admin-url was taken and ignored).
  refuseFlags(p, ['admin-url'], 'migrate does not use it: it works on the store itself (--data-dir, --database-url), never through an admin API; run it where it can reach the store')
  const config = configFrom(p, io)
  const [{ openDb }, { applyMigrations }] = await Promise.all([import('../core/db.ts'), import('../core/migrate.ts')])
  const db = await openDb({ databaseUrl: config.store.database_url, dataDir: config.store.data_dir, poolMax: 2, shortLived: true, lockedHint: config.store.auto_migrate ? MIGRATE_LOCKED_HINT : MIGRATE_LOCKED_NO_AUTO_HINT })
  try {
    const { applied, newer } = await applyMigrations(db)
    // Exit 0 either way: the README's migration rule is that each migration leaves the release
    // before it running, as `serve` and the other commands do on such a database (with a warning).
    if (newer.length > 0) {
      io.err(
        `keygate: warning: the database has migrations newer than this keygate: ${newer.join(', ')}; ` +
          'this keygate is older than the schema (a rolling upgrade, or a rollback of the binary). It runs on it, ' +
          'since each migration leaves the release before it working, but it does not undo them: ' +
          'roll back no further than the release before the one that applied them\n',
      )
    }
    printDone(() => {
      if (p.values.json) printJson(io, { applied, newer, store: db.kind })
      else if (applied.length > 0) io.out(`applied ${applied.join(', ')}\n`)
      else if (newer.length > 0) io.out('nothing to apply: the database is newer than this keygate\n')
      else io.out('nothing to apply: the database is up to date\n')
    }, applied.length > 0 ? `applied ${applied.join(', ')}` : 'nothing was applied')
    return EXIT_OK
  } finally {
    await db.close()
  }
}

export async function main(argv: string[], given: Io = processIo): Promise<number> {
  // A `--json` after `--` is an argument, not the flag (before, found by a review: it switched the
  // error to JSON on stdout).
  const end = argv.indexOf('--')
  const json = (end === -1 ? argv : argv.slice(0, end)).includes('--json')
  // Whether stdout has had the command's answer, or a part of it: an error after it (a warning
  // that cannot be written, the store failing to close) is not added there as a second document,
  // which no JSON reader takes (before, found by a review: a created key and then the error).
  let answered = false
  const io: Io = {
    ...given,
    out: (text) => {
      answered = true
      given.out(text)
    },
  }
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
      case 'version': {
        // `--json` for scripts; anything else is refused (before, found by a review: ignored).
        const p = parse(rest, {}, { min: 0, max: 0 }, 'keygate --version [--json]')
        refuseFlags(p, [...STORE_FLAGS, 'admin-url', 'config'], 'the version needs nothing else')
        if (p.values.json) printJson(io, { version: VERSION })
        else io.out(`${VERSION}\n`)
        return EXIT_OK
      }
      case 'api-key':
        return await runGroup(
          'api-key',
          API_KEY_COMMANDS,
          rest,
          io,
          async (runtime, _log, json) => ({ ctx: { io, json, ops: localOperations(runtime, { actor: actorName() }) } }),
          (adminUrl, token, json) => ({ io, json, ops: remoteOperations(adminUrl, token) }),
        )
      case 'gitea':
        return await runIntegrationGroup('gitea', GITEA_COMMANDS, rest, io, { local: async (deps) => new (await import('../core/integrations/gitea.ts')).GiteaTokenService(deps), remote: remoteGitea, flags: GITEA_FLAGS, service: 'Gitea' })
      case 'n8n':
        return await runIntegrationGroup('n8n', N8N_COMMANDS, rest, io, { local: async (deps) => new (await import('../core/integrations/n8n.ts')).N8nKeyService(deps), remote: remoteN8n, flags: N8N_FLAGS, service: 'n8n' })
      case 'deny-list':
        return await runGroup(
          'deny-list',
          DENY_LIST_COMMANDS,
          rest,
          io,
          async (runtime, _log, json) => {
            const { ops, denyList } = localDenyOperations(runtime, { actor: actorName() })
            return { ctx: { io, json, ops }, denyList }
          },
          (adminUrl, token, json) => ({ io, json, ops: remoteDenyOperations(adminUrl, token) }),
        )
      case 'lockouts':
        return await runGroup(
          'lockouts',
          LOCKOUT_COMMANDS,
          rest,
          io,
          LOCKOUTS_NEED_ADMIN,
          (adminUrl, token, json) => ({ io, json, ops: remoteLockoutOperations(adminUrl, token) }),
        )
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
    if (isKeygateError(err)) return fail(io, json && !answered, err.code, err.message, err.details)
    return fail(io, json && !answered, 'internal_error', `unexpected error: ${(err as Error).message}`)
  }
}


