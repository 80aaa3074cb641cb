// keygate api-key create|list|get|update|validate|revoke|rotate|stats|import
import type { ParseArgsOptionsConfig } from 'node:util'
import type { TSchema } from '@sinclair/typebox'
import { isKeygateError, KeygateError } from '../core/errors.ts'
import { nestsDeeper } from '../core/depth.ts'
import { decodeUtf8, readAtMost, utf16Words } from '../core/read-bounded.ts'
import { escapeUnprintable, firstCharacters, firstProblems, jsonFault, type JsonFault, MAX_JSON_DEPTH, refuseChangedNumbers, refuseMemberProblems } from '../core/validate.ts'
import { scrub } from '../core/log.ts'
import { checkMetadata, CreateKeyBody, IMPORT_MAX_BODY_BYTES, IMPORT_ROW_FIELDS, KEY_BOUNDS, ListKeysQuery, RevokeBody, UpdateKeyBody } from '../core/keys/schemas.ts'
import type { KeyRecord } from '../core/keys/types.ts'
import { parseAddress } from '../core/keys/evaluate.ts'
import { keyPrefixes, keyShape } from '../core/keys/format.ts'
import { KEY_STATUSES, KEY_TYPES, keyJson, keyValidUntil, rotationJson } from '../core/keys/types.ts'
import { auditJson, type AuditRecord } from '../core/audit.ts'
import { CURSOR_PATTERN, type Page } from '../core/cursor.ts'
import type { KeyOperations } from './key-operations.ts'
import { DURATION, EXIT_OK, EXIT_REFUSED, UsageError, argOrStdin, checkFlags as checkFlagsOf, choiceFlag, expiryFlags, fileArgument, parseDuration, parseIntFlag, parseList, printDone, printJson, printMade, printable, refuseKeyInFlags, str, table, type Action, type Command, type Io, type Parsed } from './io.ts'

export interface ApiKeyContext {
  io: Io
  json: boolean
  ops: KeyOperations
}


function parseRateLimit(value: string | undefined): { limit: number; window_s: number } | null | undefined {
  if (value === undefined) return undefined
  if (value === 'default') return null
  const m = /^(\d{1,10})\/(.+)$/.exec(value)
  if (!m) throw new UsageError(`--rate-limit: ${JSON.stringify(value)} is not allowed; expected requests/window such as 100/1s or 5000/1m, or "default"`)
  const limit = Number(m[1])
  const { min, max } = KEY_BOUNDS.rateLimit
  if (limit < min || limit > max) throw new UsageError(`--rate-limit: ${JSON.stringify(value)} allows ${limit} requests; expected from ${min} to ${max} per window`)
  // The window's own form checked here: parseDuration's words name the part alone, with an
  // expiry's example (`"s" is not a duration ... such as 90d`; found by a review).
  if (!DURATION.test((m[2] as string).trim())) {
    throw new UsageError(`--rate-limit: ${JSON.stringify(value)}: ${JSON.stringify(m[2])} after the / is not a window; expected requests/window such as 100/1s or 5000/1m (a whole number with s, m, h or d, up to 1d)`)
  }
  return { limit, window_s: parseDuration('rate-limit', m[2] as string, KEY_BOUNDS.rateWindowS) }
}

function parseMetadata(value: string | undefined): Record<string, unknown> | undefined {
  if (value === undefined) return undefined
  let parsed: unknown
  try {
    parsed = JSON.parse(value)
  } catch {
    throw new UsageError('--metadata: is not JSON; expected a JSON object such as \'{"team":"billing"}\'')
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new UsageError('--metadata: expected a JSON object')
  const changed = silentChange(value, parsed)
  if (changed !== undefined) throw new UsageError(`--metadata: ${changed}`)
  try {
    checkMetadata(parsed)
  } catch (err) {
    if (isKeygateError(err, 'validation_failed')) throw new UsageError(`--${err.message}`)
    throw err
  }
  return parsed as Record<string, unknown>
}

/**
 * Why JSON `text` (parsed as `value`) would not be stored as written, or undefined: a member
 * name repeated in its object (JSON.parse keeps the last; or an object of more members than any
 * input takes), or a number out of range, past
 * 2^53 - 1 or too close to zero, as the admin API refuses them in a body (before, the CLI's
 * --metadata and import files stored 12345678901234567891 rounded and 1e-400 as 0). Too deep a
 * value is refused before (checkMetadata).
 */
function silentChange(text: string, value: unknown): string | undefined {
  if (nestsDeeper(value, MAX_JSON_DEPTH + 1)) return undefined
  try {
    refuseMemberProblems(text)
    refuseChangedNumbers(text, value)
    return undefined
  } catch (err) {
    if (isKeygateError(err, 'validation_failed')) return err.message
    throw err
  }
}

const IMPORT_USAGE = 'keygate api-key import FILE|- [--type T] [--json]'

const KEY_FIELDS = {
  name: { type: 'string' },
  scopes: { type: 'string' },
  owner: { type: 'string' },
  metadata: { type: 'string' },
  cidrs: { type: 'string' },
  'rate-limit': { type: 'string' },
  'expires-in': { type: 'string' },
  'expires-at': { type: 'string' },
  'rotate-every': { type: 'string' },
} as const satisfies ParseArgsOptionsConfig

/** The flag each field of a key body comes from. */
const FLAG_OF: Readonly<Record<string, string>> = {
  name: '--name',
  type: '--type',
  scopes: '--scopes',
  owner: '--owner',
  metadata: '--metadata',
  allowed_cidrs: '--cidrs',
  rate_limit: '--rate-limit',
  expires_at: '--expires-at',
  rotation_interval_s: '--rotate-every',
  scope: '--scope',
  status: '--status',
  cursor: '--cursor',
}

/** The API's own schema, checked before any store is opened (io.ts checkFlags), with the flags' names. */
const checkFlags = (schema: TSchema, values: Record<string, unknown>): void => checkFlagsOf(schema, values, FLAG_OF)
/** The fields of a key the store refuses a keygate key in (core/keys/service.ts), checked before it is opened too. */
const KEY_FREE_FIELDS = ['name', 'owner', 'metadata'] as const

/** The key fields given on the command line, as an API body (only those present). */
function keyBody(p: Parsed): Record<string, unknown> {
  const body: Record<string, unknown> = {}
  const put = (k: string, v: unknown) => {
    if (v !== undefined) body[k] = v
  }
  put('name', str(p, 'name'))
  put('type', str(p, 'type'))
  put('scopes', parseList('scopes', str(p, 'scopes'), 'none'))
  const owner = str(p, 'owner')
  put('owner', owner === '' ? null : owner)
  put('metadata', parseMetadata(str(p, 'metadata')))
  put('allowed_cidrs', parseList('cidrs', str(p, 'cidrs'), 'any'))
  put('rate_limit', parseRateLimit(str(p, 'rate-limit')))
  put('expires_at', expiryFlags(p))
  const every = str(p, 'rotate-every')
  put('rotation_interval_s', every === undefined ? undefined : every === 'never' ? null : parseDuration('rotate-every', every, KEY_BOUNDS.rotationS))
  return body
}

const date = (d: Date | null) => (d ? d.toISOString().replace(/\.\d{3}Z$/, 'Z') : null)


const CURSOR = new RegExp(CURSOR_PATTERN)

/** An audit row that did not open, in the table: a `key_missing` one names the key it was sealed with (before, found by a review, no output of the store did). */
const notOpened = (a: AuditRecord): string => (a.integrity === 'key_missing' && a.sealedWith ? `(key_missing: sealed with encryption key ${a.sealedWith}, not configured)` : `(${a.integrity}: not opened)`)

/**
 * A page of a list from `cursor` (the first without one), or with `all` every page from there: the
 * items, and where the next page starts (null after the last).
 */
async function pages<T>(page: (cursor: string | undefined) => Promise<Page<T>>, all: boolean, cursor?: string): Promise<{ items: T[]; next: string | null }> {
  const items: T[] = []
  let next: string | null = cursor ?? null
  do {
    const got = await page(next ?? undefined)
    // One by one: spread into push, a huge page (a broken server's) overflowed the stack.
    for (const item of got.items) items.push(item)
    next = got.nextCursor
  } while (all && next)
  return { items, next }
}

function keyRows(keys: KeyRecord[]): string {
  return table(
    // VALID UNTIL, not EXPIRES: for a rotating key it is the end of its grace, where `get` shows
    // `expires_at -` (two names for one date read as a contradiction; found by a newcomer).
    ['id', 'name', 'type', 'status', 'scopes', 'owner', 'valid until', 'last used'],
    keys.map((k) => [k.id, k.name, k.type, k.status, k.scopes.join(','), k.owner, date(keyValidUntil(k)), date(k.lastUsedAt)]),
  )
}

function keyDetail(k: KeyRecord): string {
  const j = keyJson(k)
  return Object.entries(j)
    .map(([name, v]) => `${name.padEnd(20)} ${v === null ? '-' : typeof v === 'object' ? escapeUnprintable(JSON.stringify(v)) : printable(String(v))}`)
    .join('\n') + '\n'
}

async function readInput(io: Io, source: string): Promise<string> {
  const mib = `${IMPORT_MAX_BODY_BYTES / 1024 / 1024} MiB`
  let bytes: Buffer
  if (source === '-') {
    // Bounded as the admin API bounds an import's body (before: read whatever came, without end).
    const read = await io.readStdin({ maxBytes: IMPORT_MAX_BODY_BYTES })
    if (read === undefined) throw new KeygateError('import_invalid', `stdin holds more than ${mib}, the most one import reads from it (as the admin API takes in one body): split the file`)
    bytes = read
  } else {
    // A file too (before: read whole, whatever its size; `import /dev/zero` grew until Node ran out of memory).
    const read = readAtMost(source, IMPORT_MAX_BODY_BYTES)
    if ('unreadable' in read) throw new KeygateError('import_invalid', `${source}: cannot be read (${read.unreadable.code ?? 'error'})`)
    if ('tooLarge' in read) {
      throw new KeygateError('import_invalid', `${source}: the file is larger than ${mib}${read.size === undefined ? '' : ` (${read.size} bytes)`}, the most one import reads (as the admin API takes in one body): split the file`)
    }
    bytes = read.bytes
  }
  // UTF-8 only, as a configuration file and the admin API's bodies: before (found by a review), a
  // Latin-1 file's `café` was imported as `caf\uFFFD` without a word, on the store as through the
  // admin API (the CLI decoded it before sending), and a UTF-16 file was told it was not JSON.
  const decoded = decodeUtf8(bytes)
  if ('text' in decoded) return decoded.text
  const where = source === '-' ? 'stdin' : source
  const { utf16, offset, line, col } = decoded.problem
  if (utf16) throw new KeygateError('import_invalid', `${where}: the file is UTF-16 ${utf16Words(decoded.problem)}; nothing imported: save it as UTF-8`)
  throw new KeygateError('import_invalid', `${where}:${line}:${col}: the file is not UTF-8 text (an invalid byte at offset ${offset}); nothing imported: save it as UTF-8`)
}

/**
 * A JSON array, or JSON lines (one object per line, blank lines skipped). `lines` gives the file
 * line of each row of JSON lines, so that problems can name it (`row 2 (line 4)`). A leading
 * byte order mark is dropped (editors on Windows write one).
 */
export function parseImport(text: string): { rows: unknown[]; lines?: number[] } {
  if (text.startsWith('\uFEFF')) text = text.slice(1)
  const trimmed = text.trim()
  if (trimmed === '') throw new KeygateError('import_invalid', 'the import file is empty; expected a JSON array or JSON lines of objects')
  if (trimmed.startsWith('[')) {
    let rows: unknown[]
    try {
      rows = JSON.parse(trimmed) as unknown[]
    } catch (err) {
      // Located in the file as it is (the parser's line is of the text trimmed), with a piece of
      // its line: before (found by a review), an unexpected character was told by the parser's
      // words alone, some ten characters either side of it and no line, in a file of thousands.
      const fault = jsonFault(text, (err as Error).message, text.length - text.trimStart().length)
      if (fault.at === undefined) throw new KeygateError('import_invalid', `the import file is not valid JSON: ${fault.why}`)
      const problem = notJsonAt(text, fault.at, fault.why)
      throw new KeygateError('import_invalid', `nothing imported:\n  ${problem}`, { problems: [problem] })
    }
    // `[3].metadata.x: ...` of the array is row 4's `metadata.x`.
    const changed = silentChange(trimmed, rows)?.replace(/^\[(\d+)\](?:\.|: )?/, (_m, i: string) => `row ${Number(i) + 1}: `)
    if (changed !== undefined) throw new KeygateError('import_invalid', `nothing imported:\n  ${changed}`, { problems: [changed] })
    return { rows }
  }
  const rows: unknown[] = []
  const lines: number[] = []
  const problems: string[] = []
  text.split('\n').forEach((line, i) => {
    if (line.trim() === '') return
    let row: unknown
    try {
      row = JSON.parse(line)
    } catch (err) {
      // Where the parser stopped, not its message, which may quote the line (a key_hash, say).
      // Before (found by a review), such a line was said to be "not a JSON object", which an
      // object with a missing quote or comma is to the eye, and the reader was left to find why.
      // (JSON.parse names no position for an unexpected character: jsonFault finds it.)
      const { at } = jsonFault(line, (err as Error).message)
      problems.push(`line ${i + 1}: is not valid JSON${at === undefined ? '' : ` (at column ${at.column})`}`)
      return
    }
    const changed = silentChange(line, row)
    if (changed !== undefined) problems.push(`line ${i + 1}: ${changed}`)
    rows.push(row)
    lines.push(i + 1)
  })
  if (problems.length > 0) {
    const listed = firstProblems(problems)
    throw new KeygateError('import_invalid', `nothing imported:\n  ${listed.join('\n  ')}`, { problems: listed })
  }
  return { rows, lines }
}

/** Characters of its line shown either side of where a JSON array file stops being JSON. */
const EXCERPT_SIDE = 24

/**
 * The problem of a JSON array file `text` that stops being JSON `at` (jsonFault): its line and
 * column, why (the parser's words, without the text they quote), and a piece of that line. The
 * piece is widened to whole words first, so that a key_hash it touches is whole and hidden as
 * every message hides one.
 */
function notJsonAt(text: string, at: NonNullable<JsonFault['at']>, why: string): string {
  const lineEnd = text.indexOf('\n', at.offset)
  const line = text.slice(at.lineStart, lineEnd < 0 ? text.length : lineEnd).replace(/\r$/, '')
  const within = at.offset - at.lineStart
  const word = /[0-9A-Za-z_-]/
  let from = Math.max(0, within - EXCERPT_SIDE)
  let to = Math.min(line.length, within + EXCERPT_SIDE)
  for (let n = 0; n < 64 && from > 0 && word.test(line[from - 1] as string); n++) from--
  for (let n = 0; n < 64 && to < line.length && word.test(line[to] as string); n++) to++
  // Nor half an emoji (a surrogate pair cut in two).
  if (from > 0 && /[\udc00-\udfff]/.test(line[from] as string)) from--
  if (to > 0 && to < line.length && /[\ud800-\udbff]/.test(line[to - 1] as string)) to++
  const piece = escapeUnprintable(scrub(line.slice(from, to)))
  const shown = `${from > 0 ? `...${piece}` : piece.trimStart()}${to < line.length ? '...' : ''}`
  return `line ${at.line}: is not valid JSON (at column ${at.column}: ${escapeUnprintable(why)}): ${shown}`
}

/** `err` with each `row N` of its message followed by the file line it came from, where blank lines make the two differ. */
function withLines(err: unknown, lines: number[] | undefined): unknown {
  if (!lines || !(err instanceof KeygateError) || err.code !== 'import_invalid') return err
  const named = (text: string) =>
    text.replace(/\brow (\d+)\b/g, (row, n: string) => {
      const line = lines[Number(n) - 1]
      return line === undefined || line === Number(n) ? row : `${row} (line ${line})`
    })
  const problems = Array.isArray(err.details?.problems) ? { problems: (err.details.problems as unknown[]).map((p) => (typeof p === 'string' ? named(p) : p)) } : err.details
  return new KeygateError('import_invalid', named(err.message), problems, { cause: err })
}

export const API_KEY_COMMANDS: Record<string, Command<ApiKeyContext>> = {
  create: {
    summary: 'create a key and print it once',
    usage: 'keygate api-key create --name NAME --type system|user|service|integration|emergency [--scopes a,b] [--owner O] [--metadata JSON] [--cidrs CIDR,...] [--rate-limit N/1s] [--expires-in 30d | --expires-at TIME] [--rotate-every 90d] [--json]',
    options: { ...KEY_FIELDS, type: { type: 'string' } },
    positionals: { min: 0, max: 0 },
    prepare(p) {
      if (str(p, 'name') === undefined) throw new UsageError('--name is required')
      if (choiceFlag(p, 'type', KEY_TYPES) === undefined) throw new UsageError('--type is required (system, user, service, integration or emergency)')
      const body = keyBody(p)
      checkFlags(CreateKeyBody, body)
      refuseKeyInFlags(body, KEY_FREE_FIELDS, FLAG_OF)
      return async (ctx) => {
        const { key, record } = await ctx.ops.create(body)
        printMade(() => {
          if (ctx.json) printJson(ctx.io, { ...keyJson(record), key })
          else ctx.io.out(`Created ${record.type} key ${record.id} (${printable(record.name)}). The key is shown once; store it now:\n${key}\n`)
        }, `key ${record.id} was created (revoke it with keygate api-key revoke ${record.id}, and create another)`)
        return EXIT_OK
      }
    },
  },
  list: {
    summary: 'list keys, newest first',
    usage: 'keygate api-key list [--type T] [--status S] [--owner O] [--scope S] [--name TEXT] [--legacy] [--limit N] [--cursor C | --all] [--json]',
    options: {
      type: { type: 'string' },
      status: { type: 'string' },
      owner: { type: 'string' },
      scope: { type: 'string' },
      name: { type: 'string' },
      legacy: { type: 'boolean' },
      limit: { type: 'string' },
      cursor: { type: 'string' },
      all: { type: 'boolean' },
    },
    positionals: { min: 0, max: 0 },
    readOnly: true,
    prepare(p) {
      const query: Record<string, unknown> = {}
      // Only the keys imported from the replaced system, to follow a migration's rotations.
      if (p.values.legacy === true) query.legacy = true
      choiceFlag(p, 'type', KEY_TYPES)
      choiceFlag(p, 'status', KEY_STATUSES)
      for (const f of ['type', 'status', 'owner', 'scope', 'name', 'cursor']) if (str(p, f) !== undefined) query[f] = str(p, f)
      const limit = parseIntFlag('limit', str(p, 'limit'), 1, 500)
      if (limit !== undefined) query.limit = limit
      if (p.values.all && query.cursor !== undefined) throw new UsageError('--all and --cursor exclude each other')
      checkFlags(ListKeysQuery, query)
      return async (ctx) => {
        const { items, next } = await pages((cursor) => ctx.ops.list(cursor ? { ...query, cursor } : query), p.values.all === true)
        if (ctx.json) printJson(ctx.io, { items: items.map(keyJson), next_cursor: next })
        else {
          ctx.io.out(keyRows(items))
          if (next) ctx.io.out(`more: --cursor ${next}\n`)
        }
        return EXIT_OK
      }
    },
  },
  audit: {
    summary: "a key's audit trail, newest first",
    usage: 'keygate api-key audit ID [--limit N] [--cursor C | --all] [--json]',
    target: 'ID',
    options: { limit: { type: 'string' }, cursor: { type: 'string' }, all: { type: 'boolean' } },
    positionals: { min: 1, max: 1 },
    readOnly: true,
    prepare(p) {
      const limit = parseIntFlag('limit', str(p, 'limit'), 1, 500)
      const cursor = str(p, 'cursor')
      if (cursor !== undefined && !CURSOR.test(cursor)) throw new UsageError(`--cursor: ${JSON.stringify(firstCharacters(cursor, 40))} is not a cursor; give the "more: --cursor ..." of the previous page`)
      if (p.values.all && cursor !== undefined) throw new UsageError('--all and --cursor exclude each other')
      const id = p.positionals[0] as string
      return async (ctx) => {
        const { items, next } = await pages((at) => ctx.ops.audit(id, { ...(limit !== undefined ? { limit } : {}), ...(at !== undefined ? { cursor: at } : {}) }), p.values.all === true, cursor)
        if (ctx.json) printJson(ctx.io, { items: items.map(auditJson), next_cursor: next })
        else {
          const rows = items.map((a) => [date(a.createdAt), a.action, a.actor, a.address, a.integrity === 'verified' ? JSON.stringify(a.details) : notOpened(a)])
          ctx.io.out(table(['time', 'action', 'actor', 'address', 'details'], rows))
          if (next) ctx.io.out(`more: --cursor ${next}\n`)
        }
        return EXIT_OK
      }
    },
  },
  get: {
    summary: 'show one key',
    usage: 'keygate api-key get ID [--json]',
    target: 'ID',
    options: {},
    positionals: { min: 1, max: 1 },
    readOnly: true,
    prepare(p) {
      return async (ctx) => {
        const k = await ctx.ops.get(p.positionals[0] as string)
        if (ctx.json) printJson(ctx.io, keyJson(k))
        else ctx.io.out(keyDetail(k))
        return EXIT_OK
      }
    },
  },
  update: {
    summary: 'change fields of a key',
    usage: 'keygate api-key update ID [--name N] [--scopes a,b|none] [--owner O|""] [--metadata JSON] [--cidrs CIDR,...|any] [--rate-limit N/1s|default] [--expires-in 30d | --expires-at TIME|never] [--rotate-every 90d|never] [--json]',
    target: 'ID',
    options: KEY_FIELDS,
    positionals: { min: 1, max: 1 },
    changesStored: true,
    prepare(p) {
      const body = keyBody(p)
      if (Object.keys(body).length === 0) throw new UsageError('nothing to change: give at least one of --name, --scopes, --owner, --metadata, --cidrs, --rate-limit, --expires-in, --expires-at, --rotate-every')
      checkFlags(UpdateKeyBody, body)
      refuseKeyInFlags(body, KEY_FREE_FIELDS, FLAG_OF)
      return async (ctx) => {
        const k = await ctx.ops.update(p.positionals[0] as string, body)
        printDone(() => {
          if (ctx.json) printJson(ctx.io, keyJson(k))
          else ctx.io.out(keyDetail(k))
        }, `key ${k.id} was updated`)
        return EXIT_OK
      }
    },
  },
  validate: {
    summary: 'check a key (exit 0 valid, 1 refused); give - to read it from stdin',
    usage: 'keygate api-key validate KEY|- [--address IP] [--json]',
    options: { address: { type: 'string' } },
    positionals: { min: 1, max: 1 },
    readOnly: true,
    prepare(p) {
      const address = str(p, 'address')
      if (address !== undefined && parseAddress(address) === undefined) throw new UsageError(`--address: ${JSON.stringify(address)} is not an IP address`)
      const json = p.values.json === true
      let presented: string | undefined
      const read = async (io: Io) => (presented ??= await argOrStdin(io, p.positionals[0] as string, 'key'))
      const refused = (io: Io, result: { code: string; reason: string; keyId?: string | undefined }) => {
        const why = result.keyId ? `${result.code} (${result.reason}, key ${result.keyId})` : `${result.code} (${result.reason})`
        // One line, whatever an admin API answered: no control character of its reaches the terminal.
        io.err(`keygate: key refused: ${escapeUnprintable(why)}\n`)
        if (json) printJson(io, { valid: false, code: result.code, reason: result.reason, key_id: result.keyId ?? null })
        return EXIT_REFUSED
      }
      const action: Action<ApiKeyContext> = async (ctx) => {
        const result = await ctx.ops.validate(await read(ctx.io), address)
        if (!result.valid) return refused(ctx.io, result)
        if (ctx.json) printJson(ctx.io, { valid: true, key: keyJson(result.key) })
        else ctx.io.out(`valid: ${result.key.id} (${printable(result.key.name)}, ${result.key.type}, ${result.key.status})\n`)
        return EXIT_OK
      }
      // A key no configured format holds is refused as the store would refuse it, without opening
      // the store (before: the embedded store was opened, 1.3 s, or a missing one refused, to say
      // that `kg_x` is malformed). Only here: an admin API judges by its own configuration.
      action.beforeStore = async (io, config) => {
        const prefixes = keyPrefixes(config.keys.prefix, config.keys.previous_prefixes)
        return keyShape(await read(io), prefixes, config.keys.accept_legacy) === undefined ? refused(io, { code: 'key_invalid', reason: 'malformed' }) : undefined
      }
      return action
    },
  },
  revoke: {
    summary: 'revoke a key now',
    usage: 'keygate api-key revoke ID [--reason TEXT] [--json]',
    target: 'ID',
    options: { reason: { type: 'string' } },
    positionals: { min: 1, max: 1 },
    changesStored: true,
    prepare(p) {
      const reason = str(p, 'reason')
      if (reason !== undefined) {
        checkFlags(RevokeBody, { reason })
        refuseKeyInFlags({ reason }, ['reason'])
      }
      return async (ctx) => {
        const k = await ctx.ops.revoke(p.positionals[0] as string, reason)
        printDone(() => {
          if (ctx.json) printJson(ctx.io, keyJson(k))
          else ctx.io.out(`Revoked ${k.id} (${printable(k.name)}).\n`)
        }, `key ${k.id} was revoked`)
        return EXIT_OK
      }
    },
  },
  rotate: {
    summary: "replace a key; the old one stays valid for its type's grace period unless --force",
    usage: 'keygate api-key rotate ID [--force] [--json]',
    target: 'ID',
    options: { force: { type: 'boolean' } },
    positionals: { min: 1, max: 1 },
    changesStored: true,
    prepare(p) {
      return async (ctx) => {
        const { key, record, previous } = await ctx.ops.rotate(p.positionals[0] as string, p.values.force === true)
        // When the old key really stops: an expiry within the grace ends it first, and the new
        // key carries that expiry on (said here, as someone rotating for an expiry notice needs to know).
        // Never null for the key a rotation replaced (keyValidUntil).
        const until = keyValidUntil(previous) as Date
        const cut = previous.status === 'rotating' && previous.graceUntil !== null && until < previous.graceUntil ? ' (its expiry, before its grace period ends)' : ''
        // A new key whose rotation interval ends before that takes the old one with it if it
        // misses its deadline (the scheduler ends both; its deadline is announced later, no
        // sooner than the interval): said so, as "stays valid until" would promise more.
        const sooner =
          previous.status === 'rotating' && record.rotationIntervalS !== null && record.createdAt.getTime() + record.rotationIntervalS * 1000 < until.getTime()
            ? `, or with ${record.id} if it is not rotated by its rotation deadline`
            : ''
        const old = previous.status === 'rotating' ? `${previous.id} stays valid until ${date(until)}${cut}${sooner}` : `${previous.id} no longer works`
        const expiry = record.expiresAt ? `, expiring ${date(record.expiresAt)} as the old one did` : ''
        printMade(() => {
          if (ctx.json) printJson(ctx.io, rotationJson(key, record, previous))
          else ctx.io.out(`Rotated: new key ${record.id}${expiry}; ${old}. The new key is shown once; store it now:\n${key}\n`)
        }, `${previous.id} was rotated, ${old}, and its new key ${record.id} made (rotate ${record.id} again for a key you can store)`)
        return EXIT_OK
      }
    },
  },
  stats: {
    summary: 'counts of keys by type and status',
    usage: 'keygate api-key stats [--json]',
    options: {},
    positionals: { min: 0, max: 0 },
    readOnly: true,
    prepare(p) {
      return async (ctx) => {
        const s = await ctx.ops.stats()
        // expiring_soon and expiring_within_days as GET /v1/stats names them; expiring_within_7d,
        // this command's first name for the count, kept for the scripts that read it.
        if (ctx.json) printJson(ctx.io, { total: s.total, by_type: s.byType, by_status: s.byStatus, legacy: s.legacy, expiring_soon: s.expiringSoon, expiring_within_days: 7, expiring_within_7d: s.expiringSoon })
        else {
          ctx.io.out(table(['type', 'keys'], Object.entries(s.byType)))
          ctx.io.out('\n' + table(['status', 'keys'], Object.entries(s.byStatus)))
          ctx.io.out(`\ntotal ${s.total}, legacy ${s.legacy}, active keys expiring within 7 days ${s.expiringSoon}\n`)
        }
        return EXIT_OK
      }
    },
  },
  import: {
    // The row's fields as the schema that checks them names them (before, the help named none).
    summary: `import legacy keys (SHA-256 hex of UUID v4 strings) from a JSON array or JSON lines file of rows {${IMPORT_ROW_FIELDS}}; a row that names no type takes --type, or service`,
    usage: IMPORT_USAGE,
    options: { type: { type: 'string' } },
    positionals: { min: 1, max: 1 },
    prepare(p) {
      const file = fileArgument(p, IMPORT_USAGE) as string
      const type = choiceFlag(p, 'type', KEY_TYPES)
      // Read and parsed once: before a new store is made (Action's beforeMaking), else once the
      // store is open, as before (`import -` holds the store while a pipe fills). Before a new
      // store the rows are checked too, by themselves: a new store holds no key to add a problem
      // (before, found by a review, rows refused by their own fields made the store, then said so).
      let input: ReturnType<typeof parseImport> | undefined
      const load = async (io: Io) => (input ??= parseImport(await readInput(io, file)))
      const action: Action<ApiKeyContext> = async (ctx) => {
        const { rows, lines } = await load(ctx.io)
        const imported = await ctx.ops.importLegacy(rows, type).catch((err: unknown) => {
          throw withLines(err, lines)
        })
        const keys = `${imported.length} legacy key${imported.length === 1 ? '' : 's'}`
        printDone(() => {
          if (ctx.json) printJson(ctx.io, { imported: imported.length, items: imported.map(keyJson) })
          else ctx.io.out(`Imported ${keys}.\n` + keyRows(imported))
        }, `${keys} ${imported.length === 1 ? 'was' : 'were'} imported (keygate api-key list shows them; importing the file again is refused as duplicates)`)
        return EXIT_OK
      }
      action.beforeMaking = async (io) => {
        const { rows, lines } = await load(io)
        const { checkImportRows, refuseImportProblems } = await import('../core/keys/service.ts')
        try {
          refuseImportProblems(await checkImportRows(rows, new Date()))
        } catch (err) {
          throw withLines(err, lines)
        }
      }
      return action
    },
  },
}
