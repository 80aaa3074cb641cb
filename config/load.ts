// Loads the configuration: YAML file, then environment, then flags; defaults from the schema;
// every problem collected with its path, value and what is allowed; the result deep-frozen.
import { existsSync, readFileSync } from 'node:fs'
import { isAbsolute } from 'node:path'
import { createPrivateKey, X509Certificate } from 'node:crypto'
import { createRequire } from 'node:module'
import { Value } from '@sinclair/typebox/value'
import { Kind, type TSchema } from '@sinclair/typebox'
import type { Document, LineCounter } from 'yaml'
import { KeygateError, systemErrorWords } from '../core/errors.ts'
import { addKnownSecret } from '../core/log.ts'
import { listenOverlaps } from '../core/formats.ts'
import { decodeUtf8 as decodeUtf8Bytes, readAtMost, utf16Words } from '../core/read-bounded.ts'
import { describeAllowed, dotted, firstProblems, foreignValueWords, problemLine, problems as validationProblems, showValue as show, unknownKeyShown, type Problem } from '../core/validate.ts'
import { NO_ROUTE } from '../core/http.ts'
import { prefixReadings, routeHost, routePrefix, upstreamBase } from './routes.ts'
import { ConfigSchema, type Config } from './schema.ts'

// The yaml library and node:tls are loaded when a file is read or a certificate checked: most
// CLI commands have neither, and loading them at every start cost about 0.1 s of CPU a command.
const requireHere = createRequire(import.meta.url)
const yaml = (): typeof import('yaml') => requireHere('yaml') as typeof import('yaml')

export interface LoadOptions {
  /** Explicit file (`--config`); otherwise KEYGATE_CONFIG, else ./keygate.yaml when present. */
  file?: string | undefined
  env?: Readonly<Record<string, string | undefined>>
  /** Flag name (without dashes) → value, for the leaves that declare a `flag`. */
  flags?: Readonly<Record<string, string | undefined>>
  /** Ignore KEYGATE_CONFIG and ./keygate.yaml (used by `config check FILE`). */
  onlyFile?: boolean
  /**
   * The command listens on gateway.listen and admin.listen both (`serve`, but for `--only admin`
   * and a `--workers` worker; `config check`, for it): they must not take one address.
   */
  bothListeners?: boolean
  /**
   * The command goes through the admin API when admin.url is set, and then refuses a store named
   * on its command line itself (cli/main.ts runGroup): `--data-dir` beside a database URL is not
   * refused here as the one PostgreSQL overrides, since then neither is used.
   */
  viaAdminUrl?: boolean
}

export interface Leaf {
  path: string[]
  schema: TSchema
  env?: string
  flag?: string
  secret: boolean
}

/** Every leaf of the schema with its path; objects are walked, arrays and scalars are leaves. */
export function schemaLeaves(schema: TSchema = ConfigSchema, path: string[] = []): Leaf[] {
  if (schema[Kind] === 'Object') {
    return Object.entries(schema.properties as Record<string, TSchema>).flatMap(([k, s]) => schemaLeaves(s, [...path, k]))
  }
  return [{ path, schema, env: schema.env, flag: schema.flag, secret: schema.secret === true }]
}

const LEAVES = schemaLeaves()
export const ENV_NAMES: readonly string[] = LEAVES.flatMap((l) => (l.env ? [l.env] : []))
export const FLAG_NAMES: readonly string[] = LEAVES.flatMap((l) => (l.flag ? [l.flag] : []))

/** What an environment variable or flag of a list takes when one of its items is empty. */
const LIST_WORDS = 'a comma-separated list without empty items'

function parseScalar(raw: string, schema: TSchema): { ok: true; value: unknown } | { ok: false; expected?: string } {
  switch (schema[Kind]) {
    case 'Integer': {
      // Digits past what a number holds exactly stay text, refused as given: read as a number,
      // 9007199254740993 was shown as ...992, and 400 digits as .inf (found by a review).
      const digits = raw.trim()
      if (!/^-?\d+$/.test(digits)) return { ok: false }
      const n = Number(digits)
      return Number.isSafeInteger(n) ? { ok: true, value: n } : { ok: false }
    }
    case 'Boolean': {
      const v = raw.trim().toLowerCase()
      if (['true', '1', 'yes', 'on'].includes(v)) return { ok: true, value: true }
      if (['false', '0', 'no', 'off'].includes(v)) return { ok: true, value: false }
      // The words an environment variable takes, not only a file's (before, found by a docs walk,
      // "expected true or false", where yes, on and 1 are taken too).
      return { ok: false, expected: 'true or false (or 1, yes, on; 0, no, off; in any case)' }
    }
    case 'Union':
      return { ok: true, value: choiceWord(schema, raw) ?? raw }
    case 'Array': {
      // An empty item is refused, not dropped: `$A,$B` with B unset, or a stray comma, would
      // quietly shorten the list (a previous encryption key, a trusted proxy).
      const items = raw.split(',').map((s) => s.trim())
      return items.includes('') ? { ok: false, expected: LIST_WORDS } : { ok: true, value: items }
    }
    default:
      return { ok: true, value: raw }
  }
}

/**
 * The word of a choice (log.level) that `raw` is in any letter case, around spaces, as the yes/no
 * variables are taken: `INFO` is `info`, as many tools write it. One rule for the environment and
 * the file (before, found by a review, the file refused `level: INFO` that LOG_LEVEL took). What is
 * none of the words is left as it was given, to be refused naming it.
 */
function choiceWord(schema: TSchema, raw: string): string | undefined {
  const word = raw.trim().toLowerCase()
  return (schema.anyOf as TSchema[]).map((choice) => choice.const).find((w): w is string => w === word)
}

/** The file's choices of words (log.level) as the words themselves, by `choiceWord`. */
function fileChoiceWords(file: Record<string, unknown>): void {
  for (const leaf of LEAVES) {
    if (leaf.schema[Kind] !== 'Union') continue
    const parent = leaf.path.slice(0, -1).reduce<unknown>((at, k) => (isMapping(at) ? at[k] : undefined), file)
    const key = leaf.path[leaf.path.length - 1] as string
    if (!isMapping(parent) || typeof parent[key] !== 'string') continue
    parent[key] = choiceWord(leaf.schema, parent[key]) ?? parent[key]
  }
}

function isMapping(value: unknown): value is Record<string, unknown> {
  return value !== null && typeof value === 'object' && !Array.isArray(value) && foreignValueWords(value) === undefined
}

/**
 * Sets `value` at `path`; false, setting nothing, where the file put something other than a
 * mapping on the way (`store: "/var/lib/keygate"`): replacing it would hide the file's mistake,
 * which validation reports instead.
 */
function setPath(target: Record<string, unknown>, path: string[], value: unknown): boolean {
  let node = target
  for (const k of path.slice(0, -1)) {
    const next = node[k]
    if (next === undefined || next === null) node[k] = {}
    else if (!isMapping(next)) return false
    node = node[k] as Record<string, unknown>
  }
  node[path[path.length - 1] as string] = value
  return true
}

function leafAt(path: string[]): Leaf | undefined {
  return LEAVES.find((l) => l.path.length <= path.length && l.path.every((p, i) => p === path[i]))
}

/** Whether the value at `path` is or holds a secret (a section written as a string may be a password put one level too high). */
function holdsSecret(path: string[]): boolean {
  if (leafAt(path)?.secret) return true
  return LEAVES.some((l) => l.secret && l.path.length > path.length && path.every((p, i) => p === l.path[i]))
}

export function deepFreeze<T>(value: T): T {
  if (value && typeof value === 'object' && !Object.isFrozen(value)) {
    Object.freeze(value)
    for (const v of Object.values(value)) deepFreeze(v)
  }
  return value
}

/**
 * The largest configuration file read: a large deployment's is tens of kilobytes. Without a bound
 * an 18 MB file took 13.6 s and 1.5 GB of memory to check (found by a review).
 */
export const MAX_CONFIG_BYTES = 1_048_576

/**
 * The file's bytes, or a problem: larger than MAX_CONFIG_BYTES, as its size says or as read (a
 * pipe or a device has no size, and a file may grow), or not readable.
 */
function readBounded(file: string): { bytes: Buffer } | { problem: string } {
  const read = readAtMost(file, MAX_CONFIG_BYTES)
  if ('bytes' in read) return read
  // A relative path names the folder it was taken from: `bin/dev` and npm run commands from the
  // repository's folder, not the one they were typed in.
  if ('unreadable' in read) return { problem: `${file}: cannot be read (${read.unreadable.code ?? 'error'}${isAbsolute(file) ? '' : `; relative to ${process.cwd()}`})` }
  return { problem: `${file}: the file is larger than 1 MiB${read.size === undefined ? '' : ` (${read.size} bytes)`}; a configuration file is at most 1 MiB` }
}

/**
 * The file's text, or a problem: it must be UTF-8. Decoded leniently, a Latin-1 `é` became U+FFFD
 * and the changed value loaded without a word, and a UTF-16 file was read as one odd string
 * ("the top level must be a mapping of keys, not string"; found by a review).
 */
function decodeUtf8(file: string, bytes: Buffer): { text: string } | { problem: string } {
  const decoded = decodeUtf8Bytes(bytes)
  if ('text' in decoded) return decoded
  const { utf16, offset, line, col } = decoded.problem
  if (utf16) return { problem: `${file}: the file is UTF-16 ${utf16Words(decoded.problem)}; save it as UTF-8` }
  return { problem: located(file, { line, col }, `the file is not UTF-8 text (an invalid byte at offset ${offset}); save it as UTF-8`) }
}

function readYaml(file: string, problems: string[]): Record<string, unknown> {
  const read = readBounded(file)
  const decoded = 'bytes' in read ? decodeUtf8(file, read.bytes) : read
  if ('problem' in decoded) {
    problems.push(decoded.problem)
    return {}
  }
  const text = decoded.text
  // Positions come from the line counter: without prettyErrors (whose messages quote the
  // source, secrets included) the parser leaves linePos unset.
  const { isCollection, LineCounter, parseDocument, visit } = yaml()
  const lines = new LineCounter()
  const doc = parseDocument(text, { uniqueKeys: true, prettyErrors: false, lineCounter: lines })
  if (doc.errors.length > 0) {
    for (const e of doc.errors) {
      const words = yamlErrorWords(e.code, e.message)
      // The parser's stack overflow may be told twice (its parse, then its regular expression).
      if (words === TOO_DEEP && problems.some((p) => p.endsWith(TOO_DEEP))) continue
      problems.push(located(file, e.linePos?.[0] ?? lines.linePos(e.pos[0]), words))
    }
    return {}
  }
  // A key that is a mapping or a list (`? {database: secret}`) would be turned into text by the
  // conversion, with a warning that quotes it, and then quoted again as an unknown key (found by
  // a review): refused here, by position.
  let collectionKey: { pos: LinePos | undefined } | undefined
  // An alias inside the very node its anchor names (`a: &x [*x]`) makes a circular value, and
  // every walk of it (the __proto__ check, validation) overflowed the stack: the command said
  // "unexpected error: Maximum call stack size exceeded", naming neither file nor line (found by
  // a review). Refused here, at the alias.
  let cycle: { pos: LinePos | undefined } | undefined
  visit(doc, {
    Pair(_key, pair) {
      if (!isCollection(pair.key)) return undefined
      collectionKey = { pos: positionOf(lines, pair.key) }
      return visit.BREAK
    },
    Alias(_key, node, path) {
      const target = node.resolve(doc)
      if (target === undefined || !path.includes(target)) return undefined
      cycle = { pos: positionOf(lines, node) }
      return visit.BREAK
    },
  })
  if (collectionKey) {
    problems.push(located(file, collectionKey.pos, 'a key that is a mapping or a list is not allowed (it is not shown)'))
    return {}
  }
  if (cycle) {
    problems.push(located(file, cycle.pos, 'an alias inside the anchor it names (a cycle) is not allowed; a configuration value cannot contain itself'))
    return {}
  }
  let data: unknown
  try {
    // maxAliasCount bounds what aliases expand to (a "billion laughs" file).
    data = doc.toJS({ maxAliasCount: 100 })
  } catch (err) {
    const problem = toJsProblem(doc, lines, err as Error)
    problems.push(located(file, problem.pos, problem.message))
    return {}
  }
  const proto = protoKeyPath(data)
  if (proto !== undefined) {
    problems.push(`${file}: ${proto || '(top level)'}: the key __proto__ is not allowed`)
    return {}
  }
  if (data === null || data === undefined) return {}
  if (typeof data !== 'object' || Array.isArray(data) || foreignValueWords(data) !== undefined) {
    problems.push(`${file}: the top level must be a mapping of keys, not ${Array.isArray(data) ? 'a list' : (foreignValueWords(data) ?? typeof data)}`)
    return {}
  }
  return data as Record<string, unknown>
}

type LinePos = { line: number; col: number }

/**
 * The parser's errors whose messages quote the source (the value, a tag, a directive), in
 * keygate's words: an unquoted password starting with `|` or `>`, or a double-quoted one with
 * `\U`, was printed whole in `config check`'s output, and so in the journal under the systemd
 * unit (found by a review). And those that speak to a programmer using the library (a file of two
 * documents was told to "use YAML.parseAllDocuments()"). The others name no source text and are
 * kept as they are.
 */
const YAML_ERROR_WORDS: Readonly<Record<string, string>> = {
  UNEXPECTED_TOKEN: 'unexpected text here (not shown); if it is a string (a password, a token), quote it',
  BAD_SCALAR_START: 'a plain value cannot start with this character (not shown); if it is a string (a password, a token), quote it',
  BAD_DQ_ESCAPE: 'an invalid \\ escape in a double-quoted string (not shown); in single quotes a backslash is taken as it is',
  TAG_RESOLVE_FAILED: 'a YAML tag that cannot be resolved here (not shown)',
  BAD_COLLECTION_TYPE: 'a YAML tag used on the wrong kind of collection (not shown)',
  BAD_DIRECTIVE: 'a YAML directive that is not supported (not shown)',
  BAD_PROP_ORDER: 'anchors and tags must come after the indicator here',
  MULTIPLE_DOCS: 'the file holds more than one YAML document (---); keygate reads one',
}

/**
 * A document nested some hundreds of levels deep overflows the parser's stack: said so, not as
 * the engine's "Maximum call stack size exceeded" (before, found by a review of the CLI).
 */
const TOO_DEEP = 'nests too deeply to be read (hundreds of levels); a configuration nests a few'

function yamlErrorWords(code: string, message: string): string {
  if (/Maximum call stack size exceeded|Stack overflow/.test(message)) return TOO_DEEP
  return YAML_ERROR_WORDS[code] ?? (message.split('\n')[0] as string)
}

/** `file:line:col: message`, or `file: message` without a position, as the parser's own problems are reported. */
function located(file: string, pos: LinePos | undefined, message: string): string {
  return `${file}${pos ? `:${pos.line}:${pos.col}` : ''}: ${message}`
}

/** Where a node of the document starts, when the parser recorded it. */
function positionOf(lines: LineCounter, node: { range?: [number, number, number] | null }): LinePos | undefined {
  return node.range ? lines.linePos(node.range[0]) : undefined
}

/**
 * What went wrong expanding the document, without the source's words: the yaml library names an
 * unresolved alias, and an unquoted value starting with `*` (a generated password, a token) is
 * read as one, so its message quoted the secret (found by a review). The alias is located instead.
 */
function toJsProblem(doc: Document, lines: LineCounter, err: Error): { pos?: LinePos | undefined; message: string } {
  if (!err.message.startsWith('Unresolved alias')) return { message: err.message.split('\n')[0] as string }
  const { visit } = yaml()
  let pos: LinePos | undefined
  visit(doc, {
    Alias(_key, node) {
      if (node.resolve(doc) !== undefined) return undefined
      pos = positionOf(lines, node)
      return visit.BREAK
    },
  })
  return { pos, message: 'a value starting with * is read as an alias of an anchor that is not there (the value is not shown); if it is a string (a password, a token), quote it' }
}

/** Where a `__proto__` key is (its parent's dotted path), if anywhere: copying the value would make it a prototype, unseen by validation. */
function protoKeyPath(value: unknown, path: string[] = []): string | undefined {
  // A Buffer (!!binary) has a key per byte and none named __proto__; validation refuses it whole.
  if (value === null || typeof value !== 'object' || foreignValueWords(value) !== undefined) return undefined
  for (const k of Object.keys(value)) {
    if (k === '__proto__') return path.join('.')
    const found = protoKeyPath((value as Record<string, unknown>)[k], [...path, k])
    if (found !== undefined) return found
  }
  return undefined
}

/**
 * Finds a mapping where the schema wants a list, or a list where it wants a mapping, and
 * removes it (reporting each): TypeBox's Value.Default would merge it into the default (`[]` or
 * `{}`), so `routes: {...}` would pass as no routes at all. Items of lists are left to the
 * validator, which reports them as they are.
 */
function misshapen(schema: TSchema, value: unknown, path: string[], found: Problem[], removable = true): boolean {
  if (value === null || typeof value !== 'object') return false
  const kind = schema[Kind]
  const list = Array.isArray(value)
  if (removable && ((kind === 'Array' && !list) || (kind === 'Object' && list))) {
    found.push({ path, kind: 'invalid', value, allowed: describeAllowed(schema) })
    return true
  }
  if (kind === 'Array' && list) {
    value.forEach((item, i) => misshapen(schema.items as TSchema, item, [...path, String(i)], found, false))
  } else if (kind === 'Object' && !list) {
    const node = value as Record<string, unknown>
    for (const [k, s] of Object.entries(schema.properties as Record<string, TSchema>)) {
      if (misshapen(s, node[k], [...path, k], found)) delete node[k]
    }
  }
  return false
}

/**
 * Finds each value that is no scalar, list or mapping where the schema reaches (a Buffer from
 * `!!binary`, a Set from `!!set`, a Map from `!!omap`, a Date from `!!timestamp`; YAML 1.1 files
 * make them from untagged values too) and reports it once as the wrong type. The validator would
 * take a Buffer for a mapping with one unknown key per byte (a 1 MB `gateway: !!binary` gave a
 * million lines and 2 GB of memory), and a Set, Map or Date for an empty mapping, which the
 * defaults then filled without a word. A value of a mapping is removed, as in `misshapen`; an item
 * of a list is replaced by a mapping of its own (not null: two nulls would be reported as repeats),
 * and its path goes into `skip`: what the validator finds at or under it repeats the problem.
 */
function foreign(schema: TSchema, value: unknown, path: string[], found: Problem[], skip: Set<string>): boolean {
  if (value === null || typeof value !== 'object') return false
  if (foreignValueWords(value) !== undefined) {
    found.push({ path, kind: 'invalid', value, allowed: describeAllowed(schema) })
    skip.add(path.join('/'))
    return true
  }
  if (schema[Kind] === 'Array' && Array.isArray(value)) {
    value.forEach((item, i) => {
      if (foreign(schema.items as TSchema, item, [...path, String(i)], found, skip)) value[i] = { '(not JSON)': i }
    })
  } else if (schema[Kind] === 'Object' && !Array.isArray(value)) {
    // Keys the schema does not know are left to the validator, which reports each as unknown without looking inside.
    const node = value as Record<string, unknown>
    for (const [k, s] of Object.entries(schema.properties as Record<string, TSchema>)) {
      if (Object.hasOwn(node, k) && foreign(s, node[k], [...path, k], found, skip)) delete node[k]
    }
  }
  return false
}

/** Validates a plain object (already merged) against the schema and keygate's own rules. */
function check(input: Record<string, unknown>, problems: string[], origins: Map<string, string>, bothListeners: boolean): Config {
  const found: Problem[] = []
  const skip = new Set<string>()
  foreign(ConfigSchema, input, [], found, skip)
  const cleaned = Value.Clone(input)
  misshapen(ConfigSchema, cleaned, [], found)
  const value = Value.Default(ConfigSchema, cleaned) as Record<string, unknown>
  const skipped = (path: string[]) => path.some((_, i) => skip.has(path.slice(0, i + 1).join('/')))
  const all = [...found, ...validationProblems(ConfigSchema, value).filter((p) => !skipped(p.path))]
  // A setting as a problem names it: with the variable or flag that gave it, when one did.
  const sourced = (key: string) => (origins.has(key) ? `${origins.get(key)} (${key})` : key)
  for (const found of all) {
    const p = unknownKeyShown(found, holdsSecret(found.path.slice(0, -1)))
    problems.push(problemLine(p, sourced(dotted(p.path)), holdsSecret(p.path)))
  }
  const names = new Set<string>()
  const routes: unknown = value.routes
  if (Array.isArray(routes)) {
    routes.forEach((r: { name?: unknown }, i) => {
      if (typeof r?.name !== 'string') return
      if (names.has(r.name)) problems.push(`routes[${i}].name: ${JSON.stringify(r.name)} is not allowed; expected a name no other route uses`)
      // Before, found by a review, a route named none shared its metrics with requests matching no route.
      else if (r.name === NO_ROUTE) problems.push(`routes[${i}].name: ${JSON.stringify(r.name)} is not allowed; expected another name ("${NO_ROUTE}" is the metrics' label of requests that match no route)`)
      names.add(r.name)
    })
  }
  const config = value as Config
  // Each check below runs unless a value it reads is already wrong, so that every problem is reported at once.
  const within = (path: string, k: string) => path === k || path.startsWith(`${k}.`) || path.startsWith(`${k}[`)
  const bad = (...keys: string[]) => all.some((p) => keys.some((k) => within(dotted(p.path), k)))
  // Two routes for one path prefix and host, as the gateway compares them: the first would take
  // every request, and the second, with its scopes, would never be used (found by a review).
  // Nor two whose prefixes differ only as an upstream that ignores letter case or decodes
  // %-escapes reads them (`/admin` and `/ADMIN`, `/%61dmin`): the gateway takes them for one
  // route, so `/ADMIN/users` went by the unscoped `/ADMIN` to what the upstream read as /admin
  // (found by a review). A format suffix (`/api/v2.1`, which Rails reads as `/api/v2`) makes twins
  // only of two routes whose paths reach one upstream as sent, under one base path (upstreamBase):
  // versions to their own upstreams are an everyday layout.
  const taken = new Map<string, number>()
  const read = new Map<string, number>()
  const named = (i: number) => `routes[${i}] ${JSON.stringify(config.routes[i]?.name)}`
  for (const [i, r] of (Array.isArray(routes) ? (routes as Partial<Config['routes'][number]>[]) : []).entries()) {
    if (typeof r?.path !== 'string' || bad(`routes[${i}].path`, `routes[${i}].host`)) continue
    const prefix = routePrefix(r.path)
    const host = routeHost(r.host)
    const where = JSON.stringify([prefix, host])
    const first = taken.get(where)
    if (first !== undefined) {
      problems.push(`routes[${i}].path: ${show(r.path, false)} is not allowed; expected a path and host no other route uses (${named(first)})`)
      continue
    }
    taken.set(where, i)
    const { lower, lenient, suffixless } = prefixReadings(prefix)
    const base = upstreamBase(String(r.upstream), r.strip_prefix === true, prefix)
    const readings = [...new Set([lower, lenient])].map((p) => JSON.stringify([p, host]))
    if (base !== undefined) readings.push(JSON.stringify([suffixless, host, base]))
    const twin = readings.map((w) => read.get(w)).find((j) => j !== undefined)
    if (twin !== undefined) {
      problems.push(
        `routes[${i}].path: ${show(r.path, false)} is not allowed; expected a path that is not another route's for the same host as lenient upstreams read paths (letter case, %-escapes, ";" parameters, "//", "\\", trailing dots; a format suffix, to the same upstream): ${named(i)} and ${named(twin)} (${show(config.routes[twin]?.path, false)}) would be taken as one route by an upstream that ignores case or decodes %-escapes (or reads paths in one of the other ways)`,
      )
      continue
    }
    for (const w of readings) read.set(w, i)
  }
  if (config.upstream !== undefined && !bad('upstream', 'routes')) {
    // The shortcut's route is `/` for any host, compared as any route's path is (`//` is `/` too).
    if (config.routes.some((r) => routePrefix(r.path) === '/' && r.host === undefined)) {
      problems.push(`${sourced('upstream')}: ${show(config.upstream, false)} is not allowed; expected no route for / in routes when the upstream shortcut is set`)
    } else if (names.has('default')) {
      problems.push(`${sourced('upstream')}: ${show(config.upstream, false)} is not allowed; expected no route named "default" when the upstream shortcut is set`)
    } else if (problems.length === 0) {
      config.routes.push({ name: 'default', path: '/', upstream: config.upstream, timeout_ms: 30_000, keepalive_timeout_ms: 4_000, scopes: [], strip_prefix: false, preserve_host: false, rewrite_redirects: true, cors_preflight: false })
    }
  }
  // The unusual-hours check learns from the usage rows: pruning them sooner would blind it.
  if (!bad('scheduler.usage_retention_days', 'anomalies.unusual_hour_history_days') && config.scheduler.usage_retention_days < config.anomalies.unusual_hour_history_days) {
    problems.push(`scheduler.usage_retention_days: ${config.scheduler.usage_retention_days} is not allowed; expected at least anomalies.unusual_hour_history_days (${config.anomalies.unusual_hour_history_days})`)
  }
  // The span is measured within the history read, from its first row to the hour judged: a longer
  // one could never be reached, and one as long only where the key was used at the judged hour's
  // own time, the first hour of the history, so an hour it does not use would never be judged.
  // Before, found by a review, the two equal were taken, and the check was silently off.
  if (!bad('anomalies.unusual_hour_min_days', 'anomalies.unusual_hour_history_days') && config.anomalies.unusual_hour_min_days >= config.anomalies.unusual_hour_history_days) {
    const { unusual_hour_min_days: min, unusual_hour_history_days: days } = config.anomalies
    problems.push(
      `anomalies.unusual_hour_min_days: ${min} is not allowed; expected less than anomalies.unusual_hour_history_days (${days})${min === days ? `: a history of ${days} days spans ${days} only where the key was used at the judged hour's time ${days} days before, so an hour it does not use would never be judged` : ''}`,
    )
  }
  // A finding's row is what keeps its (key, type, window) from alerting again: pruned while its
  // dedupe window still runs, the same anomaly was recorded and alerted a second time.
  if (!bad('scheduler.anomaly_retention_days', 'anomalies.dedupe_window_s') && config.scheduler.anomaly_retention_days * 86_400 < config.anomalies.dedupe_window_s) {
    problems.push(
      `scheduler.anomaly_retention_days: ${config.scheduler.anomaly_retention_days} is not allowed; expected at least anomalies.dedupe_window_s in days (${config.anomalies.dedupe_window_s} s, ${Math.ceil(config.anomalies.dedupe_window_s / 86_400)} days)`,
    )
  }
  // A previous prefix is one new keys are never given: keys.prefix among them is a move half made
  // (kg_ listed as the old prefix, keys.prefix left kg_), and new keys went on taking it.
  if (!bad('keys.prefix', 'keys.previous_prefixes')) {
    const { prefix, previous_prefixes: previous } = config.keys
    const at = previous.indexOf(prefix)
    if (at !== -1) problems.push(`keys.previous_prefixes[${at}]: ${show(prefix, false)} is not allowed; expected a prefix other than keys.prefix (${show(prefix, false)}): new keys are given keys.prefix, and a previous prefix never is`)
  }
  // The waits between attempts grow from retry_base_ms and stop at retry_max_ms: a base above the
  // maximum made every wait the maximum, the first too.
  if (!bad('webhooks.retry_base_ms', 'webhooks.retry_max_ms') && config.webhooks.retry_base_ms > config.webhooks.retry_max_ms) {
    problems.push(`webhooks.retry_base_ms: ${config.webhooks.retry_base_ms} is not allowed; expected at most webhooks.retry_max_ms (${config.webhooks.retry_max_ms}): every wait is at most that, the first too`)
  }
  // Node refuses to make a server whose header timeout is longer than its request timeout.
  if (!bad('admin.headers_timeout_ms', 'admin.request_timeout_ms') && config.admin.headers_timeout_ms > config.admin.request_timeout_ms) {
    problems.push(`${sourced('admin.headers_timeout_ms')}: ${config.admin.headers_timeout_ms} is not allowed; expected at most admin.request_timeout_ms (${config.admin.request_timeout_ms}): the headers are part of the request`)
  }
  // Checked here, not left to the start: that failed with "the address is in use", naming neither
  // setting nor that keygate itself held the address (found by the configuration review).
  if (bothListeners && !bad('gateway.listen', 'admin.listen') && listenOverlaps(config.gateway.listen, config.admin.listen)) {
    problems.push(
      `${sourced('admin.listen')}: ${show(config.admin.listen, false)} is not allowed; expected an address other than gateway.listen's (${show(config.gateway.listen, false)}${origins.has('gateway.listen') ? `, from ${origins.get('gateway.listen')}` : ''}): serve listens on both (serve --only admin on admin.listen alone)`,
    )
  }
  for (const side of ['gateway', 'admin'] as const) {
    if (bad(`${side}.tls`)) continue
    const tls = config[side]?.tls
    if (tls) problems.push(...tlsProblems(`${side}.tls`, tls))
  }
  return config
}

/**
 * What `serve` would fail on when it builds the TLS context: a file that cannot be read (missing,
 * a folder, unreadable), a certificate or key that is not PEM, a key that does not belong to the
 * certificate. Checked here so that `config check` and a start name the setting.
 */
function tlsProblems(at: string, tls: { cert: string; key: string }): string[] {
  const read: Partial<Record<'cert' | 'key', Buffer>> = {}
  const out: string[] = []
  for (const part of ['cert', 'key'] as const) {
    try {
      read[part] = readFileSync(tls[part])
    } catch (err) {
      const reason = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'no such file' : systemErrorWords(err)
      out.push(`${at}.${part}: ${show(tls[part], false)} is not allowed; expected a readable file (${reason})`)
    }
  }
  if (read.cert === undefined || read.key === undefined) return out
  try {
    new X509Certificate(read.cert)
  } catch {
    return [`${at}.cert: ${show(tls.cert, false)} is not allowed; expected a PEM certificate`]
  }
  try {
    createPrivateKey(read.key)
  } catch {
    return [`${at}.key: ${show(tls.key, false)} is not allowed; expected a PEM private key (not encrypted)`]
  }
  try {
    process.getBuiltinModule('node:tls').createSecureContext({ cert: read.cert, key: read.key })
  } catch (err) {
    return [`${at}.key: ${show(tls.key, false)} is not allowed; expected the private key of ${at}.cert (${(err as Error).message})`]
  }
  return []
}

/**
 * The file read when none is named: KEYGATE_CONFIG, else ./keygate.yaml when present. An empty
 * KEYGATE_CONFIG is an unset one, as every variable; one of white space alone is refused
 * (config_invalid), as a blank value of any other: before (found by a review), it was read as a
 * file named so, `  : cannot be read (ENOENT)`, naming neither the variable nor what was wrong.
 */
export function defaultConfigFile(env: Record<string, string | undefined>): string | undefined {
  const named = env.KEYGATE_CONFIG
  if (named !== undefined && named !== '' && named.trim() === '') {
    const problem = `KEYGATE_CONFIG: ${JSON.stringify(named)} is not allowed; expected the path of a configuration file (or leave it unset, for ./keygate.yaml when present)`
    throw new KeygateError('config_invalid', `invalid configuration:\n  ${problem}`, { problems: [problem] })
  }
  return named || (existsSync('keygate.yaml') ? 'keygate.yaml' : undefined)
}

/** The most problems an invalid configuration lists (`details.problems` too); a last line counts the rest. */
export const MAX_PROBLEMS = 50

/** KEYGATE_ variables keygate reads beside the schema's: the file's path, the re-run's own, the tool cache. */
const OTHER_ENV = new Set(['KEYGATE_CONFIG', 'KEYGATE_WASM_TIERING', 'KEYGATE_REEXEC_CHILD', 'KEYGATE_CACHE_DIR'])

/** Edits (insert, delete, change a character) from `a` to `b`. */
function editDistance(a: string, b: string): number {
  let row = Array.from({ length: b.length + 1 }, (_, j) => j)
  for (let i = 1; i <= a.length; i++) {
    const next = [i]
    for (let j = 1; j <= b.length; j++) next[j] = Math.min((row[j] as number) + 1, (next[j - 1] as number) + 1, (row[j - 1] as number) + (a[i - 1] === b[j - 1] ? 0 : 1))
    row = next
  }
  return row[b.length] as number
}

/**
 * The KEYGATE_ variables of `env` keygate does not read, each with the one meant when one is two
 * edits away: a misspelt variable is ignored, and its setting quietly keeps its default (found
 * by a newcomer: `KEYGATE_UPSTREM` started a gateway without routes). A warning, not an error:
 * an environment is shared with other tools and versions.
 */
export function unknownEnvNames(env: Readonly<Record<string, string | undefined>>): string[] {
  const known = [...ENV_NAMES.filter((n) => n.startsWith('KEYGATE_')), ...OTHER_ENV]
  const out: string[] = []
  for (const name of Object.keys(env).sort()) {
    if (!name.startsWith('KEYGATE_') || known.includes(name)) continue
    const meant = known.find((k) => editDistance(name, k) <= 2)
    out.push(meant === undefined ? name : `${name} (${meant}?)`)
  }
  return out
}

/** Finds, merges, validates and freezes the configuration, or throws `config_invalid` listing every problem (up to MAX_PROBLEMS). */
export function loadConfig(options: LoadOptions = {}): Config {
  const env = options.env ?? process.env
  const problems: string[] = []
  const origins = new Map<string, string>()
  let file = options.file
  if (file === undefined && !options.onlyFile) {
    file = defaultConfigFile(env)
  }
  const merged: Record<string, unknown> = file !== undefined ? readYaml(file, problems) : {}
  fileChoiceWords(merged)

  for (const leaf of LEAVES) {
    const sources: Array<[string, string | undefined]> = []
    if (leaf.env && !options.onlyFile) sources.push([leaf.env, env[leaf.env]])
    if (leaf.flag && options.flags) sources.push([`--${leaf.flag}`, options.flags[leaf.flag]])
    for (const [name, raw] of sources) {
      const key = dotted(leaf.path)
      if (raw === undefined) continue
      // An empty variable is an unset one, and so is a list's of only spaces (before, it was the
      // empty list, replacing the file's without a word); an empty flag is a mistake
      // (`--listen=$ADDR` with ADDR unset must not quietly mean the file's or the default address).
      if (raw === '' || (leaf.schema[Kind] === 'Array' && raw.trim() === '')) {
        if (name.startsWith('--')) problems.push(`${name} (${key}): an empty value is not allowed; expected ${describeAllowed(leaf.schema)}`)
        continue
      }
      // Node reads each byte of the environment that is not UTF-8 as U+FFFD: a password set in
      // Latin-1 became another password without a word, where a file in Latin-1 is refused, and
      // so is such a flag (cli/io.ts). No setting needs the character itself.
      if (raw.includes('\uFFFD')) {
        problems.push(`${name} (${key}): the value holds bytes that are not UTF-8 (read as U+FFFD); give it in UTF-8`)
        continue
      }
      const parsed = parseScalar(raw, leaf.schema)
      if (!parsed.ok) {
        problems.push(`${name} (${key}): ${show(raw, leaf.secret)} is not allowed; expected ${parsed.expected ?? describeAllowed(leaf.schema)}`)
        continue
      }
      if (!setPath(merged, leaf.path, parsed.value)) continue
      origins.set(key, name)
      if (leaf.schema[Kind] === 'Array') {
        ;(parsed.value as unknown[]).forEach((_, i) => origins.set(`${key}[${i}]`, name))
      }
    }
  }
  // An embedded store's folder named on the command line while PostgreSQL is named, which is then
  // used: before (found by a review), the flag was dropped without a word, and `api-key create
  // --data-dir DIR` with DATABASE_URL set made its key where the server on DIR never saw it.
  // (KEYGATE_DATA_DIR or the file's data_dir beside a database URL is a deployment's default.)
  const databaseUrl = (merged.store as Record<string, unknown> | undefined)?.database_url
  const adminUrl = (merged.admin as Record<string, unknown> | undefined)?.url
  const throughAdmin = options.viaAdminUrl === true && typeof adminUrl === 'string' && adminUrl !== ''
  if (!throughAdmin && origins.get('store.data_dir') === '--data-dir' && typeof databaseUrl === 'string' && databaseUrl !== '') {
    const named = origins.get('store.database_url') ?? 'the configuration file'
    problems.push(`--data-dir (store.data_dir): names the embedded store's folder, but ${named} names PostgreSQL (store.database_url), which would be used; leave out --data-dir, or the database URL to use the embedded store`)
  }
  const config = check(merged, problems, origins, options.bothListeners === true)
  if (problems.length > 0) {
    // A value a command-line flag never takes is a usage error (exit 2), as on every command; a
    // problem's line starts with the flag that gave the value (no key of the file starts with `--`).
    const code = problems.some((p) => p.startsWith('--')) ? 'usage_error' : 'config_invalid'
    // The first MAX_PROBLEMS and a count of the rest: a small file of unknown keys must not print megabytes.
    const shown = firstProblems(problems, MAX_PROBLEMS)
    throw new KeygateError(code, `invalid configuration:\n  ${shown.join('\n  ')}`, { problems: shown, file })
  }
  return deepFreeze(config)
}

/** The secrets that are URLs: of them, the password is a secret (the rest is shown in messages, its userinfo hidden). */
const URL_FORMATS = new Set(['postgres-url', 'redis-url'])

/**
 * Hands every secret of `config` to the log's scrubbing (`addKnownSecret`), so that none is
 * written to a log or sent back in an error's message: a password or token as given, and of a URL
 * its password, as written and decoded (the URL's form is hidden in messages already). Called by
 * the process that runs with `config` (a command, `serve` and each of its workers), not by
 * `loadConfig`: a configuration only checked or tried must not hide text in another's messages.
 */
export function hideConfigSecrets(config: Config): void {
  for (const leaf of LEAVES) {
    if (!leaf.secret) continue
    const node = leaf.path.reduce<unknown>((at, k) => (at as Record<string, unknown> | undefined)?.[k], config)
    for (const value of Array.isArray(node) ? node : [node]) {
      if (typeof value !== 'string') continue
      if (!URL_FORMATS.has(leaf.schema.format as string)) {
        addKnownSecret(value)
        continue
      }
      const password = URL.parse(value)?.password ?? ''
      if (password === '') continue
      addKnownSecret(password)
      try {
        addKnownSecret(decodeURIComponent(password))
      } catch {
        // Not validly percent-encoded: kept as written only.
      }
    }
  }
}

/** Text of docs/configuration.md, generated from the schema (a test keeps the file current). */
export function renderConfigDocs(): string {
  const row = (name: string, schema: TSchema, def: string, envFlag = '') => {
    const desc = `${schema.description ?? ''} Allowed: ${describeAllowed(schema)}.`.trim()
    return `| \`${name}\` | ${def} | ${envFlag} | ${desc.replace(/\|/g, '\\|')} |`
  }
  const shownDefault = (schema: TSchema) => (schema.default !== undefined ? `\`${JSON.stringify(schema.default)}\`` : '')
  const rows = LEAVES.flatMap((l) => {
    const envFlag = [l.env ? `\`${l.env}\`` : '', l.flag ? `\`--${l.flag}\`` : ''].filter(Boolean).join(' / ')
    const out = [row(dotted(l.path), l.schema, shownDefault(l.schema), envFlag)]
    // A list of mappings (routes): a row for each key of its items, after the list's own.
    const items = l.schema[Kind] === 'Array' ? (l.schema.items as TSchema) : undefined
    if (items?.[Kind] === 'Object') {
      const required = new Set((items.required as string[] | undefined) ?? [])
      for (const item of schemaLeaves(items)) {
        const key = item.path.join('.')
        out.push(row(`${dotted(l.path)}[].${key}`, item.schema, shownDefault(item.schema) || (required.has(key) ? 'required' : '')))
      }
    }
    return out
  })
  return [
    '# Configuration',
    '',
    'Generated from `config/schema.ts` (`node bin/keygate.ts config docs`); do not edit by hand.',
    '',
    'Sources, each overriding the one before: the YAML file (`--config FILE`, else `KEYGATE_CONFIG`,',
    'else `./keygate.yaml` when present), environment variables, command-line flags. Unknown keys are',
    'errors; every problem is reported at once (the first 50, then a count of the rest) with its path, the value and what is allowed.',
    '`keygate config check FILE` checks the file alone; environment variables and flags are checked when a command starts.',
    'The file is one YAML document, in UTF-8 (a byte order mark is allowed; Latin-1 or UTF-16 is refused), of at most 1 MiB.',
    '',
    'In environment variables and flags, a list is comma-separated (`KEYGATE_TRUSTED_PROXIES=10.0.0.0/8,192.168.0.0/16`), without',
    'empty items (`a,,b`, `a,` and `,` are refused); a list\'s variable that is empty or only spaces is not set (the file\'s list stays),',
    'a yes/no setting takes `true`, `1`, `yes` or `on`, and `false`, `0`, `no` or `off` (in any letter case), and a choice of words',
    'takes them in any letter case too, in the file as in the environment (`LOG_LEVEL=INFO` and `log: { level: INFO }` are `info`;',
    'before, found by a review, the variable was refused, and then the file still was).',
    '',
    '| key | default | environment / flag | meaning |',
    '| --- | --- | --- | --- |',
    ...rows,
    '',
  ].join('\n')
}
