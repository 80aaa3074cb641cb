// keygate deny-list add|list|remove and keygate lockouts list|lift: the gateway's address checks
// from the command line, as the admin API has them (before, only the admin API had them). The
// deny list is the store's: on the store opened here, or through a running server's admin API;
// a change reaches every gateway at once through the admin API of the instance that made it, or
// through Redis (with REDIS_URL set, as the admin API's changes do), else within
// gateway.deny_list_refresh_s. Lockouts live in the running servers (Redis, or each
// process's memory): only through an admin API.
import { Type } from '@sinclair/typebox'
import { AddDenyBody, DenyListService, denyEntryWarnings, denyJson, normaliseCidr } from '../core/deny-list.ts'
import type { Actor } from '../core/audit.ts'
import { KeygateError } from '../core/errors.ts'
import { shownInput } from '../core/validate.ts'
import type { Runtime } from '../core/runtime.ts'
import { adminClient, pathSegment } from './admin-client.ts'
import { EXIT_OK, UsageError, checkFlags, expiryFlags, parseIntFlag, printDone, printJson, refuseKeyInFlags, str, printWarning, table, type Command, type Io } from './io.ts'

type DenyJson = ReturnType<typeof denyJson>
type LockoutJson = { address_key: string; locked_until: string; retry_after_s: number }
type LiftJson = { address: string; address_key: string; was_locked_out: boolean }

export interface DenyOperations {
  /** Adds an entry, or updates the one listed for that range (`updated`); `warnings`, of a range that denies every client (the admin API's). */
  add(body: { cidr: string; reason?: string; expires_at?: string | null }): Promise<{ entry: DenyJson; updated: boolean; warnings: string[] }>
  list(includeExpired: boolean): Promise<DenyJson[]>
  remove(id: string): Promise<DenyJson>
}

export interface LockoutOperations {
  list(query: { address?: string; limit?: number }): Promise<{ items: LockoutJson[]; total: number }>
  lift(address: string): Promise<LiftJson>
}

export interface DenyContext {
  io: Io
  json: boolean
  ops: DenyOperations
}

export interface LockoutContext {
  io: Io
  json: boolean
  ops: LockoutOperations
}

/** Why the lockout commands need an admin API (runGroup's adminOnly). */
export const LOCKOUTS_NEED_ADMIN =
  'lockouts are held by the running servers (in Redis, or in each process), not in the store: set KEYGATE_ADMIN_URL (or --admin-url) and KEYGATE_ADMIN_TOKEN to reach one'

/** The operations on the store opened here, and the service they change it through (its changes are published on Redis: cli/local.ts). */
export function localDenyOperations(runtime: Runtime, actor: Actor): { ops: DenyOperations; denyList: DenyListService } {
  const service = new DenyListService({ db: runtime.db, audit: runtime.audit })
  const ops: DenyOperations = {
    add: async (body) => {
      const { entry, updated } = await service.save({ cidr: body.cidr, ...(body.reason !== undefined ? { reason: body.reason } : {}), expiresAt: body.expires_at ?? null }, actor)
      return { entry: denyJson(entry), updated, warnings: denyEntryWarnings(entry.cidr) }
    },
    list: async (includeExpired) => (await service.list({ includeExpired })).map(denyJson),
    remove: async (id) => denyJson(await service.remove(id, actor)),
  }
  return { ops, denyList: service }
}

export function remoteDenyOperations(baseUrl: string, token: string): DenyOperations {
  const { call, exchange } = adminClient(baseUrl, token, { checkWith: '`keygate deny-list list`' })
  return {
    add: async (body) => {
      // An older server answers no warnings.
      const { status, json } = await exchange<DenyJson & { warnings?: unknown }>('POST', '/v1/deny-list', body)
      const { warnings, ...entry } = json
      return { entry, updated: status === 200, warnings: Array.isArray(warnings) ? warnings.filter((w): w is string => typeof w === 'string') : [] }
    },
    list: async (includeExpired) => (await call<{ items: DenyJson[] }>('GET', `/v1/deny-list${includeExpired ? '?include_expired=true' : ''}`, undefined, ['items'])).items,
    remove: async (id) => call('DELETE', `/v1/deny-list/${pathSegment(id, () => new KeygateError('deny_entry_not_found', `no deny list entry has the id ${JSON.stringify(shownInput(id))}`))}`),
  }
}

export function remoteLockoutOperations(baseUrl: string, token: string): LockoutOperations {
  const { call } = adminClient(baseUrl, token, { checkWith: '`keygate lockouts list`' })
  return {
    list: (query) => {
      const q = new URLSearchParams(Object.entries(query).flatMap(([k, v]): Array<[string, string]> => (v === undefined ? [] : [[k, String(v)]])))
      return call('GET', `/v1/lockouts${q.size ? `?${q}` : ''}`, undefined, ['items'])
    },
    // Checked as an address or network before (prepare): one path segment, its / encoded.
    lift: (address) => call('DELETE', `/v1/lockouts/${encodeURIComponent(address)}`),
  }
}

/**
 * One address, or an IPv6 network as `lockouts list` shows it: what the lockout commands take (the
 * admin API's `lockout-address` format; the server says whether a network is the size it counts by).
 */
const ADDRESS = Type.Object({ address: Type.String({ format: 'lockout-address' }) })

const until = (at: string | null) => (at === null ? 'never' : at)
/** An entry's end in a sentence: "until <time>", or, for one without an expiry, "with no expiry" (before, "until never"). */
const lasting = (at: string | null) => (at === null ? 'with no expiry' : `until ${at}`)

export const DENY_LIST_COMMANDS: Record<string, Command<DenyContext>> = {
  add: {
    summary: 'refuse an address or range at the gateway (a range listed already: its expiry and reason are updated)',
    usage: 'keygate deny-list add CIDR [--reason TEXT] [--expires-in 1h | --expires-at TIME] [--json]',
    options: { reason: { type: 'string' }, 'expires-in': { type: 'string' }, 'expires-at': { type: 'string' } },
    positionals: { min: 1, max: 1 },
    prepare(p) {
      const expires = expiryFlags(p, { would: 'end the entry', example: '1h' })
      const body = { cidr: p.positionals[0] as string, ...(str(p, 'reason') !== undefined ? { reason: str(p, 'reason') as string } : {}), ...(expires !== undefined ? { expires_at: expires } : {}) }
      checkFlags(AddDenyBody, body, { cidr: 'CIDR', expires_at: '--expires-at' })
      refuseKeyInFlags(body, ['reason'])
      return async (ctx) => {
        const { entry: e, updated, warnings } = await ctx.ops.add(body)
        printDone(() => {
          // On stderr as the CLI's other warnings, so --json's stdout stays one document (which has them too).
          for (const w of warnings) printWarning(ctx.io, w)
          if (ctx.json) printJson(ctx.io, { ...e, updated, warnings })
          // Listed already: updated, or restated as it is and left so (the admin API answers 200
          // either way), so the line claims no change. Before, found by a review: "Updated ...".
          else if (updated) ctx.io.out(`${e.cidr} was listed already (entry ${e.id}): denied ${lasting(e.expires_at)}.\n`)
          else ctx.io.out(`Denied ${e.cidr} (entry ${e.id}) ${lasting(e.expires_at)}.\n`)
        }, `${e.cidr} ${updated ? 'was listed already on' : 'was added to'} the deny list (entry ${e.id})`)
        return EXIT_OK
      }
    },
  },
  list: {
    summary: 'the stored deny list, oldest first (the config file\'s deny_list is not listed)',
    usage: 'keygate deny-list list [--include-expired] [--json]',
    options: { 'include-expired': { type: 'boolean' } },
    positionals: { min: 0, max: 0 },
    readOnly: true,
    prepare(p) {
      return async (ctx) => {
        const items = await ctx.ops.list(p.values['include-expired'] === true)
        if (ctx.json) printJson(ctx.io, { items })
        else if (items.length === 0) ctx.io.out('The stored deny list is empty.\n')
        else ctx.io.out(table(['ID', 'CIDR', 'UNTIL', 'REASON', 'ADDED BY', 'ADDED'], items.map((e) => [e.id, e.cidr, until(e.expires_at), e.reason, e.created_by, e.created_at])))
        return EXIT_OK
      }
    },
  },
  remove: {
    summary: 'take an entry off the deny list, by its id or its address or range',
    usage: 'keygate deny-list remove ID|CIDR [--json]',
    target: 'ID|CIDR',
    options: {},
    positionals: { min: 1, max: 1 },
    changesStored: true,
    prepare(p) {
      const given = p.positionals[0] as string
      // An id is base62 (no . or :); an address or range names the entry listed for it.
      const cidr = /[.:]/.test(given) ? normaliseCidr(given) : undefined
      if (/[.:]/.test(given) && cidr === undefined) throw new UsageError(`${JSON.stringify(shownInput(given))} is neither an entry's id nor an address or range; expected such as 192.0.2.0/24 or 2001:db8::/32`)
      return async (ctx) => {
        let id = given
        if (cidr !== undefined) {
          const found = (await ctx.ops.list(true)).find((e) => e.cidr === cidr)
          if (!found) throw new KeygateError('deny_entry_not_found', `no stored deny list entry is for ${cidr} (the config file's deny_list is changed in the file)`)
          id = found.id
        }
        const e = await ctx.ops.remove(id)
        printDone(() => {
          if (ctx.json) printJson(ctx.io, e)
          else ctx.io.out(`Removed ${e.cidr} (entry ${e.id}) from the deny list.\n`)
        }, `${e.cidr} was removed from the deny list`)
        return EXIT_OK
      }
    },
  },
}

export const LOCKOUT_COMMANDS: Record<string, Command<LockoutContext>> = {
  list: {
    summary: 'the addresses locked out now, latest first, as the server reached holds them',
    usage: 'keygate lockouts list [--address IP] [--limit N] [--json]',
    options: { address: { type: 'string' }, limit: { type: 'string' } },
    positionals: { min: 0, max: 0 },
    readOnly: true,
    prepare(p) {
      const limit = parseIntFlag('limit', str(p, 'limit'), 1, 1000)
      const address = str(p, 'address')
      if (address !== undefined) checkFlags(ADDRESS, { address }, { address: '--address' })
      return async (ctx) => {
        const r = await ctx.ops.list({ ...(address !== undefined ? { address } : {}), ...(limit !== undefined ? { limit } : {}) })
        if (ctx.json) printJson(ctx.io, r)
        else if (r.items.length === 0) ctx.io.out('No address is locked out.\n')
        else {
          ctx.io.out(table(['ADDRESS', 'LOCKED UNTIL', 'RETRY AFTER'], r.items.map((l) => [l.address_key, l.locked_until, `${l.retry_after_s}s`])))
          if (r.total > r.items.length) ctx.io.out(`(${r.items.length} of ${r.total}; --limit shows more)\n`)
        }
        return EXIT_OK
      }
    },
  },
  lift: {
    summary: 'let a locked-out address try again at once, on every instance',
    usage: 'keygate lockouts lift ADDRESS [--json]',
    options: {},
    positionals: { min: 1, max: 1 },
    prepare(p) {
      // An address, as the admin API checks it (before, found by a review: a bad one was the
      // server's validation_failed, exit 1, where a range was a usage error, exit 2).
      checkFlags(ADDRESS, { address: p.positionals[0] }, { address: 'ADDRESS' })
      return async (ctx) => {
        const r = await ctx.ops.lift(p.positionals[0] as string)
        printDone(() => {
          if (ctx.json) printJson(ctx.io, r)
          else ctx.io.out(r.was_locked_out ? `Lifted the lockout of ${r.address_key}.\n` : `${r.address_key} was not locked out here; its failed attempts are forgotten everywhere.\n`)
        }, `the lockout of ${r.address_key} was lifted`)
        return EXIT_OK
      }
    },
  },
}
