// The audit log: who did what to which key, from where. Details are sealed with AES-256-GCM:
// a random 96-bit nonce per row, every other field of the row bound in as associated data (its
// id, key id, action, actor, address and time: details moved to another row, or a row whose
// actor, address or time was changed, fail to open), and the id of the encryption key stored
// beside them (so rows sealed before a key rotation still open with the previous key).
// Rows of format 1 (written before migration 0006, or with `audit.seal_format: 1` while older
// instances must still read new rows) bind only the id, key id and action; they open as before.
// A row's format is itself bound: marking a format 2 row as format 1 fails too.
// The same keys also seal the secrets keygate must read back (webhook signing secrets), with a
// key derived from each (HKDF), bound to what each belongs to: `sealSecret` / `openSecret`.
import { createCipheriv, createDecipheriv, hkdfSync, randomBytes, randomUUID, hash } from 'node:crypto'
import { chmodSync, existsSync, lstatSync, readFileSync, statSync } from 'node:fs'
import { join, resolve } from 'node:path'
import { DEFAULT_DATA_DIR, rowsOf, statementBatches, type Db, type Queryable } from './db.ts'
import { decodeCursor, encodeCursor, type CursorPosition, type Page } from './cursor.ts'
import { isKeygateError, KeygateError, systemErrorWords } from './errors.ts'
import { createWhole, replaceWhole } from './files.ts'
import type { Logger } from './log.ts'
import { mapInSlices } from './slices.ts'

export interface Actor {
  /** Admin key id, `token` for the bootstrap token, `cli:<user>` (`cli:<uid>` for a uid without a name), or `system`. */
  actor: string
  address?: string | null | undefined
}

export interface AuditEntry {
  keyId?: string | null
  action: string
  details?: Record<string, unknown>
}

/**
 * Whether a row's details opened: `verified` (decrypted and authenticated: nothing in the row was
 * changed), `key_missing` (sealed with an encryption key that is not configured), `failed` (the
 * row was altered, damaged or does not belong here). Only a verified row has details.
 */
export type AuditIntegrity = 'verified' | 'key_missing' | 'failed'

export interface AuditRecord {
  id: string
  keyId: string | null
  action: string
  actor: string
  address: string | null
  details: Record<string, unknown> | null
  integrity: AuditIntegrity
  /** Why the row did not open (not verified). */
  problem?: string
  /** The id of the encryption key a `key_missing` row was sealed with. */
  sealedWith?: string
  createdAt: Date
}

/** An audit row as the admin API answers it, and `keygate api-key audit --json` prints it. */
export function auditJson(r: AuditRecord) {
  return { id: r.id, key_id: r.keyId, action: r.action, actor: r.actor, address: r.address, details: r.details, integrity: r.integrity, sealed_with: r.sealedWith ?? null, created_at: r.createdAt.toISOString() }
}

/** What the audit log can be listed by (all given must hold); `before` is the cursor of the last row of the previous page. */
export interface AuditFilter {
  keyId?: string | undefined
  action?: string | undefined
  actor?: string | undefined
  before?: CursorPosition | undefined
}

export function encryptionKeyId(key: Buffer): string {
  return hash('sha256', Buffer.concat([Buffer.from('keygate-audit-key:'), key]), 'hex').slice(0, 16)
}

/** The fields of an audit row that are bound to its sealed details. */
export interface SealedRow {
  id: string
  keyId: string | null
  action: string
  actor: string
  address: string | null
  createdAt: Date
}

/** Format 2, written by default: every field, as a JSON array (no separator a field could forge). */
export const AUDIT_FORMAT = 2

/** The formats a row may be sealed in (`audit.seal_format`): 1 only while older versions must still read new rows. */
export type SealFormat = 1 | 2

function aad(row: SealedRow, format: number): Buffer {
  if (format === 1) return Buffer.from(`${row.id}\n${row.keyId ?? ''}\n${row.action}`)
  return Buffer.from(JSON.stringify([format, row.id, row.keyId, row.action, row.actor, row.address, row.createdAt.getTime()]))
}

/** HKDF info of the key that seals stored secrets (domain separation from audit details). */
const SECRET_KEY_INFO = 'keygate stored secrets v1'

export class AuditCipher {
  readonly #current: { id: string; key: Buffer }
  readonly #keys: Map<string, Buffer>
  readonly #secretKeys = new Map<string, Buffer>()

  /** Whether the keys are an embedded store's (one process's: no other instances to agree with), for the messages. */
  readonly embedded: boolean

  /** Where `current` was read from when it is the embedded store's key file's, for the messages that name it. */
  readonly keyFile: string | undefined

  /**
   * `current` seals new rows; `previous` only opens older ones. Each is 32 bytes. `embedded`: the
   * keys are an embedded store's, `keyFile` set when `current` was read from its key file.
   */
  constructor(current: Buffer, previous: readonly Buffer[] = [], embedded?: { keyFile?: string }) {
    for (const k of [current, ...previous]) {
      if (k.length !== 32) throw new KeygateError('config_invalid', 'an audit encryption key must be 32 bytes')
    }
    this.#current = { id: encryptionKeyId(current), key: current }
    this.#keys = new Map([...previous, current].map((k) => [encryptionKeyId(k), k]))
    this.embedded = embedded !== undefined
    this.keyFile = embedded?.keyFile
  }

  get currentKeyId(): string {
    return this.#current.id
  }

  /** The key that seals stored secrets: derived from an encryption key, so it never seals audit details too. */
  #secretKey(encKeyId: string): Buffer | undefined {
    let derived = this.#secretKeys.get(encKeyId)
    if (derived === undefined) {
      const key = this.#keys.get(encKeyId)
      if (!key) return undefined
      derived = Buffer.from(hkdfSync('sha256', key, Buffer.alloc(0), SECRET_KEY_INFO, 32))
      this.#secretKeys.set(encKeyId, derived)
    }
    return derived
  }

  /**
   * Seals a secret keygate must read back (a webhook's signing secret) under the current key,
   * bound to `context` (what it belongs to: sealed text moved to another row fails to open):
   * `<key id>.<base64url of nonce, ciphertext and tag>`.
   */
  sealSecret(context: string, secret: string): string {
    const nonce = randomBytes(12)
    const cipher = createCipheriv('aes-256-gcm', this.#secretKey(this.#current.id) as Buffer, nonce)
    cipher.setAAD(Buffer.from(context))
    const body = Buffer.concat([nonce, cipher.update(secret, 'utf8'), cipher.final(), cipher.getAuthTag()])
    return `${this.#current.id}.${body.toString('base64url')}`
  }

  /** The secret `sealSecret(context, …)` sealed; `what` names it in errors. */
  openSecret(context: string, sealed: string, what: string): string {
    const dot = sealed.indexOf('.')
    const encKeyId = sealed.slice(0, dot)
    const key = dot > 0 ? this.#secretKey(encKeyId) : undefined
    if (dot > 0 && !key) throw new KeygateError('secret_decrypt_failed', `${what} was sealed with encryption key ${encKeyId}, which is not configured (add it to KEYGATE_PREVIOUS_ENCRYPTION_KEYS)`)
    const body = Buffer.from(sealed.slice(dot + 1), 'base64url')
    if (!key || body.length < 12 + 16) throw new KeygateError('secret_decrypt_failed', `${what} is damaged`)
    try {
      const decipher = createDecipheriv('aes-256-gcm', key, body.subarray(0, 12))
      decipher.setAAD(Buffer.from(context))
      decipher.setAuthTag(body.subarray(body.length - 16))
      return Buffer.concat([decipher.update(body.subarray(12, body.length - 16)), decipher.final()]).toString('utf8')
    } catch {
      throw new KeygateError('secret_decrypt_failed', `${what} failed authentication: it was altered or does not belong here`)
    }
  }

  seal(row: SealedRow, details: Record<string, unknown>, format: SealFormat = AUDIT_FORMAT): { encKeyId: string; nonce: Buffer; details: Buffer } {
    const nonce = randomBytes(12)
    const cipher = createCipheriv('aes-256-gcm', this.#current.key, nonce)
    cipher.setAAD(aad(row, format))
    const body = Buffer.concat([cipher.update(JSON.stringify(details), 'utf8'), cipher.final(), cipher.getAuthTag()])
    return { encKeyId: this.#current.id, nonce, details: body }
  }

  /** Whether rows sealed with encryption key `encKeyId` can be opened (it is the current key or a previous one). */
  knows(encKeyId: string): boolean {
    return this.#keys.has(encKeyId)
  }

  /**
   * The details of a row, or `audit_decrypt_failed` with `details.integrity`: `key_missing` when
   * the row names a key that is not configured and no configured key opens it, `failed` when it
   * does not authenticate. A row naming a key that is not configured is tried with every key
   * that is: the key id is not among the sealed data (formats 1 and 2 leave it out), so a row
   * whose key id was changed in the store opened with none and read as sealed with a key since
   * dropped, the harmless state after a rotation, where it was altered (found by a review).
   * A row whose nonce is not 96 bits or whose details are shorter than a tag was sealed by no key:
   * it is `failed` whatever key it names (before, found by a review, one naming a key that is not
   * configured was `key_missing`, sealed with that key, and as the newest row kept every instance
   * with the right keys from starting).
   */
  open(row: SealedRow, format: number, encKeyId: string, nonce: Uint8Array, sealed: Uint8Array): Record<string, unknown> {
    const rowId = row.id
    const body = Buffer.from(sealed)
    if (body.length < 16 || nonce.length !== 12) throw new KeygateError('audit_decrypt_failed', `audit row ${rowId} is damaged`, { integrity: 'failed' })
    const key = this.#keys.get(encKeyId)
    if (!key) {
      const opener = [...this.#keys].find(([, k]) => this.#decrypt(k, row, format, nonce, body) !== undefined)?.[0]
      if (opener !== undefined) {
        throw new KeygateError('audit_decrypt_failed', `audit row ${rowId} names encryption key ${encKeyId}, but was sealed with configured key ${opener}: the row was altered in the store`, { integrity: 'failed' })
      }
      throw new KeygateError('audit_decrypt_failed', `audit row ${rowId} was sealed with encryption key ${encKeyId}, which is not configured (add it to KEYGATE_PREVIOUS_ENCRYPTION_KEYS)`, { integrity: 'key_missing' })
    }
    const details = this.#decrypt(key, row, format, nonce, body)
    if (details === undefined) throw new KeygateError('audit_decrypt_failed', `audit row ${rowId} failed authentication: it was altered or does not belong here`, { integrity: 'failed' })
    return details
  }

  /** The row's details opened with `key`; undefined when they do not authenticate. */
  #decrypt(key: Buffer, row: SealedRow, format: number, nonce: Uint8Array, body: Buffer): Record<string, unknown> | undefined {
    try {
      const decipher = createDecipheriv('aes-256-gcm', key, Buffer.from(nonce))
      decipher.setAAD(aad(row, format))
      decipher.setAuthTag(body.subarray(body.length - 16))
      const plain = Buffer.concat([decipher.update(body.subarray(0, body.length - 16)), decipher.final()])
      return JSON.parse(plain.toString('utf8')) as Record<string, unknown>
    } catch {
      return undefined
    }
  }
}

/** The encryption key the embedded store generates for itself when none is configured. */
export function embeddedKeyFile(dataDir: string | undefined): string {
  return join(resolve(dataDir ?? DEFAULT_DATA_DIR), 'encryption.key')
}

/**
 * The encryption keys (their ids) a store holds something sealed with: audit rows and webhook
 * secrets. Not the store's key check (checkStoreKey): a key that sealed nothing else may be lost.
 */
export async function sealedKeyIds(db: Queryable): Promise<string[]> {
  const rows = await db.query<{ id: string }>(`SELECT enc_key_id AS id FROM api_key_audit_log UNION ${WEBHOOK_SECRET_KEY_IDS}`)
  return rows.map((r) => r.id)
}

/** The keys webhook secrets are sealed with (`<key id>.<base64url>`). */
const WEBHOOK_SECRET_KEY_IDS = `SELECT split_part(s, '.', 1) FROM webhooks, unnest(ARRAY[sealed_secret, sealed_previous_secret]) AS s WHERE s IS NOT NULL`

/**
 * Encryption key ids as a message names them: "encryption key a", "encryption keys a and b".
 * Several were joined with commas where the message meant one key (found by a review).
 */
function encryptionKeys(ids: readonly string[]): string {
  return ids.length === 1 ? `encryption key ${ids[0]}` : `encryption keys ${new Intl.ListFormat('en').format(ids)}`
}

/** `encryption_key_missing` for a process whose keys lack `ids`, the keys `what` was sealed with (one, or several). */
function keyMissing(what: string, ids: readonly string[], cipher: AuditCipher): KeygateError {
  // Several keys (webhook secrets sealed during a rotation): named as a list, and the advice is
  // to set one of them (before: "set KEYGATE_ENCRYPTION_KEY to the key this store was started
  // with (a, b) again").
  const one = ids.length === 1 ? ids[0] : undefined
  const anyOf = one ?? new Intl.ListFormat('en', { type: 'disjunction' }).format(ids)
  const noneOf = one ?? 'any of them'
  const unknown = `${what} sealed with ${encryptionKeys(ids)}, ${one ? 'which is not configured' : 'none of which is configured'}`
  if (cipher.keyFile !== undefined) {
    // The embedded store's own key in use: no other instance to agree with, but a start with
    // KEYGATE_ENCRYPTION_KEY before (the key file's stays a previous key then), or a key file
    // replaced. Before, the advice was the PostgreSQL deployment's.
    return new KeygateError(
      'encryption_key_missing',
      `${unknown} (the current key is ${cipher.currentKeyId}, from the embedded store's key file ${cipher.keyFile}, and no key of KEYGATE_PREVIOUS_ENCRYPTION_KEYS is ${noneOf}): set KEYGATE_ENCRYPTION_KEY to the key this store was started with (${anyOf}) again, or, if ${one ?? 'that key'} was the key file's, restore the file from its backup; rows this process sealed could not be read by a start with that key`,
    )
  }
  if (cipher.embedded) {
    // A configured key on the embedded store (its key file's, if any, a previous key): one
    // process's store, so the key to set is the one it was last started with, not the one of
    // other instances (before, found by a review, the advice was PostgreSQL's).
    return new KeygateError(
      'encryption_key_missing',
      `${unknown} (the current key is ${cipher.currentKeyId}, from KEYGATE_ENCRYPTION_KEY, and neither KEYGATE_PREVIOUS_ENCRYPTION_KEYS nor the embedded store's key file holds ${noneOf}): set KEYGATE_ENCRYPTION_KEY to the key this store was started with (${anyOf}) again, or, when rotating, list that key in KEYGATE_PREVIOUS_ENCRYPTION_KEYS; rows this process sealed could not be read by a start with that key alone`,
    )
  }
  return new KeygateError(
    'encryption_key_missing',
    `${unknown} (the current key is ${cipher.currentKeyId}, and no key of KEYGATE_PREVIOUS_ENCRYPTION_KEYS is ${noneOf}): set KEYGATE_ENCRYPTION_KEY to the key the store's other instances use, or, when rotating, list the old key in KEYGATE_PREVIOUS_ENCRYPTION_KEYS; rows this process sealed could be read by none of them`,
  )
}

/**
 * Refuses a cipher that cannot open the newest audit row (`encryption_key_missing`, naming its
 * key): a wrong KEYGATE_ENCRYPTION_KEY, or the right one not listed among the previous keys
 * after a rotation. Before, such a process ran on and sealed its rows with a key no other
 * instance has, so their details were lost for good. Older rows sealed with a key that was
 * dropped since are not looked at (keeping a key only as long as its rows is the documented
 * rotation); the newest row is read through the index on created_at, one row however long the
 * log. An empty log passes: the store's key check (checkStoreKey) is what refuses a wrong key
 * there; this one still refuses, on a store an older keygate also writes to (which keeps no
 * check), a process that could not read what the newest of them wrote.
 */
export async function checkNewestSealed(db: Queryable, cipher: AuditCipher): Promise<void> {
  // A row whose time was set past the latest keygate writes is not the newest it wrote: it would
  // be read at every start, and lists as altered whatever the keys.
  const [newest] = await db.query<StoredRow>(`SELECT ${STORED_COLUMNS} FROM api_key_audit_log WHERE created_at <= $1 ORDER BY created_at DESC LIMIT 1`, [LATEST])
  if (!newest || cipher.knows(newest.enc_key_id)) return
  // Its key id changed in the store, and a configured key sealed it: the keys are right, and the
  // row lists as altered (`failed`). Before, such an edit kept every instance from starting.
  if (openStored(cipher, newest).integrity === 'failed') return
  throw keyMissing('the newest audit row was', [newest.enc_key_id], cipher)
}

/** What the store's key check seals, and binds it to (sealSecret's context). */
const KEY_CHECK = 'keygate store encryption key check'

/**
 * Refuses a cipher whose keys lack the store's encryption key (`encryption_key_missing`): the key
 * its key check (table encryption_key_check, migration 0021) was sealed with. The first start
 * that finds no check makes it under its current key (INSERT … ON CONFLICT DO NOTHING: of two
 * first starts with different keys, one makes it and the other is refused), after making sure,
 * on a store that already holds something sealed (one upgraded from a keygate without the check),
 * that its keys open it: the newest audit row (checkNewestSealed, run before), or, the log empty
 * (pruned), a webhook secret. Before (found by a review), only the newest audit row was read, and
 * on a store with none any key passed.
 *
 * A start whose current key is not the check's, which holds the check's key among its previous
 * ones (a rotation), seals the check anew under its current key, so the old key can be dropped
 * once every instance runs with the new one; from then on a process with only the old key is
 * refused, as the newest-row check refuses it once a row is sealed with the new key (a start is
 * when the new key is in use: it re-seals webhook secrets too). The check follows the current key
 * of the latest process to start, as the newest row follows the latest to write: during the
 * README's two-step rotation every process opens both keys either way. A check that names a
 * configured key but does not open was altered in the store: it is sealed anew, with a warning,
 * as an altered newest row keeps no process with the right keys from starting.
 *
 * `generated`: the embedded store's key was generated by this start (its file missing or empty),
 * which loadAuditCipher allows only when the store holds nothing sealed with a key it lacks; a
 * check sealed with a key this process lacks (the lost file's, or a KEYGATE_ENCRYPTION_KEY left
 * out) then guards nothing a new key would lose, and is sealed anew (with a warning).
 *
 * `readOnly`: a command that changes nothing (a listing) neither makes the check nor seals it
 * anew; only a check its keys lack refuses it. It seals nothing, so it has no key to agree on:
 * before (found by a review), such a command with a mistyped key on a new store made the check
 * under that key, and every instance with the right one was refused, and one from a shell still
 * on a rotation's first step sealed the check back with the old key, which refused the instances
 * once they dropped it. A generated key is written already: the check follows it all the same.
 */
export async function checkStoreKey(db: Queryable, cipher: AuditCipher, options: { generated?: boolean; readOnly?: boolean; log?: Logger } = {}): Promise<void> {
  // Each round either ends or follows another process's write of the check, which ends that one.
  for (let round = 0; round < 5; round++) {
    const [check] = await db.query<{ sealed: string }>('SELECT sealed FROM encryption_key_check')
    if (!check) {
      await checkSealedBefore(db, cipher)
      if (options.readOnly && !options.generated) return
      const made = await db.query('INSERT INTO encryption_key_check (sealed) VALUES ($1) ON CONFLICT DO NOTHING RETURNING one', [cipher.sealSecret(KEY_CHECK, KEY_CHECK)])
      if (made.length > 0) return
      continue
    }
    const id = check.sealed.slice(0, Math.max(check.sealed.indexOf('.'), 0))
    let warning: string | undefined
    if (!cipher.knows(id)) {
      if (!options.generated) throw keyMissing("the store's encryption key check (table encryption_key_check) was", [id], cipher)
      warning = `the store's encryption key check was sealed with encryption key ${id}, which is not configured (the key file was lost, or KEYGATE_ENCRYPTION_KEY left out); nothing else in the store was sealed with it, so the check is sealed anew with the generated key`
    } else if (!opens(cipher, check.sealed)) {
      warning = `the store's encryption key check names encryption key ${id}, which is configured, but does not open with it: it was altered in the store, and is sealed anew`
    } else if (id === cipher.currentKeyId) {
      return
    }
    if (options.readOnly && !options.generated) return
    const resealed = await db.query('UPDATE encryption_key_check SET sealed = $1, sealed_at = now() WHERE sealed = $2 RETURNING one', [cipher.sealSecret(KEY_CHECK, KEY_CHECK), check.sealed])
    if (resealed.length > 0) {
      if (warning) options.log?.warn(warning)
      else options.log?.info("sealed the store's encryption key check with the current encryption key (a rotation)", { previous_key: id, current_key: cipher.currentKeyId })
      return
    }
  }
  throw new KeygateError('store_unavailable', "the store's encryption key check kept changing while this process read it (other processes starting with other keys?); start again")
}

/** Whether `sealed` is the store's key check, sealed with one of the cipher's keys. */
function opens(cipher: AuditCipher, sealed: string): boolean {
  try {
    return cipher.openSecret(KEY_CHECK, sealed, "the store's encryption key check") === KEY_CHECK
  } catch {
    return false
  }
}

/**
 * Before the first check is made: on a store whose log is empty (pruned) but whose webhook
 * secrets are sealed, refuses a cipher that opens none of them; the newest audit row, when there
 * is one, was looked at already (checkNewestSealed).
 */
async function checkSealedBefore(db: Queryable, cipher: AuditCipher): Promise<void> {
  const [rows] = await db.query<{ any: boolean }>('SELECT EXISTS (SELECT 1 FROM api_key_audit_log) AS any')
  if (rows?.any) return
  const ids = (await db.query<{ id: string }>(`SELECT DISTINCT id FROM (${WEBHOOK_SECRET_KEY_IDS}) AS k (id) ORDER BY id`)).map((r) => r.id)
  if (ids.length === 0 || ids.some((id) => cipher.knows(id))) return
  throw keyMissing(`the audit log is empty, and the webhook secrets are`, ids, cipher)
}

/**
 * The audit cipher from configuration. With the embedded store and no key configured, one is
 * generated into the data folder (mode 0600) with a warning, unless the store already holds
 * rows or secrets sealed with another key (`sealed`: their key ids): then the file was lost, and
 * a new key could open none of them, so keygate refuses to start. With PostgreSQL a key is
 * required, since several instances must share it. With a key configured, the embedded store's
 * generated key (if there is one) still opens what it sealed, as a previous key.
 */
export function loadAuditCipher(options: {
  encryptionKey?: string | undefined
  previousKeys?: readonly string[]
  storeKind: 'postgres' | 'embedded'
  dataDir?: string
  sealed?: readonly string[]
  log?: Logger
}): AuditCipher {
  const previous = (options.previousKeys ?? []).map((k) => Buffer.from(k, 'base64'))
  const file = embeddedKeyFile(options.dataDir)
  if (options.encryptionKey) {
    const key = Buffer.from(options.encryptionKey, 'base64')
    if (options.storeKind === 'embedded' && existsSync(file)) {
      try {
        const generated = readKeyFile(file, options.log)
        if (!generated.equals(key)) previous.push(generated)
      } catch (err) {
        options.log?.warn('the generated encryption key of the embedded store cannot be used as a previous key', { file, err: err as Error })
      }
    }
    return new AuditCipher(key, previous, options.storeKind === 'embedded' ? {} : undefined)
  }
  if (options.storeKind === 'postgres') {
    throw new KeygateError(
      'encryption_key_missing',
      'KEYGATE_ENCRYPTION_KEY is required with DATABASE_URL (every instance must share it): set it to the output of `openssl rand -base64 32`',
    )
  }
  const known = new Set(previous.map(encryptionKeyId))
  /** Refuses a new key while the store holds something sealed with a key this process lacks. */
  const refuseIfOrphaned = (state: string): void => {
    const orphaned = (options.sealed ?? []).filter((id) => !known.has(id))
    if (orphaned.length > 0) {
      throw new KeygateError(
        'encryption_key_missing',
        `${file} is ${state}, but the store holds audit rows or webhook secrets sealed with ${encryptionKeys(orphaned)}: restore the file from its backup (or set KEYGATE_ENCRYPTION_KEY to ${orphaned.length === 1 ? 'that key' : 'one of them, and list the others in KEYGATE_PREVIOUS_ENCRYPTION_KEYS'}); a new key could open none of them`,
      )
    }
  }
  if (existsSync(file) && isBlank(file)) {
    // Left by a version before files were written whole (a full disk, or a process killed between
    // creating the file and writing it): it never held a key, so nothing was sealed with it. Once
    // the store has shown it holds nothing sealed with a key this process lacks (`sealed`, read
    // under the store's lock), a new key takes its place; before, every start failed until it
    // was removed by hand.
    if (options.sealed === undefined) throw new KeygateError('config_invalid', `${file} is empty: it holds no key (an older keygate's write of it failed); remove it, and the next start generates one`)
    // A link (to a backup location, say) is not replaced by a file of its own: its target would stay empty.
    if (lstatSync(file).isSymbolicLink()) throw new KeygateError('config_invalid', `${file} is a link to an empty file, which holds no key: put the key there, or remove the link, and the next start generates one`)
    refuseIfOrphaned('empty')
    try {
      replaceWhole(file, randomBytes(32).toString('base64') + '\n', 0o600)
    } catch (err) {
      throw new KeygateError('config_invalid', `${file} is empty and cannot be replaced: ${systemErrorWords(err)}`, undefined, { cause: err })
    }
    options.log?.warn('generated an audit encryption key for the embedded store in place of an empty key file; back it up, or set KEYGATE_ENCRYPTION_KEY', { file })
  }
  if (!existsSync(file)) {
    refuseIfOrphaned('missing')
    // Whole or not at all (core/files.ts): before (found by a review), a write that failed (a
    // full disk) or a process killed between creating the file and writing it left it empty,
    // and every later start failed on a key that "does not hold 32 bytes" until it was removed
    // by hand. Another process that creates it first wins, and its key is read below.
    let created: boolean
    try {
      created = createWhole(file, randomBytes(32).toString('base64') + '\n', 0o600)
    } catch (err) {
      throw new KeygateError('config_invalid', `${file} cannot be created: ${systemErrorWords(err)}`, undefined, { cause: err })
    }
    if (created) options.log?.warn('generated an audit encryption key for the embedded store; back it up, or set KEYGATE_ENCRYPTION_KEY', { file })
  }
  return new AuditCipher(readKeyFile(file, options.log), previous, { keyFile: file })
}

/** Whether `file` holds nothing but white space (an unreadable file is left to readKeyFile to name). */
export function isBlank(file: string): boolean {
  try {
    return readFileSync(file, 'utf8').trim() === ''
  } catch {
    return false
  }
}

/**
 * Closes `file`, a key file, to every user but its owner, saying so: a key file restored with cp
 * (0644 under umask 022) into a data folder made by an operator or systemd (0755) was read as it
 * was, open to every local user, and nothing said so (found by a review). The store's files are
 * closed so too (core/db.ts privateFolder). One of another user's is left as it is, with the warning.
 */
function closeKeyFile(file: string, log: Logger | undefined): void {
  let mode: number
  try {
    mode = statSync(file).mode & 0o7777
  } catch {
    // Unreadable or gone: readKeyFile names it.
    return
  }
  if ((mode & 0o077) === 0) return
  let closed = ''
  try {
    chmodSync(file, 0o600)
    closed = '; now closed to them (mode 0600)'
  } catch (err) {
    closed = `; it could not be closed to them (${systemErrorWords(err)})`
  }
  log?.warn(
    `the encryption key file was readable by other users than its owner${closed}: a key that may have been read is replaced by setting KEYGATE_ENCRYPTION_KEY to a new one (openssl rand -base64 32), the file kept as a previous key`,
    { file, mode: mode.toString(8).padStart(4, '0') },
  )
}

function readKeyFile(file: string, log?: Logger): Buffer<ArrayBuffer> {
  closeKeyFile(file, log)
  let text: string
  try {
    text = readFileSync(file, 'utf8').trim()
  } catch (err) {
    throw new KeygateError('config_invalid', `${file} cannot be read: ${systemErrorWords(err)}`, undefined, { cause: err })
  }
  const key = Buffer.from(text, 'base64')
  if (key.length !== 32) throw new KeygateError('config_invalid', `${file} does not hold 32 bytes in base64`)
  return key
}

export class AuditLog {
  readonly #cipher: AuditCipher
  readonly #format: SealFormat

  /** `format`: what new rows are sealed in (`audit.seal_format`; 1 during a rolling upgrade from a version before migration 0006). */
  constructor(cipher: AuditCipher, format: SealFormat = AUDIT_FORMAT) {
    this.#cipher = cipher
    this.#format = format
  }

  /** Writes one row in the caller's transaction, so the change and its record commit together. */
  async write(tx: Queryable, actor: Actor, entry: AuditEntry): Promise<string> {
    return (await this.writeMany(tx, actor, [entry]))[0] as string
  }

  /**
   * Writes rows in the caller's transaction, many to a statement (statementBatches): an import's
   * 10,000 keys or a scheduler batch were a statement and a round trip per row (on the embedded
   * store, 0.7 to 0.8 ms of its thread's time each). Gives the rows' ids, in the order of `entries`.
   */
  async writeMany(tx: Queryable, actor: Actor, entries: readonly AuditEntry[]): Promise<string[]> {
    if (entries.length === 0) return []
    const createdAt = await transactionTime(tx, entries[0]?.keyId ?? null)
    const rows = await mapInSlices(entries, (entry) => {
      const row: SealedRow = { id: randomUUID(), keyId: entry.keyId ?? null, action: entry.action, actor: actor.actor, address: actor.address ?? null, createdAt }
      return { row, sealed: this.#cipher.seal(row, entry.details ?? {}, this.#format) }
    })
    for (const batch of statementBatches(rows, (r) => r.sealed.details.length * 2 + r.row.action.length + AUDIT_ROW_CHARS)) {
      const all = <T>(value: T): T[] => batch.map(() => value)
      const source = rowsOf([
        ['id', 'text', batch.map((r) => r.row.id)], ['key_id', 'text', batch.map((r) => r.row.keyId)], ['action', 'text', batch.map((r) => r.row.action)],
        ['actor', 'text', all(actor.actor)], ['address', 'text', all(actor.address ?? null)], ['enc_key_id', 'text', batch.map((r) => r.sealed.encKeyId)],
        ['nonce', 'bytea', batch.map((r) => r.sealed.nonce)], ['details', 'bytea', batch.map((r) => r.sealed.details)],
        ['created_at', 'timestamptz', all(createdAt)], ['format', 'smallint', all(this.#format)],
      ])
      await tx.query(`INSERT INTO api_key_audit_log (id, key_id, action, actor, address, enc_key_id, nonce, details, created_at, format) ${source.query}`, source.params)
    }
    return rows.map((r) => r.row.id)
  }

  /**
   * Newest first, at most `limit` (1 to 1000). A row that does not open is listed all the same,
   * without details, with its integrity and the problem: one altered or unreadable row hides
   * neither the rows around it nor the fact that it is there.
   */
  async list(db: Db, filter: AuditFilter & { limit?: number } = {}): Promise<AuditRecord[]> {
    return (await this.#select(db, filter, Math.min(Math.max(filter.limit ?? 100, 1), 1000))).map((r) => openStored(this.#cipher, r))
  }

  /** One page of the log at a cursor (the `next_cursor` of the page before), newest first: the admin API's pages and `keygate api-key audit`'s. */
  async pageAt(db: Db, filter: Omit<AuditFilter, 'before'>, query: { limit?: number | undefined; cursor?: string | undefined }): Promise<Page<AuditRecord>> {
    const page = await this.page(db, { ...filter, before: query.cursor ? decodeCursor('audit', query.cursor) : undefined }, query.limit ?? 100)
    const last = page.items.at(-1)
    return { items: page.items, nextCursor: page.more && last ? encodeCursor('audit', last.createdAt, last.id) : null }
  }

  /** One page of `limit` rows, and whether more follow (the row after the page is counted, not opened). */
  async page(db: Db, filter: AuditFilter, limit: number): Promise<{ items: AuditRecord[]; more: boolean }> {
    const rows = await this.#select(db, filter, limit + 1)
    return { items: rows.slice(0, limit).map((r) => openStored(this.#cipher, r)), more: rows.length > limit }
  }

  async #select(db: Db, filter: AuditFilter, limit: number): Promise<StoredRow[]> {
    const where: string[] = []
    const params: unknown[] = []
    const equal = (column: string, value: string | undefined) => {
      if (value === undefined) return
      params.push(value)
      where.push(`${column} = $${params.length}`)
    }
    equal('key_id', filter.keyId)
    equal('action', filter.action)
    equal('actor', filter.actor)
    if (filter.before) {
      params.push(await cursorTime(db, filter.before), filter.before.id)
      where.push(`(created_at, id) < ($${params.length - 1}::timestamptz, $${params.length})`)
    }
    params.push(limit)
    return db.query<StoredRow>(
      `SELECT ${STORED_COLUMNS} FROM api_key_audit_log
       ${where.length ? 'WHERE ' + where.join(' AND ') : ''} ORDER BY created_at DESC, id DESC LIMIT $${params.length}`,
      params,
    )
  }
}

/**
 * Where a page after `before` starts: the stored time of the cursor's row, to the microsecond,
 * when it is the cursor's cut to the millisecond. A time moved in the store by a fraction of one
 * (which a cursor cannot hold) sorted the row above the others of its millisecond, and the next
 * page, after the time cut, passed over them (found by a review). A look-up by id of its own, so
 * that the page's statement is planned with its time as before.
 */
async function cursorTime(db: Db, before: CursorPosition): Promise<Date | string> {
  const [stored] = await db.query<{ at: string }>(
    `SELECT to_char(created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"') AS at FROM api_key_audit_log
     WHERE id = $2 AND created_at >= $1 AND created_at < $1::timestamptz + interval '1 millisecond'`,
    [before.at, before.id],
  )
  return stored?.at ?? before.at
}

/**
 * The times an audit row may have: those a list cursor holds (core/cursor.ts), 1970 to 9999.
 * Rows are written at the store's clock, so a time outside them was set in the store.
 */
const EARLIEST = new Date('1970-01-01T00:00:00.000Z')
const LATEST = new Date('9999-12-31T23:59:59.999Z')

/** A stored row as a record: its details opened, or its integrity and the problem. */
function openStored(cipher: AuditCipher, r: StoredRow): AuditRecord {
  const at = r.created_at
  // The drivers read 'infinity' as a number and a time past JavaScript's (year 275760) as an
  // invalid date. Such a row is listed as altered at the nearer of the times a cursor holds, so
  // its page and the pages after it are read (before, found by a review, the listing threw on
  // it: an infinite time sorts first, and no page of the log could be read). Several of them on
  // either side of a page's end cannot be told apart by the cursor, which the store orders by
  // their own times: the next page may skip (after 9999) or repeat (before 1970) some of them.
  if (!(at instanceof Date) || !(at >= EARLIEST && at <= LATEST)) {
    const createdAt = at === -Infinity || (at instanceof Date && at < EARLIEST) ? EARLIEST : LATEST
    const problem = `audit row ${r.id}'s time (${at instanceof Date && !Number.isNaN(at.getTime()) ? at.toISOString() : String(at)}) is not a time keygate writes: the row was altered in the store`
    return { id: r.id, keyId: r.key_id, action: r.action, actor: r.actor, address: r.address, createdAt, details: null, integrity: 'failed', problem }
  }
  const row: SealedRow = { id: r.id, keyId: r.key_id, action: r.action, actor: r.actor, address: r.address, createdAt: at }
  // Rows are written to the millisecond, and the drivers read no finer: a time moved in the store
  // by a fraction of one read back as sealed, and the row opened as verified (found by a review).
  // Format 1 binds no time (and the first rows of all were written to the microsecond).
  if (r.uneven && r.format !== 1) return { ...row, details: null, integrity: 'failed', problem: `audit row ${r.id}'s time (${at.toISOString()} and a fraction of a millisecond) is not a time keygate writes: the row was altered in the store` }
  try {
    return { ...row, details: cipher.open(row, r.format, r.enc_key_id, r.nonce, r.details), integrity: 'verified' }
  } catch (err) {
    if (!isKeygateError(err) || err.code !== 'audit_decrypt_failed') throw err
    if (err.details?.integrity === 'key_missing') return { ...row, details: null, integrity: 'key_missing', problem: err.message, sealedWith: r.enc_key_id }
    return { ...row, details: null, integrity: 'failed', problem: err.message }
  }
}

/** The columns of a stored row (StoredRow). */
const STORED_COLUMNS = "id, key_id, action, actor, address, enc_key_id, nonce, details, created_at, format, created_at <> date_trunc('milliseconds', created_at) AS uneven"

interface StoredRow {
  id: string
  key_id: string | null
  action: string
  actor: string
  address: string | null
  enc_key_id: string
  nonce: Uint8Array
  details: Uint8Array
  /** A Date, but for a time set in the store that no JavaScript date holds (openStored). */
  created_at: Date | number
  format: number
  /** Whether created_at has a fraction of a millisecond, which keygate never writes. */
  uneven: boolean
}

/** An audit row's characters in a statement besides its details and action (its id, key id, nonce, encryption key id). */
const AUDIT_ROW_CHARS = 100

/**
 * How far after the store's clock a row of the key may be and still be followed (transactionTime):
 * the rows of one store's clock are never after it, but for a step of the clock back.
 */
const FUTURE_SLACK = '1 minute'

/** The times of transactions audit rows were written in, read once per transaction. */
const transactionTimes = new WeakMap<Queryable, Date>()

/**
 * The time of the transaction's change, cut to milliseconds (a JS Date's precision: the
 * `before` cursor of list() must compare equal to the stored value, or rows sharing a
 * millisecond are skipped). The database's clock, not this instance's, orders the rows of
 * every instance alike; it is read before the row is sealed, since the time is bound into it.
 * It is read at the first row written, once the change holds its keys' locks (clock_timestamp(),
 * not now(), the transaction's start), and is later than every row `keyId` has: a change that
 * waited for another on the same key is listed after it. Before (found by a review), two admins
 * changing one key at once got the times their transactions began, and the one that waited was
 * listed below the one it waited for, or beside it in the same millisecond in any order: a key's
 * trail read "revoked", then "rotated" (which a revoked key cannot be), and the newest of two
 * `key.updated` rows was not the value the key kept. A row whose time was set in the store past
 * the latest a row may have is passed over: after it, the key's every change failed (found by a
 * review). So is any row more than FUTURE_SLACK after the store's clock, which keygate did not
 * write: before (found by a review), one row set to 2999 in the store made every later row of its
 * key, verified, claim 2999 too, listed above the whole log for good and never pruned.
 */
async function transactionTime(tx: Queryable, keyId: string | null): Promise<Date> {
  let at = transactionTimes.get(tx)
  if (at === undefined) {
    const rows = await tx.query<{ at: Date }>(
      `SELECT GREATEST(c.at, (SELECT max(created_at) FROM api_key_audit_log WHERE key_id = $1 AND created_at <= c.at + interval '${FUTURE_SLACK}') + interval '1 millisecond') AS at
       FROM (SELECT date_trunc('milliseconds', clock_timestamp()) AS at) AS c`,
      [keyId],
    )
    at = (rows[0] as { at: Date }).at
    // A whole store (not one transaction) has no one time to keep.
    if (!('transaction' in tx)) transactionTimes.set(tx, at)
  }
  return at
}
