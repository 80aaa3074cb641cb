// The stored IP deny list (the admin API's /v1/deny-list and the gateway read it). Addresses are
// stored normalised — IPv4-mapped IPv6 as IPv4, a range as its network address — so one range
// has one spelling and the UNIQUE constraint means what it says. Each change writes its audit
// row in the same transaction.
import ipaddr from 'ipaddr.js'
import { Type } from '@sinclair/typebox'
import type { Db } from './db.ts'
import { sqlState, UNDEFINED_TABLE } from './db.ts'
import type { Actor, AuditLog } from './audit.ts'
import { fieldInvalid, KeygateError } from './errors.ts'
import { hostBitsProblem } from './formats.ts'
import { characterCount, NO_KEY_IN, NOT_PAST, PRINTABLE, refuseKeyIn, shownInput } from './validate.ts'
import { randomBase62 } from './keys/format.ts'
import { parseRange, type Range } from './keys/evaluate.ts'

/** What the gateway's matcher needs of an entry. */
export interface DenyRange {
  id: string
  cidr: string
  expiresAt: Date | null
}

export interface DenyEntry extends DenyRange {
  reason: string | null
  createdBy: string
  createdAt: Date
}

/** `added` also for an entry updated (saved again with another expiry or reason): it replaces the one of the same id. */
export type DenyChange = { action: 'added' | 'removed'; entry: DenyEntry }

export interface DenyInput {
  cidr: string
  reason?: string | null
  expiresAt?: Date | string | null
}

interface DenyRow {
  id: string
  cidr: string
  reason: string | null
  created_by: string
  created_at: Date
  expires_at: Date | null
}

/** What an entry is added with: the admin API's body, and the CLI's flags checked against it. */
export const AddDenyBody = Type.Object(
  {
    cidr: Type.String({ format: 'cidr', description: 'IPv4 or IPv6 address or CIDR range, a range written as its network (host bits set are refused, naming the network they would cover).' }),
    reason: Type.Optional(Type.Union([Type.String({ minLength: 1, maxLength: 500, pattern: PRINTABLE }), Type.Null()], { description: `Why (no control or invisible format characters); kept with the entry and in the audit log. ${NO_KEY_IN}` })),
    expires_at: Type.Optional(Type.Union([Type.String({ format: 'date-time' }), Type.Null()], { description: `It stops applying then; omit or null for never. ${NOT_PAST}` })),
  },
  { additionalProperties: false },
)

/** An entry as the admin API answers it and the CLI prints it with --json. */
export function denyJson(e: DenyEntry) {
  return { id: e.id, cidr: e.cidr, reason: e.reason, created_by: e.createdBy, created_at: e.createdAt.toISOString(), expires_at: e.expiresAt?.toISOString() ?? null }
}

const toEntry = (r: DenyRow): DenyEntry => ({ id: r.id, cidr: r.cidr, reason: r.reason, createdBy: r.created_by, createdAt: r.created_at, expiresAt: r.expires_at })

/** The one spelling of an address or range: `192.0.2.0/24`, `2001:db8::/32`, `192.0.2.7`; undefined when invalid. */
export function normaliseCidr(input: string): string | undefined {
  const range = parseRange(input.trim())
  if (!range) return undefined
  const [addr, bits] = range
  const full = addr.kind() === 'ipv4' ? 32 : 128
  if (bits === full) return addr.toString()
  const network = addr.kind() === 'ipv4' ? ipaddr.IPv4.networkAddressFromCIDR(`${addr.toString()}/${bits}`) : ipaddr.IPv6.networkAddressFromCIDR(`${addr.toString()}/${bits}`)
  return `${network.toString()}/${bits}`
}

/** The IPv4-mapped block's first address: keygate reads `::ffff:a.b.c.d` as the IPv4 address a.b.c.d. */
const MAPPED = ipaddr.IPv6.parse('::ffff:0:0')

/**
 * The clients a deny list range denies all of: 'every' (`::/0`), 'ipv4' (`0.0.0.0/0`, or an IPv6
 * range holding the IPv4-mapped block `::ffff:0:0/96`, such as `::/64` or `::/80`: the deny list
 * reads it as holding every IPv4 address, the stricter reading), else undefined. The gateway's
 * matcher and the warnings below both ask this.
 */
export function deniesEvery([net, bits]: Range): 'every' | 'ipv4' | undefined {
  if (net.kind() === 'ipv4') return bits === 0 ? 'ipv4' : undefined
  if (bits === 0) return 'every'
  return bits <= 96 && MAPPED.match(net, bits) ? 'ipv4' : undefined
}

const STAYS_OPEN = 'the admin listener does not check the deny list and stays open'

/**
 * What an entry denying every client (or every IPv4 client) is told with: taken, as nginx's `deny
 * all` is (closing the gate is a use), but said, since it may be a slip (`::/0` for `::1`). Before,
 * found by a review, it was taken without a word. None for any narrower range.
 */
export function denyEntryWarnings(cidr: string): string[] {
  const range = parseRange(cidr.trim())
  const every = range && deniesEvery(range)
  if (every === 'every') return [`${cidr} denies every client of the gateway, IPv4 and IPv6 (an IPv6 range holding ::ffff:0:0/96 holds every IPv4 address); ${STAYS_OPEN}`]
  if (every === undefined) return []
  const why = (range as Range)[0].kind() === 'ipv6' ? ': it holds ::ffff:0:0/96, the IPv4-mapped block, which the deny list reads as every IPv4 address' : ''
  return [`${cidr} denies every IPv4 client of the gateway${why}; ${STAYS_OPEN}`]
}

/** denyEntryWarnings of each item of the config file's `deny_list`, the item named. */
export function denyListWarnings(cidrs: readonly string[]): string[] {
  return cidrs.flatMap((cidr, i) => denyEntryWarnings(cidr).map((w) => `deny_list[${i}]: ${w}`))
}

export class DenyListService {
  readonly #db: Db
  readonly #audit: AuditLog | undefined
  readonly #now: () => Date
  readonly #listeners = new Set<(change: DenyChange) => void>()

  /** Without `audit` the service can only read (the gateway's own instance). */
  constructor(options: { db: Db; audit?: AuditLog; now?: () => Date }) {
    this.#db = options.db
    this.#audit = options.audit
    this.#now = options.now ?? (() => new Date())
  }

  /** Called after each committed change. */
  onChange(listener: (change: DenyChange) => void): () => void {
    this.#listeners.add(listener)
    return () => this.#listeners.delete(listener)
  }

  #emit(change: DenyChange): void {
    for (const l of this.#listeners) l(change)
  }

  /** Entries in force (or all, with `includeExpired`), oldest first. */
  async list(options: { includeExpired?: boolean } = {}): Promise<DenyEntry[]> {
    const rows = options.includeExpired
      ? await this.#db.query<DenyRow>('SELECT id, cidr, reason, created_by, created_at, expires_at FROM deny_list ORDER BY created_at, id')
      : await this.#db.query<DenyRow>(
          'SELECT id, cidr, reason, created_by, created_at, expires_at FROM deny_list WHERE expires_at IS NULL OR expires_at > $1 ORDER BY created_at, id',
          [this.#now()],
        )
    return rows.map(toEntry)
  }

  /**
   * The entries in force as the gateway reads them at a reload: id, range and expiry, in no order.
   * Before, found by a review, the gateway read them with list(): every column, each timestamp
   * parsed as text, sorted by the store (most of PostgreSQL's work with 20,000 rows).
   */
  async ranges(): Promise<DenyRange[]> {
    const rows = await this.#db.query<{ id: string; cidr: string; expires_ms: number | null }>(
      'SELECT id, cidr, (extract(epoch FROM expires_at) * 1000)::float8 AS expires_ms FROM deny_list WHERE expires_at IS NULL OR expires_at > $1',
      [this.#now()],
    )
    return rows.map((r) => ({ id: r.id, cidr: r.cidr, expiresAt: r.expires_ms === null ? null : new Date(r.expires_ms) }))
  }

  /**
   * The list's change mark (migration 0014): a value the store replaces in the transaction of every
   * statement that writes deny_list, so the gateway reads the rows only when it is not the one its
   * last read began with. Read before the rows. Undefined when the store has none (a schema before
   * 0014, or the mark's row deleted by hand): then every read has to read the rows.
   */
  async changeMark(): Promise<string | undefined> {
    try {
      const rows = await this.#db.query<{ mark: string }>('SELECT mark::text AS mark FROM deny_list_changes')
      return rows[0]?.mark
    } catch (err) {
      if (sqlState(err) === UNDEFINED_TABLE) return undefined
      throw err
    }
  }

  /** Adds an entry, or updates the one listed for the same range (see save). */
  async add(input: DenyInput, actor: Actor): Promise<DenyEntry> {
    return (await this.save(input, actor)).entry
  }

  /**
   * Adds an entry; for a range already listed (in force), updates that entry instead and says so
   * (`updated`): its expiry becomes the one given (none given: never, as an add), its reason the
   * one given (none given: kept), its id and creation stay; audited as deny_list.updated with the
   * values before. Before, found by a review, the range was a conflict, and an expiry could be
   * changed only by removing the entry and adding it again, the address open in between. An add
   * that restates the entry (the same expiry and reason) changes nothing: the entry as it is,
   * `updated` (the range was listed already), nothing written, audited or told to listeners.
   */
  async save(input: DenyInput, actor: Actor): Promise<{ entry: DenyEntry; updated: boolean }> {
    const audit = this.#requireAudit()
    const cidr = typeof input.cidr === 'string' ? normaliseCidr(input.cidr) : undefined
    if (!cidr) throw fieldInvalid('cidr', 'expected an IPv4 or IPv6 address or CIDR range such as 192.0.2.0/24 or 2001:db8::/32')
    const hostBits = hostBitsProblem(input.cidr)
    if (hostBits !== undefined) throw fieldInvalid('cidr', hostBits)
    if (input.reason != null && (typeof input.reason !== 'string' || characterCount(input.reason) > 500)) throw fieldInvalid('reason', 'expected a string of at most 500 characters')
    refuseKeyIn({ reason: input.reason })
    const now = this.#now()
    let expiresAt: Date | null = null
    if (input.expiresAt != null) {
      expiresAt = input.expiresAt instanceof Date ? input.expiresAt : new Date(input.expiresAt)
      if (Number.isNaN(expiresAt.getTime())) throw fieldInvalid('expires_at', 'expected an RFC 3339 date-time')
      // The time named, as a key's refusal names it (before, found by a review: `expires_at: is in the past`).
      if (expiresAt <= now) throw fieldInvalid('expires_at', `${typeof input.expiresAt === 'string' ? input.expiresAt : expiresAt.toISOString()} is in the past`)
    }
    const id = randomBase62(16)
    const columns = 'id, cidr, reason, created_by, created_at, expires_at'
    const saved = await this.#db.transaction(async (tx) => {
      const inForce = `SELECT ${columns} FROM deny_list WHERE cidr = $1 AND (expires_at IS NULL OR expires_at > $2) FOR UPDATE`
      let held = (await tx.query<DenyRow>(inForce, [cidr, now]))[0]
      if (!held) {
        // An expired entry for the same range is history, not the entry to update.
        await tx.query('DELETE FROM deny_list WHERE cidr = $1 AND expires_at IS NOT NULL AND expires_at <= $2', [cidr, now])
        // Another add of the same range committing meanwhile: its row is then the one updated.
        const inserted = await tx.query<DenyRow>(
          `INSERT INTO deny_list (${columns}) VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (cidr) DO NOTHING RETURNING ${columns}`,
          [id, cidr, input.reason ?? null, actor.actor, now, expiresAt],
        )
        if (inserted[0]) {
          await audit.write(tx, actor, { action: 'deny_list.added', details: { id, cidr, reason: input.reason ?? null, expires_at: expiresAt?.toISOString() ?? null } })
          return { entry: toEntry(inserted[0]), updated: false, changed: true }
        }
        held = (await tx.query<DenyRow>(`SELECT ${columns} FROM deny_list WHERE cidr = $1 FOR UPDATE`, [cidr]))[0]
        if (!held) throw new KeygateError('conflict', `${cidr} was added and removed by others meanwhile; add it again`, { cidr })
      }
      const reason = input.reason === undefined ? held.reason : input.reason
      // Restated as it is (the same expiry and reason): nothing to change, so nothing is written,
      // audited or told to the gateways. Before, found by a review, it was audited as
      // deny_list.updated, the change mark moved and every gateway read the list again.
      if (reason === held.reason && (held.expires_at?.getTime() ?? null) === (expiresAt?.getTime() ?? null)) return { entry: toEntry(held), updated: true, changed: false }
      const rows = await tx.query<DenyRow>(`UPDATE deny_list SET reason = $2, expires_at = $3 WHERE id = $1 RETURNING ${columns}`, [held.id, reason, expiresAt])
      await audit.write(tx, actor, {
        action: 'deny_list.updated',
        details: { id: held.id, cidr, reason, expires_at: expiresAt?.toISOString() ?? null, previous: { reason: held.reason, expires_at: held.expires_at?.toISOString() ?? null } },
      })
      return { entry: toEntry(rows[0] as DenyRow), updated: true, changed: true }
    })
    if (saved.changed) this.#emit({ action: 'added', entry: saved.entry })
    return { entry: saved.entry, updated: saved.updated }
  }

  async remove(id: string, actor: Actor): Promise<DenyEntry> {
    const audit = this.#requireAudit()
    const entry = await this.#db.transaction(async (tx) => {
      const rows = await tx.query<DenyRow>('DELETE FROM deny_list WHERE id = $1 RETURNING id, cidr, reason, created_by, created_at, expires_at', [id])
      if (!rows[0]) throw new KeygateError('deny_entry_not_found', `no deny list entry has the id ${JSON.stringify(shownInput(id))}`)
      await audit.write(tx, actor, { action: 'deny_list.removed', details: { id, cidr: rows[0].cidr } })
      return toEntry(rows[0])
    })
    this.#emit({ action: 'removed', entry })
    return entry
  }

  #requireAudit(): AuditLog {
    if (!this.#audit) throw new Error('this DenyListService was created without an audit log and can only read')
    return this.#audit
  }
}
