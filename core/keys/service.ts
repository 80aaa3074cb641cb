// Key lifecycle: create, list, get, update, revoke, rotate, import, validate, stats. Every change
// is one transaction that locks the key row and writes its audit record, so a change and its
// record commit together or not at all.
import { isDeepStrictEqual } from 'node:util'
import type { Db, Queryable } from '../db.ts'
import { rowsOf, sqlState, statementBatches, UNIQUE_VIOLATION } from '../db.ts'
import type { Actor, AuditLog } from '../audit.ts'
import { decodeCursor, pageOf, type Page } from '../cursor.ts'
import { fieldInvalid, isKeygateError, KeygateError, keyNotFound, type ErrorCode } from '../errors.ts'
import { assertValid, firstProblems, MAX_LISTED_PROBLEMS, refuseKeyIn } from '../validate.ts'
import { generateKey, hashesEqual, keyPrefixes, newKeyId, parseKey, SHA256_HEX, type KeyPrefixes } from './format.ts'
import { evaluateKey, statusAt, validUntilOf } from './evaluate.ts'
import { checkMetadata, CreateKeyBody, IMPORT_MAX_ROWS, ImportRow, ListKeysQuery, RevokeBody, UpdateKeyBody, withNormalCidrs, type CreateKeyInput, type ImportRowInput, type ListKeysInput, type RevokeInput, type UpdateKeyInput } from './schemas.ts'
import { expiredPartsSql, KEY_ENDS_FROM, statusAtSql, type KeyEndReason } from './ends.ts'
import { KEY_TYPES, type KeyRecord, type KeyStatus, type KeyType } from './types.ts'
import { findIndexInSlices } from '../slices.ts'

export interface KeyServiceOptions {
  db: Db
  audit: AuditLog
  /** The prefix of new keys. */
  prefix: string
  /** Prefixes of keys made before `prefix` was changed: still accepted. */
  previousPrefixes?: readonly string[]
  acceptLegacy?: boolean
  graceHours: Readonly<Record<KeyType, number>>
  /** The clock; tests pass a controllable one. */
  now?: () => Date
}

export type KeyChange = { action: 'created' | 'updated' | 'revoked' | 'rotated' | 'imported' | 'expired'; key: KeyRecord; previous?: KeyRecord }

export type Validation =
  | { valid: true; key: KeyRecord }
  | { valid: false; code: ErrorCode; reason: 'malformed' | 'unknown' | 'wrong_secret' | string; keyId?: string }

/** A key's characters in an INSERT besides its name, owner, scopes, metadata and CIDRs (its id, hash, times…). */
const KEY_ROW_CHARS = 200

/** About the characters a list of strings takes as a statement's parameter. */
const listChars = (xs: readonly string[]) => xs.reduce((n, x) => n + x.length + 3, 2)

/** A key as it is inserted: what the store fills in (updated_at, the ends) is not given. */
type NewKey = Omit<KeyRecord, 'updatedAt' | 'lastUsedAt' | 'revokedAt' | 'revokedReason' | 'replacedBy'>

/** A transaction id (xid8) as text, as a number; -1 for none (NULL, or past what a number holds exactly), which matches no change. */
export function xidNumber(text: string | null | undefined): number {
  const n = text === null || text === undefined ? NaN : Number(text)
  return Number.isSafeInteger(n) ? n : -1
}

export interface KeyRow {
  id: string
  key_hash: string
  name: string
  type: KeyType
  status: KeyStatus
  scopes: string[]
  owner: string | null
  metadata: Record<string, unknown>
  allowed_cidrs: string[]
  rate_limit: number | null
  rate_limit_window_s: number | null
  rotation_interval_s: number | null
  rotated_from: string | null
  replaced_by: string | null
  grace_until: Date | null
  legacy: boolean
  created_at: Date
  updated_at: Date
  expires_at: Date | null
  last_used_at: Date | null
  revoked_at: Date | null
  revoked_reason: string | null
}

export function toRecord(r: KeyRow): KeyRecord {
  return {
    id: r.id,
    keyHash: r.key_hash,
    name: r.name,
    type: r.type,
    status: r.status,
    scopes: r.scopes,
    owner: r.owner,
    metadata: r.metadata,
    allowedCidrs: r.allowed_cidrs,
    rateLimit: r.rate_limit !== null && r.rate_limit_window_s !== null ? { limit: r.rate_limit, windowS: r.rate_limit_window_s } : null,
    rotationIntervalS: r.rotation_interval_s,
    rotatedFrom: r.rotated_from,
    replacedBy: r.replaced_by,
    graceUntil: r.grace_until,
    legacy: r.legacy,
    createdAt: r.created_at,
    updatedAt: r.updated_at,
    expiresAt: r.expires_at,
    lastUsedAt: r.last_used_at,
    revokedAt: r.revoked_at,
    revokedReason: r.revoked_reason,
  }
}

export const COLUMNS = `id, key_hash, name, type, status, scopes, owner, metadata, allowed_cidrs, rate_limit, rate_limit_window_s,
  rotation_interval_s, rotated_from, replaced_by, grace_until, legacy, created_at, updated_at, expires_at, last_used_at, revoked_at, revoked_reason`

/**
 * What a key was given when it was made, as its audit row's details: everything that decides
 * what it grants, named as the API names it. Before (found by a review), a created key's row held
 * its name, type, scopes, owner and expiry only, an imported or rotated one's less: the address
 * binding and rate limit it was given could be read only from the live row, while `key.updated`
 * rows recorded their later changes.
 */
function grantedDetails(k: KeyRecord): Record<string, unknown> {
  return {
    name: k.name,
    type: k.type,
    scopes: k.scopes,
    owner: k.owner,
    allowed_cidrs: k.allowedCidrs,
    rate_limit: k.rateLimit ? { limit: k.rateLimit.limit, window_s: k.rateLimit.windowS } : null,
    rotation_interval_s: k.rotationIntervalS,
    expires_at: k.expiresAt?.toISOString() ?? null,
    metadata: k.metadata,
  }
}

/** A rate limit as the API writes it (`window_s`) as a record holds it; none for none (null restores the type's default). */
function rateLimitFrom(api: { limit: number; window_s: number } | null | undefined): KeyRecord['rateLimit'] {
  return api ? { limit: api.limit, windowS: api.window_s } : null
}

/** COLUMNS, each qualified by `table` (for a statement that joins api_keys with other tables). */
export function columnsOf(table: string): string {
  return COLUMNS.split(',').map((c) => `${table}.${c.trim()}`).join(', ')
}

/** `lineage(id)`: the key `$1` and every key it replaced, back to the first of its rotations (each link read by index, migration 0011). */
export const LINEAGE = `WITH RECURSIVE lineage(id) AS (
  SELECT $1::text
  UNION SELECT k.id FROM api_keys k JOIN lineage l ON k.replaced_by = l.id
)`

/** The most successors a rotate or update refusal follows to name the key of the lineage to use instead. */
const SUCCESSOR_WALK_MAX = 1000

/**
 * `successors(id, depth)`: `$1` (a key's successor, depth 1) and each key that replaced the one
 * before, by primary key, at most `$2` of them (replaced_by never loops, but the walk is bounded all the same).
 */
const SUCCESSORS = `WITH RECURSIVE successors(id, depth) AS (
  SELECT $1::text, 1
  UNION ALL SELECT k.replaced_by, s.depth + 1 FROM api_keys k JOIN successors s ON k.id = s.id
  WHERE k.replaced_by IS NOT NULL AND s.depth < $2
)`

/** An import of more rows than IMPORT_MAX_ROWS is refused whole, on the store as through the admin API (the CLI's remote operations check it before sending). */
export function checkImportSize(rows: number): void {
  if (rows > IMPORT_MAX_ROWS) {
    throw new KeygateError('import_invalid', `the import holds ${rows} rows; one import takes at most ${IMPORT_MAX_ROWS}, on the store as through the admin API: split the file`)
  }
}

/** An import of no rows (the store's answer, also the CLI's through the admin API). */
export function emptyImport(): KeygateError {
  return new KeygateError('import_invalid', 'the import holds no rows; expected a JSON array or JSON lines of objects')
}

/** An import's rows as checked by themselves (checkImportRows): each row's problems, the rows that passed, and the row each well-formed key_hash is first in. */
export interface ImportCheck {
  rows: ImportRowInput[]
  problems: string[][]
  seen: Map<string, number>
  /** The row the check stopped at, its problems reaching MAX_LISTED_PROBLEMS; -1 when it checked every row. */
  checked: number
  /** How many rows the import holds. */
  total: number
}

/**
 * Checks an import's rows as far as the store plays no part (their shape, fields and repeats
 * within the file): KeyService.importLegacy then adds those the store finds (a key_hash already
 * in it), and the CLI asks this before it makes a new store for an import (before, found by a
 * review, a file of rows refused by their own fields made a store in a mistyped data folder,
 * then was refused). Problems are collected up to MAX_LISTED_PROBLEMS: the check stops at the
 * row that reaches them.
 */
export async function checkImportRows(input: unknown, now: Date): Promise<ImportCheck> {
  if (!Array.isArray(input) || input.length === 0) throw emptyImport()
  checkImportSize(input.length)
  // Each row's problems, so that those the store adds are listed with the row's own.
  const problems: string[][] = input.map(() => [])
  const rows: ImportRowInput[] = []
  const seen = new Map<string, number>()
  const check = (raw: unknown, i: number): void => {
    let hash: string | undefined
    if (raw && typeof raw === 'object' && typeof (raw as { key_hash?: unknown }).key_hash === 'string') {
      // Hex is case-blind; the replaced system may have stored upper case.
      hash = (raw as { key_hash: string }).key_hash.toLowerCase()
      raw = { ...raw, key_hash: hash }
    }
    // A well-formed hash is checked for repeats and against the store whatever else is wrong with
    // its row, so that one answer lists every problem of the rows checked (the README's promise).
    if (hash !== undefined && SHA256_HEX.test(hash)) {
      const first = seen.get(hash)
      if (first === undefined) seen.set(hash, i + 1)
      else problems[i]?.push(`row ${i + 1}: key_hash repeats row ${first}`)
    }
    try {
      const row = withNormalCidrs(givenFields(assertValid<Record<string, unknown>>(ImportRow, raw, `row ${i + 1}`)))
      checkMetadata(row.metadata)
      refuseKeyIn({ name: row.name, owner: row.owner, metadata: row.metadata })
      // A key made in the future would head the newest-first list for ever; one made after it
      // expired is no key the replaced system ever had.
      const created = row.created_at ? new Date(row.created_at) : undefined
      if (created && created > now) throw fieldInvalid('created_at', `${row.created_at} is in the future`)
      if (created && row.expires_at && new Date(row.expires_at) <= created) throw fieldInvalid('expires_at', `${row.expires_at} is not after created_at ${row.created_at}`)
      rows.push(row)
    } catch (err) {
      if (!(err instanceof KeygateError)) throw err
      // The message names the row already when the row itself is what is wrong (`row 3: …`).
      problems[i]?.push(err.message.startsWith(`row ${i + 1}`) ? err.message : `row ${i + 1}: ${err.message}`)
    }
  }
  let found = 0
  // The rows checked: all of them, or those up to the one whose problems reach the most listed.
  const checked = await findIndexInSlices(input, (raw, i) => {
    check(raw, i)
    found += problems[i]?.length ?? 0
    return found >= MAX_LISTED_PROBLEMS
  })
  return { rows, problems, seen, checked, total: input.length }
}

/** An import row (checked) without its fields given as null: the schema takes null only in optional fields, where it is as if not given (an SQL export's empty column). */
function givenFields(row: Record<string, unknown>): ImportRowInput {
  return Object.fromEntries(Object.entries(row).filter(([, v]) => v !== null)) as ImportRowInput
}

/** `import_invalid` listing an import's problems (up to MAX_LISTED_PROBLEMS, and which rows were not checked), when it has any. */
export function refuseImportProblems({ problems, checked, total }: ImportCheck): void {
  const listed = firstProblems(problems.flat())
  if (checked >= 0 && checked < total - 1) listed.push(`the rows after row ${checked + 1} were not checked (an import lists at most ${MAX_LISTED_PROBLEMS} problems)`)
  if (listed.length > 0) throw new KeygateError('import_invalid', `nothing imported:\n  ${listed.join('\n  ')}`, { problems: listed })
}

function futureDate(value: string | null | undefined, now: Date, field: string): Date | null | undefined {
  if (value === undefined || value === null) return value
  const d = new Date(value)
  if (d <= now) throw fieldInvalid(field, `${value} is in the past`)
  return d
}

/** One field of a key's change: the key's property it sets, in the form the key holds it, and the columns it writes. */
interface FieldChange {
  field: keyof UpdateKeyInput
  property: keyof KeyRecord
  value: unknown
  columns: Array<[column: string, value: unknown]>
}

/** The change `body` asks for, field by field (`expiresAt`: its expires_at as a date, already checked). */
function fieldChanges(body: UpdateKeyInput, expiresAt: Date | null | undefined): FieldChange[] {
  const changes: FieldChange[] = []
  const add = (field: keyof UpdateKeyInput, property: keyof KeyRecord, value: unknown, columns: Array<[string, unknown]> = [[field, value]]) => {
    changes.push({ field, property, value, columns })
  }
  if (body.name !== undefined) add('name', 'name', body.name)
  if (body.scopes !== undefined) add('scopes', 'scopes', body.scopes)
  if (body.owner !== undefined) add('owner', 'owner', body.owner)
  // As jsonb gives it back: key order and repeated keys are not kept, -0 is 0.
  if (body.metadata !== undefined) add('metadata', 'metadata', JSON.parse(JSON.stringify(body.metadata)), [['metadata', JSON.stringify(body.metadata)]])
  if (body.allowed_cidrs !== undefined) add('allowed_cidrs', 'allowedCidrs', body.allowed_cidrs)
  if (body.rate_limit !== undefined) {
    const limit = body.rate_limit
    add('rate_limit', 'rateLimit', rateLimitFrom(limit), [['rate_limit', limit?.limit ?? null], ['rate_limit_window_s', limit?.window_s ?? null]])
  }
  if (expiresAt !== undefined) add('expires_at', 'expiresAt', expiresAt)
  if (body.rotation_interval_s !== undefined) add('rotation_interval_s', 'rotationIntervalS', body.rotation_interval_s)
  return changes
}

/**
 * The changes that would change `k`: restating a value is none. Compared as the store holds them:
 * lists in their order, metadata as JSON (not its text), dates as instants, null as null.
 */
function differing(changes: readonly FieldChange[], k: KeyRecord): FieldChange[] {
  return changes.filter((c) => !isDeepStrictEqual(c.value, k[c.property]))
}

export class KeyService {
  readonly #db: Db
  readonly #audit: AuditLog
  readonly #prefix: string
  readonly #prefixes: KeyPrefixes
  readonly #acceptLegacy: boolean
  readonly #graceHours: Readonly<Record<KeyType, number>>
  readonly #now: () => Date
  readonly #listeners = new Set<(change: KeyChange) => void>()
  readonly #batchListeners = new Set<(changes: readonly KeyChange[]) => void>()
  readonly #committing = new Set<(tx: Queryable, change: KeyChange) => Promise<void>>()

  constructor(options: KeyServiceOptions) {
    this.#db = options.db
    this.#audit = options.audit
    this.#prefix = options.prefix
    this.#prefixes = keyPrefixes(options.prefix, options.previousPrefixes)
    this.#acceptLegacy = options.acceptLegacy ?? true
    this.#graceHours = options.graceHours
    this.#now = options.now ?? (() => new Date())
  }

  get prefix(): string {
    return this.#prefix
  }

  /** The prefixes a presented key may carry (see KeyPrefixes). */
  get prefixes(): KeyPrefixes {
    return this.#prefixes
  }

  /** Whether `presented` has a key's shape, which `lookup` asks the store about (a malformed one it answers without). */
  wellFormed(presented: string): boolean {
    return parseKey(presented, this.#prefixes, this.#acceptLegacy) !== undefined
  }

  /** Called after each committed change (cache invalidation, webhooks, pub/sub). */
  onChange(listener: (change: KeyChange) => void): () => void {
    this.#listeners.add(listener)
    return () => this.#listeners.delete(listener)
  }

  /**
   * Called once per committed operation with all its changes, after the `onChange` listeners:
   * an import or a scheduler round changes thousands of keys at once, and what the cache and the
   * invalidation messages do per change they then do once per batch.
   */
  onChanges(listener: (changes: readonly KeyChange[]) => void): () => void {
    this.#batchListeners.add(listener)
    return () => this.#batchListeners.delete(listener)
  }

  /**
   * Called with each change inside its transaction, before the commit: what the listener writes
   * with `tx` commits or rolls back with the change (the webhook queue's key events; a crash
   * after the commit cannot lose them). A listener that throws fails the change.
   */
  onCommitting(listener: (tx: Queryable, change: KeyChange) => Promise<void>): () => void {
    this.#committing.add(listener)
    return () => this.#committing.delete(listener)
  }

  /** Tells the listeners of changes committed outside this service (the scheduler's), as one operation. */
  notify(changes: readonly KeyChange[]): void {
    this.#emit(changes)
  }

  #emit(changes: readonly KeyChange[]): void {
    if (changes.length === 0) return
    for (const change of changes) for (const l of this.#listeners) l(change)
    for (const l of this.#batchListeners) l(changes)
  }

  /**
   * Runs `work` in one transaction. The changes it pushes go to the committing listeners inside
   * it, and to the change listeners once it has committed, in the order pushed. `kept`: for a
   * change that hands out a key's plaintext (create, rotate), whether its row is in the store,
   * asked when the transaction failed at its COMMIT: the commit may have been made and only its
   * answer lost (the connection dropped between). Kept, the change succeeded and its key is
   * handed out; before (found by a review), the caller got a 503 while an active key stood in
   * the store whose plaintext nobody had, and a retry made a second one.
   */
  async #commit<T>(work: (tx: Queryable, changes: KeyChange[]) => Promise<T>, last?: (result: T) => void | Promise<void>, kept?: (db: Queryable) => Promise<boolean>): Promise<T> {
    const changes: KeyChange[] = []
    let done: { result: T } | undefined
    let result: T
    try {
      result = await this.#db.transaction(async (tx) => {
        changes.length = 0
        done = undefined
        const r = await work(tx, changes)
        for (const change of changes) for (const l of this.#committing) await l(tx, change)
        await last?.(r)
        done = { result: r }
        return r
      })
    } catch (err) {
      // Failed before its COMMIT was sent (nothing kept), or nothing to ask by.
      if (done === undefined || kept === undefined) throw err
      let there: boolean
      try {
        there = await kept(this.#db)
      } catch {
        throw err
      }
      if (!there) throw err
      result = done.result
    }
    this.#emit(changes)
    return result
  }

  /**
   * Locks a key and the keys it replaced, in one order (by id), before any of them is changed:
   * revoking a key also revokes its predecessors still in grace, and two such changes to one
   * lineage that each locked their own key first then waited on each other's (PostgreSQL's
   * deadlock detector ended one of them). Gives the key, and the whole lineage (the key included).
   */
  async #lockLineage(tx: Queryable, id: string): Promise<{ key: KeyRecord; lineage: KeyRecord[] }> {
    const rows = await tx.query<KeyRow>(`${LINEAGE} SELECT ${COLUMNS} FROM api_keys WHERE id IN (SELECT id FROM lineage) ORDER BY id FOR UPDATE`, [id])
    const lineage = rows.map(toRecord)
    const key = lineage.find((k) => k.id === id)
    if (!key) throw keyNotFound(id)
    return { key, lineage }
  }

  async #lock(tx: Queryable, id: string): Promise<KeyRecord> {
    const rows = await tx.query<KeyRow>(`SELECT ${COLUMNS} FROM api_keys WHERE id = $1 FOR UPDATE`, [id])
    if (!rows[0]) throw keyNotFound(id)
    return toRecord(rows[0])
  }

  // updated_at is when the row was written (an imported key's created_at may be years back): the
  // gateways' store check finds new and changed keys by it.
  async #insert(tx: Queryable, k: NewKey, updatedAt: Date = k.createdAt): Promise<KeyRecord> {
    return (await this.#insertMany(tx, [k], updatedAt))[0] as KeyRecord
  }

  /**
   * Inserts keys, many to a statement (statementBatches: an import's 10,000 were a statement and
   * a round trip each), and gives their records in the order of `keys`. `updatedAt`: every key's,
   * else each its own createdAt.
   */
  async #insertMany(tx: Queryable, keys: readonly NewKey[], updatedAt?: Date): Promise<KeyRecord[]> {
    const items = keys.map((k) => ({ k, metadata: JSON.stringify(k.metadata) }))
    const out: KeyRecord[] = []
    for (const batch of statementBatches(items, (r) => listChars(r.k.scopes) + r.metadata.length + listChars(r.k.allowedCidrs) + r.k.name.length + (r.k.owner?.length ?? 0) + KEY_ROW_CHARS)) {
      const column = <T>(of: (k: NewKey) => T): T[] => batch.map((r) => of(r.k))
      const rows = rowsOf([
        ['id', 'text', column((k) => k.id)], ['key_hash', 'text', column((k) => k.keyHash)], ['name', 'text', column((k) => k.name)],
        ['type', 'text', column((k) => k.type)], ['status', 'text', column((k) => k.status)], ['scopes', 'text[]', column((k) => k.scopes)],
        ['owner', 'text', column((k) => k.owner)], ['metadata', 'jsonb', batch.map((r) => r.metadata)], ['allowed_cidrs', 'text[]', column((k) => k.allowedCidrs)],
        ['rate_limit', 'int', column((k) => k.rateLimit?.limit ?? null)], ['rate_limit_window_s', 'int', column((k) => k.rateLimit?.windowS ?? null)],
        ['rotation_interval_s', 'int', column((k) => k.rotationIntervalS)], ['rotated_from', 'text', column((k) => k.rotatedFrom)],
        ['grace_until', 'timestamptz', column((k) => k.graceUntil)], ['legacy', 'boolean', column((k) => k.legacy)],
        ['created_at', 'timestamptz', column((k) => k.createdAt)], ['updated_at', 'timestamptz', column((k) => updatedAt ?? k.createdAt)],
        ['expires_at', 'timestamptz', column((k) => k.expiresAt)],
      ])
      const inserted = await tx.query<KeyRow>(
        `INSERT INTO api_keys (id, key_hash, name, type, status, scopes, owner, metadata, allowed_cidrs, rate_limit, rate_limit_window_s,
           rotation_interval_s, rotated_from, grace_until, legacy, created_at, updated_at, expires_at)
         ${rows.query}
         RETURNING ${COLUMNS}`,
        rows.params,
      )
      // RETURNING's order is not promised: the records are put in the order given.
      const byId = new Map(inserted.map((r) => [r.id, r]))
      for (const r of batch) out.push(toRecord(byId.get(r.k.id) as KeyRow))
    }
    return out
  }

  /** Creates a key; the plaintext is in the result and nowhere else. */
  async create(input: unknown, actor: Actor): Promise<{ key: string; record: KeyRecord }> {
    const body = withNormalCidrs(assertValid<CreateKeyInput>(CreateKeyBody, input))
    checkMetadata(body.metadata)
    refuseKeyIn({ name: body.name, owner: body.owner, metadata: body.metadata })
    const now = this.#now()
    const expiresAt = futureDate(body.expires_at, now, 'expires_at') ?? null
    const generated = generateKey(this.#prefix)
    const record = await this.#commit(async (tx, changes) => {
      const k = await this.#insert(tx, {
        id: generated.id,
        keyHash: generated.hash,
        name: body.name,
        type: body.type,
        status: 'active',
        scopes: body.scopes ?? [],
        owner: body.owner ?? null,
        metadata: body.metadata ?? {},
        allowedCidrs: body.allowed_cidrs ?? [],
        rateLimit: rateLimitFrom(body.rate_limit),
        rotationIntervalS: body.rotation_interval_s ?? null,
        rotatedFrom: null,
        graceUntil: null,
        legacy: false,
        createdAt: now,
        expiresAt,
      })
      await this.#audit.write(tx, actor, {
        keyId: k.id,
        action: 'key.created',
        details: grantedDetails(k),
      })
      changes.push({ action: 'created', key: k })
      return k
    }, undefined, (db) => this.#stored(db, generated))
    return { key: generated.key, record }
  }

  /** Whether the key `generated` made is in the store (#commit's `kept`). */
  async #stored(db: Queryable, generated: { id: string; hash: string }): Promise<boolean> {
    return (await db.query('SELECT 1 FROM api_keys WHERE id = $1 AND key_hash = $2', [generated.id, generated.hash])).length > 0
  }

  /** A key as it is now (its status as the gateway judges it: see #asOf). */
  async get(id: string): Promise<KeyRecord> {
    const rows = await this.#db.query<KeyRow>(`SELECT ${COLUMNS} FROM api_keys WHERE id = $1`, [id])
    if (!rows[0]) throw keyNotFound(id)
    return this.#asOf(toRecord(rows[0]), this.#now())
  }

  /**
   * `k` with the status it has at `now`: a key past its expiry or grace is expired for the
   * gateway at once, while its row says active or rotating until the scheduler's next round
   * marks it (up to scheduler.interval_s later; the CLI on the embedded store runs none). What the admin
   * API and the CLI show, filter and count by (statusAtSql in SQL).
   */
  #asOf(k: KeyRecord, now: Date): KeyRecord {
    const status = statusAt(k, now)
    // Ended by its expiry or grace, which its row holds (before, found by a review, valid_until
    // read the row's updated_at, its creation or rotation, as for a key the scheduler ended).
    return status === k.status ? k : { ...k, status, validUntil: new Date(validUntilOf(k)) }
  }

  /** The keys of these ids that exist (one query), by id. */
  async getMany(ids: readonly string[]): Promise<Map<string, KeyRecord>> {
    if (ids.length === 0) return new Map()
    const rows = await this.#db.query<KeyRow>(`SELECT ${COLUMNS} FROM api_keys WHERE id = ANY($1)`, [ids])
    return new Map(rows.map((r) => [r.id, toRecord(r)]))
  }

  /** Newest first, filtered (by the status each key has now), one page at a time. */
  async list(query: unknown = {}): Promise<Page<KeyRecord>> {
    const q = assertValid<ListKeysInput>(ListKeysQuery, query, 'query')
    const now = this.#now()
    const where: string[] = []
    const params: unknown[] = []
    const add = (sql: string, ...values: unknown[]) => {
      params.push(...values)
      where.push(sql.replace(/\$(\d)/g, (_, n: string) => `$${params.length - values.length + Number(n)}`))
    }
    if (q.type) add('type = $1', q.type)
    // A key judged revoked, active or rotating is stored so (only 'expired' is judged from others):
    // said outright, the page is read from the (status, created_at, id) index (migration 0019).
    // The expired keys are read as two parts below, which say exactly what the judgement does.
    if (q.status && q.status !== 'expired') add(`${statusAtSql('api_keys', '$1')} = $2 AND status = $2`, now, q.status)
    if (q.owner) add('owner = $1', q.owner)
    if (q.scope) add('$1 = ANY(scopes)', q.scope)
    if (q.name) add(`name ILIKE $1 ESCAPE '\\'`, `%${q.name.replace(/[\\%_]/g, '\\$&')}%`)
    if (q.legacy !== undefined) add('legacy = $1', q.legacy)
    if (q.cursor) {
      const { at, id } = decodeCursor('keys', q.cursor)
      add('(created_at, id) < ($1, $2)', at, id)
    }
    const limit = q.limit ?? 50
    params.push(limit + 1)
    const order = `ORDER BY created_at DESC, id DESC LIMIT $${params.length}`
    const select = (...more: string[]) => {
      const all = [...where, ...more]
      return `SELECT ${COLUMNS} FROM api_keys${all.length ? ` WHERE ${all.join(' AND ')}` : ''}`
    }
    let sql = `${select()} ${order}`
    if (q.status === 'expired') {
      // The expired keys as the two parts an index reads each (expiredPartsSql, migration 0020):
      // the page of those marked so, and all the active or rotating ones past their end (kept few
      // by the scheduler), merged. Read in the page's order, PostgreSQL took those past their end
      // to be spread like the rest and walked every key newer than the page's to find them; as one
      // OR, it did so too, or read all the keys marked expired and sorted them. Without the
      // judgement's CASE, whose rows it cannot estimate: with it, it read every key marked expired.
      params.push(now)
      const [marked, pastEnd] = expiredPartsSql('api_keys', `$${params.length}`)
      sql = `SELECT * FROM ((${select(marked)} ${order}) UNION ALL (${select(pastEnd)})) k ${order}`
    }
    const rows = await this.#db.query<KeyRow>(sql, params)
    return pageOf('keys', rows.map((r) => this.#asOf(toRecord(r), now)), limit, (k) => ({ at: k.createdAt, id: k.id }))
  }

  /**
   * Changes an active key. The keys it replaced that are still in their grace period are the same
   * credential until then, and take the same change (its rotation interval excepted, which only
   * an active key has): narrowing a key's scopes, addresses or expiry must not leave its
   * predecessor working with the old ones for days. Each changed key gets its own audit row.
   * Only a field whose value differs from the key's is a change: a PATCH restating the key as it
   * is writes nothing, and makes no gateway drop the key from its cache.
   */
  async update(id: string, input: unknown, actor: Actor): Promise<KeyRecord> {
    const body = withNormalCidrs(assertValid<UpdateKeyInput>(UpdateKeyBody, input))
    checkMetadata(body.metadata)
    refuseKeyIn({ name: body.name, owner: body.owner, metadata: body.metadata })
    const asked = fieldChanges(body, futureDate(body.expires_at, this.#now(), 'expires_at'))
    const shared = asked.filter((c) => c.field !== 'rotation_interval_s')
    return await this.#commit(async (tx, keyChanges) => {
      const { key: old, lineage } = await this.#lockLineage(tx, id)
      // As of when the key is held (see rotate).
      const now = this.#now()
      if (old.status === 'revoked' || old.status === 'expired') throw new KeygateError('key_not_active', `key ${id} is ${old.status} and can no longer be changed`)
      if (old.status === 'rotating') throw new KeygateError('key_not_active', `key ${id} was rotated${await this.#useInstead(tx, old, now, 'change')}`)
      if (old.expiresAt && old.expiresAt <= now) throw new KeygateError('key_not_active', `key ${id} is expired and can no longer be changed`)
      const own = differing(asked, old)
      const fields = new Set(own.map((c) => c.field))
      // A rotation deadline announced under the old interval no longer applies: the scheduler
      // announces the new one (and enforces only an announced deadline).
      if (fields.has('rotation_interval_s')) await tx.query(`DELETE FROM api_key_notices WHERE key_id = $1 AND kind = 'rotation'`, [id])
      // Likewise an expiry announced for the old date: the new one is announced when it comes
      // within the notice period, even if it is the date announced before (moved away and back).
      if (fields.has('expires_at')) await tx.query(`DELETE FROM api_key_notices WHERE key_id = $1 AND kind = 'expiry'`, [id])
      const written: KeyRecord[] = []
      const write = async (k: KeyRecord, changes: FieldChange[], details: Record<string, unknown> = {}) => {
        const params: unknown[] = [k.id, now]
        const sets = ['updated_at = $2']
        for (const [column, value] of changes.flatMap((c) => c.columns)) {
          params.push(value)
          sets.push(`${column} = $${params.length}`)
        }
        const rows = await tx.query<KeyRow>(`UPDATE api_keys SET ${sets.join(', ')} WHERE id = $1 RETURNING ${COLUMNS}`, params)
        // A date as every answer and audit row gives one, UTC with milliseconds (before, found by
        // a review: as sent, "2099-07-01t00:00:00z" or "+01:00" offsets).
        const values = Object.fromEntries(changes.map((c) => [c.field, c.value instanceof Date ? c.value.toISOString() : body[c.field]]))
        await this.#audit.write(tx, actor, { keyId: k.id, action: 'key.updated', details: { changed: changes.map((c) => c.field), ...values, ...details } })
        written.push(toRecord(rows[0] as KeyRow))
      }
      if (own.length > 0) await write(old, own)
      // Each predecessor is compared with its own row, as the key is with its own.
      for (const k of lineage) {
        if (k.id === id || k.status !== 'rotating' || k.graceUntil === null || k.graceUntil <= now) continue
        const theirs = differing(shared, k)
        if (theirs.length > 0) await write(k, theirs, { through_successor: id })
      }
      keyChanges.push(...written.map((k) => ({ action: 'updated' as const, key: k })))
      return own.length > 0 ? (written[0] as KeyRecord) : old
    })
  }

  async revoke(id: string, reason: string | undefined, actor: Actor): Promise<KeyRecord> {
    // The API's schema: the CLI on the store refuses what the API refuses (an empty reason, control characters).
    assertValid<RevokeInput>(RevokeBody, reason === undefined ? {} : { reason })
    refuseKeyIn({ reason })
    // Its commit made and the answer lost (the connection dropped between), a revocation is kept
    // as create's and rotate's are: it succeeds, and the gateways are told. Before (found by a
    // review), the caller got a 503 and no cache was told, and the retry it made was refused
    // as already revoked, telling none either: the key went on working from every cache until
    // the store check (cache.store_check_s; the cache's TTL with the check off).
    let revokedAt: Date | undefined
    return await this.#commit(async (tx, changes) => {
      const { key: old } = await this.#lockLineage(tx, id)
      // As of when the key is held (see rotate).
      const now = this.#now()
      revokedAt = now
      if (old.status === 'revoked') throw new KeygateError('key_not_active', `key ${id} is already revoked`)
      const rows = await tx.query<KeyRow>(
        `UPDATE api_keys SET status = 'revoked', revoked_at = $2, revoked_reason = $3, updated_at = $2 WHERE id = $1 RETURNING ${COLUMNS}`,
        [id, now, reason ?? null],
      )
      // The status the key had as every answer gave it (statusAt), not its row's: a key past its
      // expiry or grace reads `active` or `rotating` there until the scheduler's next round, which
      // then writes no key.expired for a key revoked meanwhile (before, found by a review, the
      // trail of an expired key read as a live key revoked).
      await this.#audit.write(tx, actor, { keyId: id, action: 'key.revoked', details: { reason: reason ?? null, previous_status: statusAt(old, now) } })
      const record = toRecord(rows[0] as KeyRow)
      const ended = await this.#endPredecessors(tx, id, now, `successor ${id} revoked`, actor)
      changes.push({ action: 'revoked', key: record }, ...ended.map((k) => ({ action: 'revoked' as const, key: k })))
      return record
    }, undefined, async (db) => {
      const rows = await db.query<{ revoked_at: Date | null }>(`SELECT revoked_at FROM api_keys WHERE id = $1 AND status = 'revoked'`, [id])
      return revokedAt !== undefined && rows[0]?.revoked_at?.getTime() === revokedAt.getTime()
    })
  }

  /**
   * Revokes the keys that `id` replaced and that are still in their grace period (a lineage
   * rotated twice has two): revoking a key, or rotating it with force, is done when it leaks,
   * and the key it replaced is as much in the open. Each gets its own audit row.
   */
  async #endPredecessors(tx: Queryable, id: string, now: Date, reason: string, actor: Actor): Promise<KeyRecord[]> {
    const rows = await tx.query<KeyRow>(
      `${LINEAGE} UPDATE api_keys SET status = 'revoked', revoked_at = $2, revoked_reason = $3, updated_at = $2
       WHERE id IN (SELECT id FROM lineage) AND id <> $1 AND status = 'rotating' AND grace_until > $2
       RETURNING ${COLUMNS}`,
      [id, now, reason],
    )
    const records = rows.map(toRecord)
    // Each was rotating, in its grace period (the update's condition), unless past its expiry.
    await this.#audit.writeMany(tx, actor, records.map((k) => ({ keyId: k.id, action: 'key.revoked', details: { reason, previous_status: statusAt({ ...k, status: 'rotating', revokedAt: null, revokedReason: null }, now) } })))
    return records
  }

  /**
   * The end of a rotate or update refusal of a replaced key: which key of the lineage can be
   * rotated (`verb`) or changed instead, the live end of its chain of successors, or that none
   * can. Naming the direct successor sent people from one revoked key to the next (found by a
   * review: a forced rotation revokes the keys before it), and an update refusal, which named it
   * still, from one rotated key to the next (found by a later review).
   */
  async #useInstead(tx: Queryable, old: KeyRecord, now: Date, verb: 'rotate' | 'change'): Promise<string> {
    if (old.replacedBy === null) return ''
    const rows = await tx.query<KeyRow>(
      `${SUCCESSORS} SELECT ${columnsOf('k')} FROM successors s JOIN api_keys k ON k.id = s.id ORDER BY s.depth DESC LIMIT 1`,
      [old.replacedBy, SUCCESSOR_WALK_MAX],
    )
    const last = rows[0] === undefined ? undefined : toRecord(rows[0])
    const first = `; it was replaced by ${old.replacedBy}`
    if (last === undefined) return first
    if (last.replacedBy !== null) return `${first}, whose lineage runs on past ${SUCCESSOR_WALK_MAX} keys: follow replaced_by from ${last.id}`
    const live = last.status === 'active' && !(last.expiresAt && last.expiresAt <= now)
    if (!live) return `${first}, and no key of its lineage can be ${verb === 'rotate' ? 'rotated' : 'changed'} (the last, ${last.id}, is ${last.status === 'active' ? 'expired' : last.status}): create a new key`
    return last.id === old.replacedBy ? `${first}, ${verb} that key instead` : `${first}; the active key of its lineage is ${last.id}, ${verb} that key instead`
  }

  /**
   * Replaces a key with a new one, which keeps the old one's expiry. The old key stays valid until
   * its type's grace deadline (grace_until; its expiry ends it first when sooner, as ever), or
   * dies now when `force` is set or the grace period is zero. One transaction: a failure at any
   * point leaves the old key as it was and no new row; the row lock serialises concurrent
   * rotations, so the second one finds the key already rotating and is refused.
   */
  async rotate(id: string, options: { force?: boolean }, actor: Actor): Promise<{ key: string; record: KeyRecord; previous: KeyRecord }> {
    const generated = generateKey(this.#prefix)
    const result = await this.#commit(async (tx, changes) => {
      const { key: old } = await this.#lockLineage(tx, id)
      // The time once the key is held, not before: another transaction on its lineage may hold
      // it up to store.query_timeout_ms, and the rotation is judged and stamped as of when it
      // runs (before, found by a review, as of when it was asked).
      const now = this.#now()
      // The status as every answer gives it (statusAt): a rotated key past its grace is expired,
      // though its row says rotating until the scheduler's next round (before, found by a review,
      // the refusal said "is rotating" where get and list said expired).
      if (old.status !== 'active') throw new KeygateError('key_not_active', `key ${id} is ${statusAt(old, now)} and cannot be rotated${await this.#useInstead(tx, old, now, 'rotate')}`)
      if (old.expiresAt && old.expiresAt <= now) throw new KeygateError('key_not_active', `key ${id} is expired and cannot be rotated`)
      const fresh = await this.#insert(tx, {
        ...old,
        id: generated.id,
        keyHash: generated.hash,
        status: 'active',
        rotatedFrom: old.id,
        graceUntil: null,
        legacy: false,
        createdAt: now,
      })
      const graceMs = this.#graceHours[old.type] * 3_600_000
      const ends = options.force === true || graceMs === 0
      const why = options.force === true ? 'rotated (forced)' : 'rotated'
      const rows = ends
        ? await tx.query<KeyRow>(
            `UPDATE api_keys SET status = 'revoked', revoked_at = $2, revoked_reason = $3, replaced_by = $4, updated_at = $2 WHERE id = $1 RETURNING ${COLUMNS}`,
            [id, now, why, fresh.id],
          )
        : await tx.query<KeyRow>(
            `UPDATE api_keys SET status = 'rotating', grace_until = $3, replaced_by = $4, updated_at = $2 WHERE id = $1 RETURNING ${COLUMNS}`,
            [id, now, new Date(now.getTime() + graceMs), fresh.id],
          )
      const previous = toRecord(rows[0] as KeyRow)
      await this.#audit.write(tx, actor, {
        keyId: id,
        action: 'key.rotated',
        details: { replaced_by: fresh.id, force: options.force === true, grace_until: previous.graceUntil?.toISOString() ?? null },
      })
      await this.#audit.write(tx, actor, { keyId: fresh.id, action: 'key.created', details: { rotated_from: id, ...grantedDetails(fresh) } })
      // "The old key dies now": so do the older ones of its lineage still in grace.
      const ended = ends ? await this.#endPredecessors(tx, id, now, `successor ${id} ${why}`, actor) : []
      changes.push({ action: 'rotated', key: fresh, previous }, ...ended.map((k) => ({ action: 'revoked' as const, key: k })))
      return { record: fresh, previous }
    }, undefined, (db) => this.#stored(db, generated))
    return { key: generated.key, record: result.record, previous: result.previous }
  }

  /**
   * Imports keys of the replaced system (UUID v4 strings stored as SHA-256 hex). All rows are
   * checked first and their problems reported (up to MAX_LISTED_PROBLEMS: the check stops at the
   * row that reaches them); then all are written in one transaction or none.
   */
  async importLegacy(input: unknown, actor: Actor, defaults: { type?: KeyType } = {}): Promise<KeyRecord[]> {
    const now = this.#now()
    const check = await checkImportRows(input, now)
    const existing = await this.#db.query<{ key_hash: string }>('SELECT key_hash FROM api_keys WHERE key_hash = ANY($1)', [[...check.seen.keys()]])
    for (const e of existing) {
      const row = check.seen.get(e.key_hash) as number
      check.problems[row - 1]?.push(`row ${row}: key_hash is already in the store`)
    }
    refuseImportProblems(check)
    const { rows } = check
    let records: KeyRecord[]
    // Until COMMIT is sent, a failure leaves nothing behind: the transaction is rolled back.
    let committing = false
    try {
      records = await this.#commit(async (tx, changes) => {
        const out = await this.#insertMany(
          tx,
          rows.map((row) => ({
            id: newKeyId(),
            keyHash: row.key_hash,
            name: row.name,
            type: row.type ?? defaults.type ?? 'service',
            status: row.expires_at && new Date(row.expires_at) <= now ? 'expired' : 'active',
            scopes: row.scopes ?? [],
            owner: row.owner ?? null,
            metadata: row.metadata ?? {},
            // Carried over (before, found by a migration review, refused as unknown fields: an
            // imported key took any address and its type's default limit until changed after).
            allowedCidrs: row.allowed_cidrs ?? [],
            rateLimit: rateLimitFrom(row.rate_limit),
            rotationIntervalS: null,
            rotatedFrom: null,
            graceUntil: null,
            legacy: true,
            // A row without its time is taken as made now, or, when it has expired already, at
            // its expiry, the latest it can have been made (before, found by a review, it was
            // made after it expired).
            createdAt: row.created_at ? new Date(row.created_at) : row.expires_at && new Date(row.expires_at) < now ? new Date(row.expires_at) : now,
            expiresAt: row.expires_at ? new Date(row.expires_at) : null,
          })),
          now,
        )
        await this.#audit.writeMany(tx, actor, out.map((k) => ({ keyId: k.id, action: 'key.imported', details: { ...grantedDetails(k), created_at: k.createdAt.toISOString() } })))
        for (const k of out) changes.push({ action: 'imported', key: k })
        return out
      }, () => {
        committing = true
      })
    } catch (err) {
      if (sqlState(err) === UNIQUE_VIOLATION) throw new KeygateError('import_invalid', 'nothing imported: a key_hash was added to the store meanwhile', undefined, { cause: err })
      // A statement the store cancelled (another import of the same rows held it past
      // store.query_timeout_ms) or a lost connection: said plainly that nothing was imported,
      // so that the import is tried again rather than looked for (found by a review).
      if (!committing && isKeygateError(err, 'store_unavailable')) throw new KeygateError('store_unavailable', `nothing imported (the import was rolled back): ${err.message}`, err.details, { cause: err })
      throw err
    }
    return records
  }

  /** Finds the stored key a presented one names, comparing hashes in constant time. */
  /**
   * The stored key a presented one names, with `changeXid`: the transaction that last changed its
   * row (api_keys.change_xid, migration 0009), which the gateway's store check compares with the
   * changes it reads (a cached key that is as the store has it now is kept).
   */
  async lookup(presented: string): Promise<{ key: KeyRecord; changeXid: number } | { key?: undefined; reason: 'malformed' | 'unknown' | 'wrong_secret'; keyId?: string }> {
    const parsed = parseKey(presented, this.#prefixes, this.#acceptLegacy)
    if (!parsed) return { reason: 'malformed' }
    type Row = KeyRow & { change_xid: string | null }
    // Only an xid this cluster gave (below its counter): a row restored from another cluster's
    // dump keeps that cluster's, which a later change here may be stamped with again (found by a
    // review: a revocation so stamped left the key cached).
    const changeXid = `CASE WHEN change_xid < pg_snapshot_xmax(pg_current_snapshot()) THEN change_xid::text END AS change_xid`
    if (parsed.kind === 'legacy') {
      const rows = await this.#db.query<Row>(`SELECT ${COLUMNS}, ${changeXid} FROM api_keys WHERE key_hash = $1 AND legacy`, [parsed.hash])
      return rows[0] ? { key: toRecord(rows[0]), changeXid: xidNumber(rows[0].change_xid) } : { reason: 'unknown' }
    }
    const rows = await this.#db.query<Row>(`SELECT ${COLUMNS}, ${changeXid} FROM api_keys WHERE id = $1`, [parsed.id])
    if (!rows[0]) return { reason: 'unknown', keyId: parsed.id }
    if (!hashesEqual(rows[0].key_hash, parsed.hash)) return { reason: 'wrong_secret', keyId: parsed.id }
    return { key: toRecord(rows[0]), changeXid: xidNumber(rows[0].change_xid) }
  }

  /** Whether a presented key may be used now (from `address`, when given). */
  async validate(presented: string, options: { address?: string } = {}): Promise<Validation> {
    const found = await this.lookup(presented)
    if (!found.key) return { valid: false, code: 'key_invalid', reason: found.reason, ...(found.keyId ? { keyId: found.keyId } : {}) }
    const verdict = evaluateKey(found.key, this.#now(), options.address)
    return verdict.ok ? { valid: true, key: found.key } : { valid: false, code: verdict.code, reason: verdict.reason, keyId: found.key.id }
  }

  /**
   * The first start's admin key: created only when no usable key holds the `admin` scope. The
   * advisory lock makes instances that start together create one key, not one each. Returns
   * the plaintext once, or undefined when an admin key already exists. `show` hands the
   * plaintext over as the last step before the key is committed: when it throws (the key could
   * not be shown), nothing is kept, and the next start makes one again rather than leaving a key
   * no one has. (The commit can still fail after it: the caller says the key shown was not kept.)
   */
  async ensureAdminKey(actor: Actor, show?: (made: { key: string; record: KeyRecord }) => void | Promise<void>): Promise<{ key: string; record: KeyRecord } | undefined> {
    const now = this.#now()
    const generated = generateKey(this.#prefix)
    const record = await this.#commit(async (tx, changes) => {
      await tx.query('SELECT pg_advisory_xact_lock($1)', [0x6b67_6164 /* "kgad" */])
      const existing = await tx.query<{ n: number }>(
        `SELECT count(*)::int AS n FROM api_keys WHERE 'admin' = ANY(scopes)
           AND (status = 'active' OR (status = 'rotating' AND grace_until > $1)) AND (expires_at IS NULL OR expires_at > $1)`,
        [now],
      )
      if ((existing[0]?.n ?? 0) > 0) return undefined
      const k = await this.#insert(tx, {
        id: generated.id,
        keyHash: generated.hash,
        name: 'bootstrap admin',
        type: 'system',
        status: 'active',
        scopes: ['admin'],
        owner: null,
        metadata: { created_by: 'first start' },
        allowedCidrs: [],
        rateLimit: null,
        rotationIntervalS: null,
        rotatedFrom: null,
        graceUntil: null,
        legacy: false,
        createdAt: now,
        expiresAt: null,
      })
      await this.#audit.write(tx, actor, { keyId: k.id, action: 'key.created', details: { name: k.name, type: k.type, scopes: k.scopes, reason: 'no admin credential configured' } })
      changes.push({ action: 'created', key: k })
      return k
    }, async (k) => {
      // Last before the commit, after everything else the transaction writes (the event's
      // deliveries): only the commit itself can still fail once the key is shown.
      if (k) await show?.({ key: generated.key, record: k })
    })
    if (!record) return undefined
    return { key: generated.key, record }
  }

  /**
   * Keys that stop working within `withinMs`, soonest first (then by id), each with what ends it:
   * active keys whose expiry or announced rotation deadline (the scheduler expires a key not
   * rotated by then) falls in the window, and rotating keys whose grace (or expiry, or the
   * announced rotation deadline of the active key that replaced them, whichever is first) ends in
   * it (core/keys/ends.ts). One page at a time: `cursor` is the previous page's next cursor, the end time and
   * id of its last key (every time that ends a key is written in milliseconds, as a cursor holds).
   */
  async expiring(withinMs: number, options: { limit?: number; cursor?: string } = {}): Promise<Page<{ key: KeyRecord; endsAt: Date; reason: KeyEndReason }>> {
    const now = this.#now()
    const until = new Date(now.getTime() + withinMs)
    const limit = options.limit ?? 100
    const params: unknown[] = [now, until, limit + 1]
    let after = ''
    if (options.cursor !== undefined) {
      const { at, id } = decodeCursor('expiring', options.cursor)
      params.push(at, id)
      after = 'AND (e.ends_at, k.id) > ($4, $5)'
    }
    const rows = await this.#db.query<KeyRow & { ends_at: Date; reason: KeyEndReason }>(
      `SELECT ${columnsOf('k')}, e.ends_at, e.end_reason AS reason
       FROM ${KEY_ENDS_FROM}
       WHERE e.ends_at > $1 AND e.ends_at <= $2 ${after} ORDER BY e.ends_at, k.id LIMIT $3`,
      params,
    )
    const items = rows.map((r) => ({ key: toRecord(r), endsAt: new Date(r.ends_at), reason: r.reason }))
    return pageOf('expiring', items, limit, (e) => ({ at: e.endsAt, id: e.key.id }))
  }

  /** Counts of keys by type and by the status each has now (see #asOf). */
  async stats(withinDays = 7): Promise<{
    total: number
    byType: Record<KeyType, number>
    byStatus: Record<KeyStatus, number>
    legacy: number
    expiringSoon: number
  }> {
    const now = this.#now()
    const rows = await this.#db.query<{ type: KeyType; status: KeyStatus; n: number; legacy: number; expiring: number }>(
      `SELECT k.type, ${statusAtSql('k', '$1')} AS status, count(*)::int AS n, count(*) FILTER (WHERE k.legacy)::int AS legacy,
         count(*) FILTER (WHERE k.status = 'active' AND e.ends_at > $1 AND e.ends_at <= $2)::int AS expiring
       FROM ${KEY_ENDS_FROM} GROUP BY 1, 2`,
      [now, new Date(now.getTime() + withinDays * 86_400_000)],
    )
    const byType = Object.fromEntries(KEY_TYPES.map((t) => [t, 0])) as Record<KeyType, number>
    const byStatus: Record<KeyStatus, number> = { active: 0, rotating: 0, revoked: 0, expired: 0 }
    let total = 0
    let legacy = 0
    let expiringSoon = 0
    for (const r of rows) {
      byType[r.type] += r.n
      byStatus[r.status] += r.n
      total += r.n
      legacy += r.legacy
      expiringSoon += r.expiring
    }
    return { total, byType, byStatus, legacy, expiringSoon }
  }
}
