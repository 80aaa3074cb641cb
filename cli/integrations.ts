// keygate gitea create|list|delete|verify and keygate n8n create|list|delete|verify: the token or
// key is printed once, on create; verify exits 0 when the service accepts it and 1 when not.
import type { ParseArgsOptionsConfig } from 'node:util'
import type { Actor } from '../core/audit.ts'
import type { TSchema } from '@sinclair/typebox'
import type { GiteaListItem, GiteaTokenCreated, GiteaTokenDeleted, GiteaTrackState, GiteaVerification } from '../core/integrations/gitea.ts'
import type { N8nKeyCreated, N8nKeyDeleted, N8nListItem, N8nVerification } from '../core/integrations/n8n.ts'
import type { TrackState } from '../core/integrations/track.ts'
import { CreateGiteaTokenBody, CreateN8nKeyBody, DeleteGiteaTokenQuery, n8nLabelProblem, unknownGiteaScopes } from '../core/integrations/schemas.ts'
import type { GiteaOperations, N8nOperations } from './remote-integrations.ts'
import { escapeUnprintable } from '../core/validate.ts'
import { EXIT_OK, EXIT_REFUSED, UsageError, argOrStdin, checkFlags, expiryFlags, parseList, printDone, printJson, printMade, printWarning, printable, refuseKeyInFlags, str, table, type Action, type Command, type Io, type Parsed } from './io.ts'

export interface IntegrationContext<S> {
  io: Io
  json: boolean
  service: S
  actor: Actor
}

export const GITEA_FLAGS = {
  'gitea-url': { type: 'string' },
  'gitea-username': { type: 'string' },
  'gitea-password': { type: 'string' },
} as const satisfies ParseArgsOptionsConfig

export const N8N_FLAGS = {
  'n8n-url': { type: 'string' },
  'n8n-email': { type: 'string' },
  'n8n-password': { type: 'string' },
} as const satisfies ParseArgsOptionsConfig

const STATE_WORDS: Record<GiteaTrackState, string> = { in_sync: 'in sync', deleted_remotely: 'deleted remotely', not_recorded: 'not recorded', unreadable: 'unreadable' }

/** The drift summary; Gitea's `unreadable` (another user's tokens Gitea would not list) only when there are some. */
function summaryLine(noun: string, summary: Record<TrackState, number> & { unreadable?: number }): string {
  const unreadable = summary.unreadable ?? 0
  const total = summary.in_sync + summary.deleted_remotely + summary.not_recorded + unreadable
  const unread = unreadable > 0 ? `, ${unreadable} unreadable (Gitea would not list that user's tokens; see the reason with --json)` : ''
  return `${total} ${noun}${total === 1 ? '' : 's'}: ${summary.in_sync} in sync, ${summary.deleted_remotely} deleted remotely (record kept), ${summary.not_recorded} not recorded by keygate${unread}\n`
}

function required(p: Parsed, flag: string, what: string): string {
  const v = str(p, flag)
  if (v === undefined || v === '') throw new UsageError(`--${flag} is required (${what})`)
  return v
}

function scopesFlag(p: Parsed, example: string): string[] {
  // `,` and `a,,b` are refused there, naming the flag; so at least one scope comes back.
  return parseList('scopes', required(p, 'scopes', `comma-separated, such as ${example}`)) ?? []
}

type Cells = Array<string | number | null | undefined>
type Verification = GiteaVerification | N8nVerification

/** The parts every command has, from a factory's options; `readOnly` for those that change nothing (list, verify). */
function command<C>(o: { summary: string; usage: string; options: ParseArgsOptionsConfig; target?: string }, positionals: Command<C>['positionals'], prepare: Command<C>['prepare'], readOnly = false): Command<C> {
  return { summary: o.summary, usage: o.usage, options: o.options, positionals, prepare, readOnly, ...(o.target !== undefined ? { target: o.target } : {}) }
}

/** `create`: the credential is printed once, after what was made. */
function createCommand<R>(o: {
  summary: string
  usage: string
  options: ParseArgsOptionsConfig
  body: (p: Parsed) => Record<string, unknown>
  /** The API's schema for the body, checked before anything is opened, as `api-key create` does. */
  schema: TSchema
  /** The flag each field of the body comes from, where it is not `--field`. */
  flagOf?: Readonly<Record<string, string>>
  describe: (created: R) => string
  secret: (created: R) => string
  /** What the service warns of with the credential (scopes that do not bind it), printed on stderr. */
  warning?: (created: R) => string | undefined
  noun: string
}): Command<IntegrationContext<{ create(body: unknown, actor: Actor): Promise<R> }>> {
  return command(o, { min: 0, max: 0 }, (p) => {
    const body = o.body(p)
    checkFlags(o.schema, body, o.flagOf)
    return async (ctx) => {
      const created = await ctx.service.create(body, ctx.actor)
      const warning = o.warning?.(created)
      printMade(() => {
        // On stderr, with --json too: stdout stays one JSON document, which holds the warning.
        if (warning !== undefined) printWarning(ctx.io, warning)
        if (ctx.json) printJson(ctx.io, created)
        else ctx.io.out(`Created ${o.describe(created)}.\nThe ${o.noun} is shown once; store it now:\n${o.secret(created)}\n`)
      }, `${o.describe(created)} was created (delete it, and create another)`)
      return EXIT_OK
    }
  })
}

/** `list`: the remote credentials beside keygate's records, a table and a drift summary. */
function listCommand<I extends { state: GiteaTrackState; local: { id: string; created_by: string } | null }>(o: {
  summary: string
  usage: string
  options: ParseArgsOptionsConfig
  noun: string
  headers: string[]
  row: (item: I) => Cells
}): Command<IntegrationContext<{ list(): Promise<{ items: I[]; summary: Record<TrackState, number> & { unreadable?: number } }> }>> {
  return command(o, { min: 0, max: 0 }, (_p) => {
    return async (ctx) => {
      const list = await ctx.service.list()
      if (ctx.json) printJson(ctx.io, list)
      else ctx.io.out(table([...o.headers, 'state', 'record', 'created by'], list.items.map((i) => [...o.row(i), STATE_WORDS[i.state], i.local?.id, i.local?.created_by])) + summaryLine(o.noun, list.summary))
      return EXIT_OK
    }
  }, true)
}

/**
 * `delete ID|NAME`: what was deleted, or that only the record was closed. `what` escapes the
 * service's words (a name made in Gitea or n8n itself may hold escape sequences; printed raw
 * before, found by a review), as the tables do.
 */
function deleteCommand<D extends { remote_missing: boolean; forgotten?: boolean }>(o: {
  summary: string
  usage: string
  options: ParseArgsOptionsConfig
  /** The argument's name in `usage` (ID|NAME). */
  target: string
  what: (d: D) => string
  service: string
  extra?: (p: Parsed) => DeleteOptions
}): Command<IntegrationContext<{ delete(ref: string, actor: Actor, options?: DeleteOptions): Promise<D> }>> {
  return command(o, { min: 1, max: 1 }, (p) => {
    // Checked here, before anything is opened: a bad --user is a usage error, not a store made and opened first.
    const options = o.extra?.(p)
    const action: Action<IntegrationContext<{ delete(ref: string, actor: Actor, options?: DeleteOptions): Promise<D> }>> = async (ctx) => {
      const d = await ctx.service.delete(p.positionals[0] as string, ctx.actor, options)
      printDone(() => {
        if (ctx.json) printJson(ctx.io, d)
        else if (d.forgotten === true) ctx.io.out(`Closed keygate's record of ${o.what(d)} without asking ${o.service}; the token there, if it still exists, is left as it is.\n`)
        else ctx.io.out(d.remote_missing ? `${o.what(d)} was already gone from ${o.service}; its record is closed.\n` : `Deleted ${o.what(d)}.\n`)
      }, d.forgotten === true ? `keygate's record of ${o.what(d)} was closed without asking ${o.service}` : d.remote_missing ? `${o.what(d)} was already gone from ${o.service}, and its record was closed` : `${o.what(d)} was deleted`)
      return EXIT_OK
    }
    // `--forget` closes a record the store holds and calls no service: a new store would hold none.
    if (options?.forget === true) action.changesStored = true
    return action
  })
}

/** `verify SECRET|-`: exit 0 and the owner when accepted; exit 1 and the reason on stderr when not. */
function verifyCommand<V extends Verification>(o: {
  summary: string
  usage: string
  options: ParseArgsOptionsConfig
  noun: string
  accepted: (v: V & { valid: true }) => string
}): Command<IntegrationContext<{ verify(secret: string): Promise<V> }>> {
  return command(o, { min: 1, max: 1 }, (p) => {
    // Read once: before a store is opened here (beforeStore), as `api-key validate -` reads it,
    // or through an admin API before it is asked, so that nothing on stdin is a usage error
    // before anything is opened (before, found by a review, a missing store was refused first,
    // and then the empty secret as malformed).
    let presented: string | undefined
    const read = async (io: Io) => (presented ??= await argOrStdin(io, p.positionals[0] as string, o.noun))
    const action: Action<IntegrationContext<{ verify(secret: string): Promise<V> }>> = async (ctx) => {
      const result = await ctx.service.verify(await read(ctx.io))
      if (ctx.json) printJson(ctx.io, result)
      if (result.valid) {
        if (!ctx.json) ctx.io.out(`${o.accepted(result as V & { valid: true })}${result.note ? ` (${result.note})` : ''}\n`)
        return EXIT_OK
      }
      const record = result.record ? ` (keygate record ${result.record.id}${result.record.deleted_at ? `, deleted ${result.record.deleted_at}` : ''})` : ''
      const message = 'message' in result ? `: ${result.message}` : ''
      // One line, whatever the service or an admin API answered: no control character of theirs reaches the terminal.
      ctx.io.err(`keygate: ${o.noun} refused: ${escapeUnprintable(`${result.reason}${message}${record}`)}\n`)
      return EXIT_REFUSED
    }
    action.beforeStore = async (io) => {
      await read(io)
      return undefined
    }
    return action
  }, true)
}

/** An n8n record's `scopes_enforced` (true, false, null: not known), in the list's column and after verify's verdict. */
const ENFORCED_WORDS: Readonly<Record<string, string>> = { true: 'yes', false: 'no', null: '?' }
const ENFORCED_NOTES: Readonly<Record<string, string>> = {
  false: '; its scopes were not enforced by n8n when it was made',
  null: '; whether n8n enforced its scopes when it was made is not known',
}

type GiteaCommand = Command<IntegrationContext<GiteaOperations>>
type N8nCommand = Command<IntegrationContext<N8nOperations>>

interface DeleteOptions {
  user?: string | undefined
  forget?: boolean | undefined
}

/** `--user`, checked as the admin API checks it (`.` and `..` would turn the URL into another Gitea endpoint). */
function giteaUser(p: Parsed): { user?: string } {
  const user = str(p, 'user')
  if (user === undefined) return {}
  checkFlags(DeleteGiteaTokenQuery, { user })
  return { user }
}

/** `delete`'s `--user` and `--forget` (close keygate's record only, without calling Gitea). */
function giteaDeleteOptions(p: Parsed): DeleteOptions {
  return { ...giteaUser(p), ...(p.values.forget === true ? { forget: true } : {}) }
}

export const GITEA_COMMANDS: Record<string, GiteaCommand> = {
  create: createCommand<GiteaTokenCreated>({
    summary: 'create a personal access token in Gitea and print it once',
    usage: 'keygate gitea create --name NAME --scopes read:repository,... [--user USER] [--gitea-url URL --gitea-username U --gitea-password P] [--json]',
    options: { ...GITEA_FLAGS, name: { type: 'string' }, scopes: { type: 'string' }, user: { type: 'string' } },
    body: (p) => {
      const name = required(p, 'name', 'the token name')
      refuseKeyInFlags({ name }, ['name'])
      const scopes = scopesFlag(p, 'read:repository,write:issue')
      const unknown = unknownGiteaScopes(scopes)
      if (unknown) throw new UsageError(`--scopes: ${unknown.message}`)
      return { name, scopes, ...giteaUser(p) }
    },
    schema: CreateGiteaTokenBody,
    describe: (c) => `Gitea token ${c.remote_id} (${printable(c.name)}) for ${printable(c.user)} with ${c.scopes === null ? 'scopes Gitea did not name' : printable(c.scopes.join(', '))}; keygate record ${c.id}`,
    secret: (c) => c.token,
    noun: 'token',
  }),
  list: listCommand<GiteaListItem>({
    summary: "Gitea's tokens beside keygate's records, with drift marked",
    usage: 'keygate gitea list [--gitea-url URL --gitea-username U --gitea-password P] [--json]',
    options: GITEA_FLAGS,
    noun: 'token',
    headers: ['id', 'name', 'user', 'scopes', 'last eight'],
    row: (i) => [i.remote_id, i.name, i.user, (i.remote ?? i.local)?.scopes?.join(',') ?? '?', (i.remote ?? i.local)?.token_last_eight],
  }),
  delete: deleteCommand<GiteaTokenDeleted>({
    summary: 'delete a token in Gitea by id or name and close its record',
    usage: 'keygate gitea delete ID|NAME [--user USER] [--forget] [--gitea-url URL --gitea-username U --gitea-password P] [--json]',
    options: { ...GITEA_FLAGS, user: { type: 'string' }, forget: { type: 'boolean' } },
    target: 'ID|NAME',
    what: (d) => `Gitea token ${d.remote_id} (${printable(d.name)}) of ${printable(d.user)}`,
    service: 'Gitea',
    extra: giteaDeleteOptions,
  }),
  verify: verifyCommand<GiteaVerification>({
    summary: 'ask Gitea whether it accepts a token and whose it is (exit 0 yes, 1 no); give - to read it from stdin',
    usage: 'keygate gitea verify TOKEN|- [--gitea-url URL] [--json]',
    // The token is the credential: the user's are not used (before, found by a review: taken and ignored).
    options: { 'gitea-url': GITEA_FLAGS['gitea-url'] },
    noun: 'token',
    accepted: (v) => `valid: ${v.user ? `Gitea user ${printable(v.user.login)} (id ${v.user.id})` : 'Gitea accepts it'}${v.record ? `; keygate record ${v.record.id} (${printable(v.record.name)})` : ''}`,
  }),
}

export const N8N_COMMANDS: Record<string, N8nCommand> = {
  create: createCommand<N8nKeyCreated>({
    summary: 'create an n8n API key and print it once',
    usage: 'keygate n8n create --label LABEL --scopes workflow:list,... [--expires-in 30d | --expires-at TIME] [--n8n-url URL --n8n-email E --n8n-password P] [--json]',
    options: { ...N8N_FLAGS, label: { type: 'string' }, scopes: { type: 'string' }, 'expires-in': { type: 'string' }, 'expires-at': { type: 'string' } },
    body: (p) => {
      const expires = expiryFlags(p)
      const label = required(p, 'label', 'the key label')
      const problem = n8nLabelProblem(label)
      if (problem !== undefined) throw new UsageError(`--label: ${problem}`)
      return { label, scopes: scopesFlag(p, 'workflow:list,workflow:read'), ...(expires !== undefined ? { expires_at: expires } : {}) }
    },
    schema: CreateN8nKeyBody,
    flagOf: { expires_at: '--expires-at' },
    describe: (c) => `n8n API key ${printable(c.remote_id)} (${printable(c.label)}) with ${printable(c.scopes.join(', '))}${c.expires_at ? `, expires ${c.expires_at}` : ''}; keygate record ${c.id}`,
    secret: (c) => c.key,
    warning: (c) => c.warning,
    noun: 'key',
  }),
  list: listCommand<N8nListItem>({
    summary: "n8n's API keys beside keygate's records, with drift marked",
    usage: 'keygate n8n list [--n8n-url URL --n8n-email E --n8n-password P] [--json]',
    options: N8N_FLAGS,
    noun: 'key',
    headers: ['id', 'label', 'scopes', 'enforced', 'expires'],
    // Whether n8n enforced the scopes when keygate made the key: known from its record only.
    row: (i) => [i.remote_id, i.label, (i.remote ?? i.local)?.scopes.join(','), i.local ? ENFORCED_WORDS[String(i.local.scopes_enforced ?? null)] : undefined, (i.remote ?? i.local)?.expires_at],
  }),
  delete: deleteCommand<N8nKeyDeleted>({
    summary: 'delete an n8n API key by id or label and close its record',
    usage: 'keygate n8n delete ID|LABEL [--n8n-url URL --n8n-email E --n8n-password P] [--json]',
    options: N8N_FLAGS,
    target: 'ID|LABEL',
    what: (d) => `n8n API key ${printable(d.remote_id)} (${printable(d.label)})`,
    service: 'n8n',
  }),
  verify: verifyCommand<N8nVerification>({
    summary: "ask n8n's public API whether it accepts a key (exit 0 yes, 1 no); give - to read it from stdin",
    usage: 'keygate n8n verify KEY|- [--n8n-url URL] [--json]',
    options: { 'n8n-url': N8N_FLAGS['n8n-url'] },
    noun: 'key',
    accepted: (v) => `valid${v.record ? `: keygate record ${v.record.id} (${printable(v.record.label)}, created by ${printable(v.record.created_by)})${ENFORCED_NOTES[String(v.record.scopes_enforced ?? null)] ?? ''}` : ''}`,
  }),
}
