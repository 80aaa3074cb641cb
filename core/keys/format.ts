// Key format: `<prefix><id>_<secret><check>`, e.g. kg_3hF9aK2LmQxZ_<22 secret chars><6 check chars>.
// - id: 12 base62 characters, public (it names the key in the API, logs and audit trail)
// - secret: 22 base62 characters from the OS CSPRNG, 130.9 bits
// - check: CRC32 of everything before it, 6 base62 characters, so a mistyped or random string
//   is refused before any cache or store look-up, and secret scanners can recognise keys.
// Keys of the replaced system were UUID v4 strings; they are recognised as `legacy`.
import { randomBytes, hash, timingSafeEqual } from 'node:crypto'
import { crc32 } from 'node:zlib'

const ALPHABET = '0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz'
export const ID_LENGTH = 12
const SECRET_LENGTH = 22
const CHECK_LENGTH = 6
/** What follows the prefix: the id, `_`, the secret and the check. */
const TAIL_LENGTH = ID_LENGTH + 1 + SECRET_LENGTH + CHECK_LENGTH
const UUID_V4 = /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/i
/** What a key's id is (its length ID_LENGTH), for the schemas that name one (the admin API's `{id}`). */
export const KEY_ID_PATTERN = '^[0-9A-Za-z]{12}$'
const ID_SHAPE = new RegExp(KEY_ID_PATTERN)

/** Uniform base62 characters from the CSPRNG (rejection sampling: bytes ≥ 248 are dropped). */
export function randomBase62(length: number): string {
  let out = ''
  while (out.length < length) {
    for (const b of randomBytes(length * 2)) {
      if (b < 248) out += ALPHABET[b % 62]
      if (out.length === length) break
    }
  }
  return out
}

function checksum(body: string): string {
  let n = crc32(body)
  let s = ''
  for (let i = 0; i < CHECK_LENGTH; i++) {
    s = ALPHABET[n % 62] + s
    n = Math.floor(n / 62)
  }
  return s
}

export function newKeyId(): string {
  return randomBase62(ID_LENGTH)
}

export function isKeyId(value: string): boolean {
  return ID_SHAPE.test(value)
}

/** A new key for `id`: the plaintext is returned to the caller once and never stored. */
export function generateKey(prefix: string, id: string = newKeyId()): { id: string; key: string; hash: string } {
  const body = `${prefix}${id}_${randomBase62(SECRET_LENGTH)}`
  const key = body + checksum(body)
  return { id, key, hash: hashKey(key) }
}

/** SHA-256 hex of the whole presented key, the only form in which a key is stored. */
export function hashKey(key: string): string {
  return hash('sha256', key, 'hex')
}

export type ParsedKey =
  | { kind: 'keygate'; id: string; hash: string }
  | { kind: 'legacy'; hash: string }

/**
 * The prefixes a presented key may carry: the one new keys get first, then those of keys made
 * before it was changed (`keys.previous_prefixes`). The prefix is part of the hashed key, so a
 * key only ever matches its own.
 */
export type KeyPrefixes = readonly [string, ...string[]]

/** The prefixes of `keys.prefix` and `keys.previous_prefixes`, the current one first, each once. */
export function keyPrefixes(prefix: string, previous: readonly string[] = []): KeyPrefixes {
  return [prefix, ...previous.filter((p, i) => p !== prefix && previous.indexOf(p) === i)]
}

/**
 * The shape of a presented key, checked without hashing or any look-up: `keygate` (prefix,
 * length, id, checksum all right), `legacy` (a UUID v4, when accepted), or undefined. The
 * expected length is fixed, so most garbage costs a length check.
 */
export function keyShape(presented: string, prefixes: KeyPrefixes, acceptLegacy = true): 'keygate' | 'legacy' | undefined {
  const kind = keyKind(presented, prefixes, acceptLegacy)
  if (kind === 'keygate') {
    const checkStart = presented.length - CHECK_LENGTH
    const idStart = presented.length - TAIL_LENGTH
    const idEnd = idStart + ID_LENGTH
    if (presented.charCodeAt(idEnd) !== 95 /* _ */) return undefined
    if (checksum(presented.slice(0, checkStart)) !== presented.slice(checkStart)) return undefined
    if (!ID_SHAPE.test(presented.slice(idStart, idEnd)) || !/^[0-9A-Za-z]+$/.test(presented.slice(idEnd + 1))) return undefined
    return 'keygate'
  }
  if (kind === 'legacy' && UUID_V4.test(presented)) return 'legacy'
  return undefined
}

/**
 * What a presented key could be from its length and prefix alone: the first, cheapest half of
 * `keyShape`. The gateway hashes a key of a possible kind and tries its cache first (a cached
 * hash is a stored key's, so a hit needs no further check); only a miss gets the full check
 * before the store is asked.
 */
export function keyKind(presented: string, prefixes: KeyPrefixes, acceptLegacy = true): 'keygate' | 'legacy' | undefined {
  for (const prefix of prefixes) if (presented.length === prefix.length + TAIL_LENGTH && presented.startsWith(prefix)) return 'keygate'
  if (acceptLegacy && presented.length === 36) return 'legacy'
  return undefined
}

/** Recognises a presented key without any look-up; `undefined` for anything malformed. */
export function parseKey(presented: string, prefixes: KeyPrefixes, acceptLegacy = true): ParsedKey | undefined {
  const shape = keyShape(presented, prefixes, acceptLegacy)
  const idStart = presented.length - TAIL_LENGTH
  if (shape === 'keygate') return { kind: 'keygate', id: presented.slice(idStart, idStart + ID_LENGTH), hash: hashKey(presented) }
  if (shape === 'legacy') return { kind: 'legacy', hash: hashKey(presented.toLowerCase()) }
  return undefined
}

/**
 * The SHA-256 of a presented key of a known shape as a 32-character binary string: the same
 * digest as `hashKey`, in the most compact string form, for in-memory cache keys.
 */
export function digestKey(presented: string, shape: 'keygate' | 'legacy'): string {
  return hash('sha256', shape === 'legacy' ? presented.toLowerCase() : presented, 'binary')
}

/** `digestKey`'s form of a stored SHA-256 hex. */
export function digestFromHex(hex: string): string {
  return Buffer.from(hex, 'hex').toString('binary')
}

/** Constant-time equality of two SHA-256 hex digests. */
export function hashesEqual(a: string, b: string): boolean {
  const x = Buffer.from(a, 'hex')
  const y = Buffer.from(b, 'hex')
  return x.length === 32 && y.length === 32 && timingSafeEqual(x, y)
}

export const SHA256_HEX = /^[0-9a-f]{64}$/

/**
 * A keygate key of any prefix in free text, unanchored: a key glued to other word characters
 * (`Bearer%20kg_...`) is found too. The log scrubber and the refusal of keys in stored text use it.
 */
export const KEY_IN_TEXT = new RegExp(`[a-z][a-z0-9]{0,15}_[0-9A-Za-z]{${ID_LENGTH}}_[0-9A-Za-z]{${SECRET_LENGTH + CHECK_LENGTH}}`)

/**
 * KEY_IN_TEXT for a yes or no, found from its first `_`: the prefix is looked for behind it. The
 * same texts match; KEY_IN_TEXT tried up to 16 characters at every letter of a text, 0.8 s of a
 * blocked event loop for a 25 MB import's metadata (found by a review), this 15 ms. (The log
 * scrubber keeps KEY_IN_TEXT: it replaces the whole match, prefix included.)
 */
const KEY_FROM_UNDERSCORE = new RegExp(`(?<=[a-z][a-z0-9]{0,15})_[0-9A-Za-z]{${ID_LENGTH}}_[0-9A-Za-z]{${SECRET_LENGTH + CHECK_LENGTH}}`)

/** Whether keygate's key shape (KEY_IN_TEXT) is anywhere in `text`. */
export function holdsKeyShape(text: string): boolean {
  return KEY_FROM_UNDERSCORE.test(text)
}

/** Whether `text` holds a key: keygate's shape anywhere in it, or is the replaced system's UUID v4. */
export function holdsKey(text: string): boolean {
  return holdsKeyShape(text) || UUID_V4.test(text.trim())
}

/** A pattern that finds keygate keys in free text (log scrubbing, leak scanning). */
export function keyPattern(prefix: string): RegExp {
  return new RegExp(`${prefix.replace(/[.*+?^${}()|[\]\\]/g, '\\$&')}[0-9A-Za-z]{${ID_LENGTH}}_[0-9A-Za-z]{${SECRET_LENGTH + CHECK_LENGTH}}`, 'g')
}
